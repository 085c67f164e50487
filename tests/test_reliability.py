"""Reliability and security: crashes, restarts, many senders, hostile input, network exposure.

Every scenario uses real processes, sockets and shared memory. Figures go to
build/figures.json (see docs/reliability.md). Long variants run with `--soak`.
"""

from __future__ import annotations

import contextlib
import json
import multiprocessing as mp
import os
import re
import signal
import subprocess
import sys
import textwrap
import time
from collections import defaultdict
from multiprocessing import shared_memory
from pathlib import Path

import numpy as np
import pytest
import zmq

from polystore.streaming import (
    NapariStreamingBackend,
    ReceiverLostError,
    ViewerNotRunningError,
    list_segments,
    receiver_for,
)
from polystore.streaming import protocol as p
from tests import needs
from tests.stream_helpers import rss_kib, send_frames, start_receiver
from tests.test_streaming import RawClient, free_endpoint

ROOT = Path(__file__).resolve().parent.parent


def my_segments() -> list:
    return [s for s in list_segments(["napari_"]) if s.pid == os.getpid()]


def test_viewer_absent_fails_within_a_second(figure):
    b = NapariStreamingBackend(free_endpoint())
    t = time.perf_counter()
    with pytest.raises(ViewerNotRunningError, match="polystore napari"):
        b.save(np.zeros((64, 64), np.uint16), "x.tif")
    elapsed = time.perf_counter() - t
    b.close()
    figure("viewer_absent_error_s", round(elapsed, 3))
    figure("viewer_absent_segments_left", len(my_segments()))
    assert elapsed <= 1.2
    assert my_segments() == []


@pytest.mark.parametrize("policy", ["block", "latest"])
def test_receiver_killed_mid_stream(policy, figure):
    proc = start_receiver()
    b = NapariStreamingBackend(proc.endpoint, policy=policy, timeout=1.0, max_inflight=4)
    frame = np.zeros((256, 256), np.uint16)
    for i in range(20):
        b.save(frame, f"k/{i}.tif")
    proc.kill()
    t = time.perf_counter()
    outcome = None
    try:
        for i in range(2000):
            b.save(frame, f"k/after{i}.tif")
            if time.perf_counter() - t > 3:
                break
        outcome = "kept going"
    except (ReceiverLostError, ViewerNotRunningError) as exc:
        outcome = type(exc).__name__
    noticed = time.perf_counter() - t
    dropped = b.sender.stats.dropped  # read before close(), which ends the sender
    b.close()
    figure(f"receiver_killed_{policy}_noticed_s", round(noticed, 3))
    if policy == "block":
        assert outcome in ("ReceiverLostError", "ViewerNotRunningError")
        assert noticed <= 1.0 + 1.0 + 0.5  # timeout + one handshake attempt + slack
    else:
        assert outcome == "kept going"  # a live preview never stops the pipeline
        assert dropped > 0  # ...it drops what nobody can show, and counts it
    assert my_segments() == []


def _sender_group(endpoint: str) -> subprocess.Popen:
    """A sender (with its resource tracker) in its own process group, streaming forever."""
    code = textwrap.dedent(f"""
        import numpy as np, sys
        from polystore.streaming import NapariStreamingBackend
        b = NapariStreamingBackend({endpoint!r}, max_inflight=4)
        frame = np.zeros((128, 128), np.uint16)
        i = 0
        while True:
            b.save(frame, f"doomed/{{i}}.tif"); i += 1
            if i == 50: print("streaming", flush=True)
    """)
    return subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.PIPE,
                            start_new_session=True, text=True)


def test_sender_killed_mid_stream_receiver_serves_others_and_sweep_cleans(figure):
    rx = receiver_for(NapariStreamingBackend, "tcp://127.0.0.1:0", on_frame=lambda f: None)
    rx.start()
    try:
        doomed = _sender_group(rx.endpoint)
        assert doomed.stdout.readline().strip() == "streaming"
        os.killpg(doomed.pid, signal.SIGKILL)  # the sender and its resource tracker
        doomed.wait(10)
        orphans = [s for s in list_segments(["napari_"]) if s.pid == doomed.pid]
        figure("sender_killed_orphan_segments", len(orphans))
        assert orphans, "SIGKILL of the whole group leaves the segments behind"
        # the receiver keeps serving another sender
        other = send_frames(rx.endpoint, "survivor", 100)
        assert other["error"] is None and other["sent"] == 100
        # a receiver starting up (or `polystore shm clean`) sweeps the dead sender's segments
        rx2 = receiver_for(NapariStreamingBackend, "tcp://127.0.0.1:0").start()
        rx2.stop()
        assert [s for s in list_segments(["napari_"]) if s.pid == doomed.pid] == []
    finally:
        rx.stop()


def test_receiver_restart_sender_reconnects_and_continues(figure):
    endpoint = free_endpoint()
    proc = start_receiver(endpoint)
    b = NapariStreamingBackend(endpoint, timeout=2)
    frame = np.zeros((64, 64), np.uint16)
    for i in range(10):
        b.save(frame, f"r/a{i}.tif")
    b.flush()
    proc.stop()
    failures = 0
    for i in range(3):
        try:
            b.save(frame, f"r/b{i}.tif")
        except (ReceiverLostError, ViewerNotRunningError):
            failures += 1
    assert failures == 3  # nobody there: each save says so (within ~1 s)
    t = time.perf_counter()
    proc = start_receiver(endpoint)
    try:
        for i in range(10):
            b.save(frame, f"r/c{i}.tif")
        b.flush()
        figure("receiver_restart_reconnect_s", round(time.perf_counter() - t, 3))
        got = [g["path"] for g in b.request("report")["received"]]
        assert got == [f"r/c{i}.tif" for i in range(10)]
        assert b.sender.stats["handshakes"] == 2
    finally:
        b.close()
        proc.stop()


def _many_senders(endpoint: str, n_senders: int, frames: int) -> list[dict]:
    ctx = mp.get_context("spawn")
    pipes, procs = [], []
    for k in range(n_senders):
        parent, child = ctx.Pipe()
        proc = ctx.Process(target=send_frames, args=(endpoint, f"s{k}", frames),
                           kwargs={"conn": child})
        proc.start()
        pipes.append(parent)
        procs.append(proc)
    results = [pipe.recv() if pipe.poll(300) else {"error": "timeout"} for pipe in pipes]
    for proc in procs:
        proc.join(30)
    return results


def _check_many(proc, results, n_senders: int, frames: int, figure, tag: str) -> None:
    assert all(r["error"] is None for r in results), results
    b = NapariStreamingBackend(proc.endpoint)
    try:
        received = b.request("report", timeout=30)["received"]
    finally:
        b.close()
    per_stream = defaultdict(list)
    for item in received:
        per_stream[item["stream"]].append(int(re.search(r"f(\d+)", item["path"])[1]))
    lost = n_senders * frames - len(received)
    figure(f"{tag}_frames_lost", lost)
    assert lost == 0
    for k in range(n_senders):
        assert per_stream[f"s{k}"] == list(range(frames)), f"order broken in s{k}"


def test_eight_senders_thousand_frames_each_lose_nothing(figure):
    proc = start_receiver()
    try:
        rss_before = rss_kib(proc.process.pid)
        t = time.perf_counter()
        results = _many_senders(proc.endpoint, 8, 1000)
        elapsed = time.perf_counter() - t
        rss_after = rss_kib(proc.process.pid)
        _check_many(proc, results, 8, 1000, figure, "eight_senders")
        figure("eight_senders_wall_s", round(elapsed, 2))
        figure("eight_senders_receiver_rss_growth_mib", round((rss_after - rss_before) / 1024, 1))
        # bounded: 8000 frames of 8 KiB were 62 MiB of pixels; the receiver keeps none
        assert rss_after - rss_before < 40 * 1024
    finally:
        proc.stop()


@pytest.mark.soak
def test_soak_eight_senders_twenty_thousand_frames(figure):
    proc = start_receiver()
    try:
        results = _many_senders(proc.endpoint, 8, 20_000)
        _check_many(proc, results, 8, 20_000, figure, "soak_eight_senders")
    finally:
        proc.stop()


def test_dask_workers_stream_to_one_receiver(figure):
    distributed = needs.module("distributed")
    proc = start_receiver()
    try:
        with distributed.LocalCluster(n_workers=2, threads_per_worker=1, processes=True,
                                      dashboard_address=None) as cluster, \
                distributed.Client(cluster) as client:
            futures = client.map(send_frames, [proc.endpoint] * 4, [f"s{k}" for k in range(4)],
                                 [200] * 4, pure=False)
            results = client.gather(futures)
        _check_many(proc, results, 4, 200, figure, "dask_workers")
    finally:
        proc.stop()


# -- hostile input -----------------------------------------------------------------------------


def test_fuzz_ten_thousand_hostile_messages(figure):
    hypothesis = needs.module("hypothesis")
    from hypothesis import HealthCheck, settings
    from hypothesis import strategies as st

    rx = receiver_for(NapariStreamingBackend, "tcp://127.0.0.1:0", queue_size=10).start()
    client = RawClient(rx.endpoint, token="fuzz01")
    assert isinstance(client.hello(), p.Welcome)
    seg_name = client.prefix + "0"
    segment = shared_memory.SharedMemory(name=seg_name, create=True, size=4096)
    foreign = shared_memory.SharedMemory(name=f"napari_{os.getpid()}_victim_0", create=True,
                                         size=1 << 20)
    replies = defaultdict(int)

    names = st.sampled_from([seg_name, foreign.name, "fiji_1_x_0", "../../etc/passwd",
                             seg_name + "/../x", "napari_1_fuzz01_0", "", "a" * 300,
                             client.prefix + "999", "napari_" + "\u00e9"])
    big_ints = st.one_of(st.integers(-2**70, 2**70), st.just(-1), st.just(2**63))
    shapes = st.one_of(
        st.lists(big_ints, max_size=12),
        st.lists(st.integers(4097, 2**31), min_size=1, max_size=3),  # larger than the segment
        st.text(max_size=5), st.none(),
    )
    dtypes = st.one_of(st.sampled_from(["object", "V8", "O", "<U4", "complex64", "bool",
                                        "float128", "S3", "", "uint16 "]), st.integers())
    hostile_frame = st.fixed_dictionaries(
        {"v": st.just(1), "type": st.just("frame"), "seq": st.integers(-5, 2**64),
         "stream": st.text(max_size=300), "path": st.text(max_size=50), "shape": shapes,
         "dtype": dtypes, "nbytes": big_ints, "sent_ns": st.integers(-1, 2**64),
         "segment": names, "offset": big_ints},
    )
    junk = st.one_of(
        st.binary(max_size=200),
        st.recursive(st.none() | st.booleans() | st.floats() | st.text(max_size=20),
                     lambda c: st.lists(c, max_size=4) | st.dictionaries(st.text(max_size=5), c,
                                                                         max_size=4),
                     max_leaves=12).map(lambda o: json.dumps(o).encode()),
        st.fixed_dictionaries({"v": st.integers(), "type": st.text(max_size=10)}).map(
            lambda o: json.dumps(o).encode()),
        st.just(b"{" + b'"v":1,"type":"frame","pad":"' + b"x" * 70_000 + b'"}'),
    )
    message = st.one_of(hostile_frame.map(lambda o: json.dumps(o).encode()), junk)
    count = [0]

    @settings(max_examples=10_000, deadline=None, database=None,
              suppress_health_check=list(HealthCheck))
    @hypothesis.given(message)
    def fuzz(data: bytes) -> None:
        count[0] += 1
        reply = client.request(data)
        replies[type(reply).__name__] += 1
        # honest frames are impossible here: the only readable segment is too small for
        # any shape the strategy makes, or the frame breaks another rule
        assert isinstance(reply, p.Error), (data[:200], reply)

    try:
        fuzz()
        assert rx.running
        # still serves honest traffic, and never read the foreign segment
        segment.buf[:4] = b"\x01\x02\x03\x04"
        header = {"v": 1, "type": "frame", "seq": 1, "stream": "s", "path": "s.tif",
                  "shape": [2, 2], "dtype": "uint8", "nbytes": 4, "sent_ns": 0,
                  "segment": seg_name}
        assert isinstance(client.request(json.dumps(header).encode()), p.Ack)
        figure("fuzz_messages", count[0])
        figure("fuzz_rejected", replies["Error"])
        assert count[0] >= 10_000
    finally:
        client.close()
        rx.stop()
        for s in (segment, foreign):
            s.close()
            s.unlink()


def test_oversized_message_is_refused_and_receiver_survives():
    rx = receiver_for(NapariStreamingBackend, "tcp://127.0.0.1:0", on_frame=lambda f: None,
                      max_frame_bytes=1 << 20).start()
    try:
        attacker = zmq.Context.instance().socket(zmq.DEALER)
        attacker.setsockopt(zmq.LINGER, 0)
        attacker.connect(rx.endpoint)
        attacker.send_multipart([b"{}", b"\0" * (4 << 20)])  # beyond MAXMSGSIZE: dropped
        time.sleep(0.3)
        attacker.close()
        assert rx.running
        result = send_frames(rx.endpoint, "after", 5)
        assert result["error"] is None
    finally:
        rx.stop()


# -- security ----------------------------------------------------------------------------------


def test_nothing_on_the_wire_is_pickled():
    sources = list((ROOT / "polystore" / "streaming").glob("*.py"))
    sources += list((ROOT / "viewers").rglob("*.py")) + list((ROOT / "viewers").rglob("*.groovy"))
    offenders = [str(s) for s in sources if re.search(r"\bpickle\b|ObjectInputStream",
                                                      s.read_text())]
    assert offenders == []


def test_receiver_binds_loopback_unless_asked():
    rx = receiver_for(NapariStreamingBackend, "tcp://127.0.0.1:0")
    assert "127.0.0.1" in rx.endpoint
    assert NapariStreamingBackend.default_endpoint().startswith("tcp://127.0.0.1:")
    with pytest.raises(ValueError, match="allow_remote"):
        receiver_for(NapariStreamingBackend, "tcp://0.0.0.0:0")


def test_remote_binding_with_curve_keys():
    server_public, server_secret = zmq.curve_keypair()
    rx = receiver_for(NapariStreamingBackend, "tcp://0.0.0.0:0", allow_remote=True,
                      curve_secret_key=server_secret).start()
    port = rx.endpoint.rsplit(":", 1)[1]
    try:
        good = NapariStreamingBackend(f"tcp://127.0.0.1:{port}", curve_server_key=server_public)
        good.save(np.ones((8, 8), np.uint8), "secure/a.tif")
        good.flush()
        good.close()
        assert rx.stats.frames == 1
        plain = NapariStreamingBackend(f"tcp://127.0.0.1:{port}", connect_timeout=0.5)
        with pytest.raises(ViewerNotRunningError):
            plain.save(np.ones((8, 8), np.uint8), "insecure/a.tif")
        plain.close()
        wrong_key = zmq.curve_keypair()[0]
        intruder = NapariStreamingBackend(f"tcp://127.0.0.1:{port}", curve_server_key=wrong_key,
                                          connect_timeout=0.5)
        with pytest.raises(ViewerNotRunningError):
            intruder.save(np.ones((8, 8), np.uint8), "intruder/a.tif")
        intruder.close()
        assert rx.stats.frames == 1
    finally:
        rx.stop()


def test_latest_policy_never_raises_while_the_viewer_restarts(figure):
    """A live preview keeps the pipeline running through a viewer restart, including the
    moment where something listens but does not answer yet; it then reconnects by itself."""
    seen = []
    rx = receiver_for(NapariStreamingBackend, "tcp://127.0.0.1:0",
                      on_frame=lambda f: seen.append(f.header.path)).start()
    endpoint = rx.endpoint
    b = NapariStreamingBackend(endpoint, policy="latest")
    frame = np.zeros((32, 32), np.uint16)
    try:
        b.save(frame, "a/t0.tif")
        b.flush()
        rx.stop()
        mute = zmq.Context.instance().socket(zmq.ROUTER)  # listens, never answers
        mute.setsockopt(zmq.LINGER, 0)
        _until_port_free(lambda: mute.bind(endpoint))
        in_save = 0.0  # the saves' own time (a sleep overshooting on a busy machine is not)
        for i in range(200):
            t = time.perf_counter()
            b.save(frame, f"a/mute{i}.tif")  # must neither raise nor stall
            in_save += time.perf_counter() - t
            time.sleep(0.002)
        assert in_save / 200 < 0.01, f"a save took {in_save / 200 * 1000:.1f} ms on average"
        mute.close()
        rx = _bind_when_free(endpoint, on_frame=lambda f: seen.append(f.header.path))
        t = time.perf_counter()
        deadline = t + 10
        i = 0
        while not any(s.startswith("a/back") for s in seen) and time.perf_counter() < deadline:
            b.save(frame, f"a/back{i}.tif")
            i += 1
            time.sleep(0.005)
        figure("latest_reconnect_after_restart_s", round(time.perf_counter() - t, 3))
        assert any(s.startswith("a/back") for s in seen)
        assert b.sender.stats["dropped"] >= 200
    finally:
        b.close()
        rx.stop()


def test_request_under_latest_waits_for_the_restarted_viewer():
    """Policy 'latest' drops frames while a restarted viewer is not answering yet, but a
    `request()` asks for an answer: it used to raise "not connected (yet)" at once instead of
    saying hello and waiting for the welcome (within connect_timeout)."""
    rx = receiver_for(NapariStreamingBackend, "tcp://127.0.0.1:0").start()
    endpoint = rx.endpoint
    b = NapariStreamingBackend(endpoint, policy="latest", connect_timeout=5)
    try:
        b.save(np.zeros((8, 8), np.uint16), "req/t0.tif")
        b.flush()
        rx.stop()
        rx = _bind_when_free(endpoint)
        report = b.request("report")
        assert report["receiver"] == rx.id
        assert b.request("clear") == {}
    finally:
        b.close()
        rx.stop()


def freeze(pid: int, deadline: float = 30.0) -> None:
    """Stop process `pid` (SIGSTOP) and wait until it is stopped: the signal takes effect
    when the process next runs, so right after kill() it may still answer (seen on a loaded
    machine: /proc state still R)."""
    os.kill(pid, signal.SIGSTOP)
    end = time.monotonic() + deadline
    while Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] not in ("T", "t"):
        assert time.monotonic() < end, f"process {pid} did not stop"
        time.sleep(0.01)


def test_latest_policy_never_stalls_while_the_viewer_is_frozen():
    """A frozen viewer (stopped in a debugger, swapped out) keeps its connection up but reads
    nothing. Under policy 'latest' the sender used to wait the full timeout (5 s) once the
    queue to it was full, and then 1 s on every later save, for its hello to get room."""
    rx = start_receiver()
    frame = np.zeros((32, 32), np.uint16)
    b = NapariStreamingBackend(rx.endpoint, policy="latest")
    try:
        b.save(frame, "frozen/t0.tif")
        b.flush()
        freeze(rx.process.pid)
        slowest, saves = 0.0, 0
        end = time.monotonic() + 4
        while time.monotonic() < end:  # long enough to fill every queue on the way
            t = time.monotonic()
            b.save(frame, f"frozen/t{saves + 1}.tif")
            slowest = max(slowest, time.monotonic() - t)
            saves += 1
        assert slowest < 0.5, f"a save took {slowest:.2f} s while the viewer was frozen"
        assert b.sender.stats.dropped > 0
        acked = b.sender.stats.acked
        os.kill(rx.process.pid, signal.SIGCONT)
        deadline = time.monotonic() + 30
        while b.sender.stats.acked == acked and time.monotonic() < deadline:
            b.save(frame, "frozen/back.tif")  # it comes back by itself
            time.sleep(0.005)
        assert b.sender.stats.acked > acked
    finally:
        with contextlib.suppress(ProcessLookupError):
            os.kill(rx.process.pid, signal.SIGCONT)
        b.close()
        rx.stop()



@pytest.mark.parametrize("transport", ["auto", "shm"])
def test_a_viewer_frozen_through_several_handshakes_serves_by_shared_memory_when_it_thaws(
        transport):
    """Each save at a frozen viewer (policy block) gives up its handshake after
    `connect_timeout`, while the hello waits unread on the link. Before: every save sent
    another hello and unlinked the probe of the last one, and after SIGCONT the welcome to the
    oldest hello (its probe gone: `shm: false`) was taken as the answer to the newest, so the
    sender streamed inline for good (transport 'auto') or reported, save after save, that the
    viewer cannot read its shared memory (transport 'shm')."""
    rx = start_receiver()
    frame = np.zeros((32, 32), np.uint16)
    b = NapariStreamingBackend(rx.endpoint, timeout=1.0, connect_timeout=1.0, max_inflight=4,
                               transport=transport)
    try:
        b.save(frame, "thaw/first.tif")
        b.flush()
        assert b.sender.uses_shared_memory
        freeze(rx.process.pid)
        failed = 0
        for i in range(8):  # fills the window, then each save tries a handshake of its own
            try:
                b.save(frame, f"thaw/frozen{i}.tif")
            except (ReceiverLostError, ViewerNotRunningError) as exc:
                assert "shared memory" not in str(exc)
                failed += 1
        assert failed >= 3
        os.kill(rx.process.pid, signal.SIGCONT)
        errors, deadline = [], time.monotonic() + 30
        while time.monotonic() < deadline:  # the viewer answers again
            try:
                b.save(frame, "thaw/back.tif")
                break
            except ViewerNotRunningError as exc:
                errors.append(str(exc))
        assert not [e for e in errors if "shared memory" in e], errors
        for i in range(3):
            b.save(frame, f"thaw/after{i}.tif")
        b.flush()
        assert b.sender.uses_shared_memory, "streams inline since the viewer thawed"
        got = [g["path"] for g in b.request("report")["received"]]
        assert got[-4:] == ["thaw/back.tif"] + [f"thaw/after{i}.tif" for i in range(3)]
    finally:
        with contextlib.suppress(ProcessLookupError):
            os.kill(rx.process.pid, signal.SIGCONT)
        b.close()
        rx.stop()
    assert my_segments() == []


def test_a_receiver_that_dies_while_a_save_waits_for_room_is_lost_at_once():
    """A frozen viewer's queue fills, so a save waits for room to send; the viewer is then
    killed. The save watched for room only, not for the link's events, and gave up after its
    whole timeout (30 s here) with "it took no message within the timeout"; it now knows at
    once that the receiver disconnected."""
    import threading

    endpoint = free_endpoint()
    rx = start_receiver(endpoint)
    b = NapariStreamingBackend(endpoint, timeout=30.0, max_inflight=100_000,
                               transport="inline")
    frame = np.zeros((64, 64), np.uint16)
    killed: list[float] = []

    def kill_later() -> None:
        time.sleep(2.0)  # by now the save below is waiting for room
        os.kill(rx.process.pid, signal.SIGKILL)
        killed.append(time.monotonic())

    try:
        b.save(frame, "room/first.tif")
        b.flush()
        freeze(rx.process.pid)
        killer = threading.Thread(target=kill_later)
        killer.start()
        with pytest.raises(ReceiverLostError, match="disconnected"):
            for i in range(100_000):
                b.save(frame, f"room/{i}.tif")
        noticed = time.monotonic() - killed[0]
        killer.join(10)
        assert noticed < 10, f"the save noticed the dead receiver after {noticed:.1f} s"
    finally:
        rx.process.join(10)
        b.close()


def test_a_viewer_restarted_while_a_hello_waits_is_greeted_again_in_the_same_save():
    """The hello of a save went to a frozen viewer, which is then killed and started again
    on its port. The save waited for a welcome on the socket only, not for link events: the
    hello was lost with the old link, and the save gave up after its whole connect_timeout
    although the new viewer was up within a second or two. It now says hello again on the
    new link and goes on."""
    import threading

    endpoint = free_endpoint()
    rx = start_receiver(endpoint)
    frame = np.zeros((32, 32), np.uint16)
    b = NapariStreamingBackend(endpoint, timeout=1.0, connect_timeout=20.0, max_inflight=2)
    restarted: list = []

    def restart() -> None:
        time.sleep(1.0)  # the save below is waiting for its welcome by now
        rx.process.kill()
        rx.process.join(10)
        restarted.append(start_receiver(endpoint))

    try:
        b.save(frame, "again/first.tif")
        b.flush()
        freeze(rx.process.pid)
        with pytest.raises(ReceiverLostError):
            for i in range(4):  # fills the window; the next credit never comes
                b.save(frame, f"again/frozen{i}.tif")
        killer = threading.Thread(target=restart)
        killer.start()
        t = time.monotonic()
        b.save(frame, "again/back.tif")  # its hello goes to the frozen viewer first
        took = time.monotonic() - t
        killer.join(30)
        b.flush()
        assert took < 15, f"the save waited {took:.1f} s for a viewer up since the restart"
        assert [g["path"] for g in b.request("report")["received"]] == ["again/back.tif"]
    finally:
        with contextlib.suppress(ProcessLookupError):
            os.kill(rx.process.pid, signal.SIGCONT)
        b.close()
        rx.stop()
        for new in restarted:
            new.stop()
    assert my_segments() == []


def test_a_sender_dropped_unclosed_while_its_hello_waits_at_a_frozen_viewer_leaves_no_probe():
    """A hello to a frozen viewer stays pending with its probe (see the test above) until it
    is answered; a backend the program drops without close() must still take the probe out
    of /dev/shm (its segment pool does the same for its segments)."""
    import gc

    rx = start_receiver()
    frame = np.zeros((32, 32), np.uint16)
    b = NapariStreamingBackend(rx.endpoint, timeout=1.0, connect_timeout=0.5, max_inflight=2)
    try:
        b.save(frame, "drop/first.tif")
        b.flush()
        freeze(rx.process.pid)
        with pytest.raises((ReceiverLostError, ViewerNotRunningError)):
            for i in range(6):  # fills the window; then a handshake times out
                b.save(frame, f"drop/{i}.tif")
        with pytest.raises(ViewerNotRunningError):
            b.save(frame, "drop/hello.tif")
        del b
        gc.collect()
        assert my_segments() == []
    finally:
        with contextlib.suppress(ProcessLookupError):
            os.kill(rx.process.pid, signal.SIGCONT)
        rx.stop()

def _until_port_free(bind):
    """ZeroMQ releases a closed socket's port in its I/O thread, a moment later."""
    deadline = time.monotonic() + 5
    while True:
        try:
            return bind()
        except (OSError, zmq.ZMQError):
            if time.monotonic() > deadline:
                raise
            time.sleep(0.05)


def _bind_when_free(endpoint: str, **kwargs):
    return _until_port_free(
        lambda: receiver_for(NapariStreamingBackend, endpoint, **kwargs).start())


def test_curve_key_files_from_polystore_keys(tmp_path, monkeypatch):
    """The documented flow: `polystore keys DIR`, the secret file on the viewer, the public
    file in $POLYSTORE_NAPARI_SERVER_KEY on the pipeline side."""
    out = subprocess.run([sys.executable, "-m", "polystore.cli", "keys", str(tmp_path)],
                         capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, out.stderr
    public, secret = tmp_path / "viewer.key", tmp_path / "viewer.key_secret"
    assert public.is_file() and secret.is_file()
    assert oct(secret.stat().st_mode & 0o777) == "0o600"
    again = subprocess.run([sys.executable, "-m", "polystore.cli", "keys", str(tmp_path)],
                           capture_output=True, text=True, timeout=60)
    assert again.returncode == 1 and "exists" in again.stderr  # never overwrites a key
    rx = receiver_for(NapariStreamingBackend, "tcp://0.0.0.0:0", allow_remote=True,
                      curve_secret_key=str(secret), on_frame=lambda f: None).start()
    port = rx.endpoint.rsplit(":", 1)[1]
    try:
        monkeypatch.setenv("POLYSTORE_NAPARI_SERVER_KEY", str(public))
        with NapariStreamingBackend(f"tcp://127.0.0.1:{port}") as b:
            b.save(np.ones((8, 8), np.uint8), "keys/a.tif")
            b.flush()
        assert rx.stats.frames == 1
        with pytest.raises(ValueError, match="key file"):
            NapariStreamingBackend(curve_server_key=str(tmp_path / "missing.key"))
    finally:
        rx.stop()
