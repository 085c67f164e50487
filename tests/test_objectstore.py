"""Object stores end to end: a real S3 server (moto's, started and stopped here on
127.0.0.1 with IAM authentication on), reached through s3fs by the zarr and objectstore
backends. Credentials come only from the environment; proxies point at a dead loopback port
so a request for any other address fails instead of leaving the machine."""

from __future__ import annotations

import json
import os
import socket
import struct
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass

import numpy as np
import pytest

from tests import needs

needs.module("s3fs")
needs.module("moto")
boto3 = needs.module("boto3")

from polystore import BackendRegistry, DiskBackend, FileManager  # noqa: E402
from polystore.backends import ObjectStoreBackend  # noqa: E402
from polystore.errors import UnsupportedOperationError  # noqa: E402
from polystore.streaming import Roi  # noqa: E402
from polystore.zarr import ZarrBackend  # noqa: E402

BUCKET = "polystore-test"
#: quick failure when the server is gone: few retries, short timeouts
FAIL_FAST = {"config_kwargs": {"retries": {"max_attempts": 1},
                                              "connect_timeout": 2, "read_timeout": 10}}


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_for_port(port: int, timeout: float = 60) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            socket.create_connection(("127.0.0.1", port), 0.2).close()
            return
        except OSError:
            time.sleep(0.1)
    raise RuntimeError(f"nothing listens on 127.0.0.1:{port} after {timeout} s")


@dataclass
class S3Server:
    endpoint: str
    key: str
    secret: str

    def options(self, endpoint: str | None = None, **extra) -> dict:
        """storage_options: only where the server is; credentials come from the env."""
        return {"endpoint_url": endpoint or self.endpoint, **extra}

    def client(self):
        return boto3.client("s3", endpoint_url=self.endpoint, aws_access_key_id=self.key,
                            aws_secret_access_key=self.secret, region_name="us-east-1")

    def keys(self, prefix: str = "") -> list[str]:
        listing = self.client().list_objects_v2(Bucket=BUCKET, Prefix=prefix)
        return sorted(o["Key"] for o in listing.get("Contents", []))


@contextmanager
def moto_server(authenticate: bool) -> Iterator[S3Server]:
    """moto's S3 server on 127.0.0.1 and an environment that reaches only it.

    With ``authenticate`` moto checks every request against its IAM users (after the three
    unauthenticated calls that create ours). moto's signature check mishandles listings with
    a delimiter, so only the refused-credentials test uses that mode.
    """
    port = free_port()
    env = {**os.environ}
    if authenticate:
        env["INITIAL_NO_AUTH_ACTION_COUNT"] = "3"
    server = subprocess.Popen([sys.executable, "-m", "moto.server", "-H", "127.0.0.1", "-p",
                               str(port)], env=env, stdout=subprocess.DEVNULL,
                              stderr=subprocess.DEVNULL)
    patch = pytest.MonkeyPatch()
    try:
        wait_for_port(port)
        endpoint = f"http://127.0.0.1:{port}"
        for name in ("AWS_PROFILE", "AWS_SESSION_TOKEN", "AWS_ENDPOINT_URL"):
            patch.delenv(name, raising=False)
        patch.setenv("AWS_CONFIG_FILE", os.devnull)
        patch.setenv("AWS_SHARED_CREDENTIALS_FILE", os.devnull)
        patch.setenv("AWS_EC2_METADATA_DISABLED", "true")
        patch.setenv("AWS_DEFAULT_REGION", "us-east-1")
        for name in ("HTTP_PROXY", "HTTPS_PROXY", "http_proxy", "https_proxy"):
            patch.setenv(name, "http://127.0.0.1:9")  # anything not loopback goes nowhere
        patch.setenv("NO_PROXY", "127.0.0.1")
        patch.setenv("no_proxy", "127.0.0.1")
        key, secret = "polystore-test-key", "polystore-test-secret"
        if authenticate:
            iam = boto3.client("iam", endpoint_url=endpoint, aws_access_key_id="bootstrap",
                               aws_secret_access_key="bootstrap", region_name="us-east-1")
            iam.create_user(UserName="polystore")
            iam.put_user_policy(UserName="polystore", PolicyName="all",
                                PolicyDocument=json.dumps({"Version": "2012-10-17", "Statement": [
                                    {"Effect": "Allow", "Action": "*", "Resource": "*"}]}))
            access = iam.create_access_key(UserName="polystore")["AccessKey"]
            key, secret = access["AccessKeyId"], access["SecretAccessKey"]
        patch.setenv("AWS_ACCESS_KEY_ID", key)
        patch.setenv("AWS_SECRET_ACCESS_KEY", secret)
        info = S3Server(endpoint, key, secret)
        info.client().create_bucket(Bucket=BUCKET)
        yield info
    finally:
        patch.undo()
        server.terminate()
        server.wait(20)


@pytest.fixture(scope="module")
def s3() -> Iterator[S3Server]:
    with moto_server(authenticate=False) as server:
        yield server


class CuttableProxy:
    """A TCP proxy on 127.0.0.1 that can drop the line: after `limit` request bytes, or on
    `cut()`, it closes every connection and refuses new ones."""

    def __init__(self, target_port: int, limit: int | None = None) -> None:
        self.target_port, self.limit = target_port, limit
        self.listener = socket.create_server(("127.0.0.1", 0))
        self.port = self.listener.getsockname()[1]
        self.forwarded = 0
        self.cut_event = threading.Event()
        self.sockets: list[socket.socket] = []
        self.lock = threading.Lock()
        threading.Thread(target=self._accept, daemon=True).start()

    @property
    def endpoint(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def _accept(self) -> None:
        while not self.cut_event.is_set():
            try:
                client, _ = self.listener.accept()
            except OSError:
                return
            upstream = socket.create_connection(("127.0.0.1", self.target_port))
            with self.lock:
                self.sockets += [client, upstream]
            threading.Thread(target=self._pump, args=(client, upstream, True), daemon=True).start()
            threading.Thread(target=self._pump, args=(upstream, client, False), daemon=True).start()

    def _pump(self, src: socket.socket, dst: socket.socket, upload: bool) -> None:
        try:
            while not self.cut_event.is_set():
                data = src.recv(65536)
                if not data:
                    break
                if upload and self.limit is not None:
                    with self.lock:
                        room = self.limit - self.forwarded
                        self.forwarded += len(data)
                    if room < len(data):
                        dst.sendall(data[:max(room, 0)])
                        self.cut()
                        return
                dst.sendall(data)
        except OSError:
            pass

    def cut(self) -> None:
        self.cut_event.set()
        self.listener.close()
        with self.lock:
            for sock in self.sockets:
                try:  # reset, like a dropped line: the peer's next read or write fails
                    sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
                    sock.shutdown(socket.SHUT_RDWR)
                except OSError:
                    pass
                sock.close()


def s3_registry(s3: S3Server, endpoint: str | None = None, timeout: float = 300,
                **extra) -> FileManager:
    options = s3.options(endpoint, **extra)
    return FileManager(BackendRegistry({
        "zarr": ZarrBackend(storage_options=options),
        "objectstore": ObjectStoreBackend(storage_options=options, timeout=timeout),
    }, entry_points=False))


# -- zarr on S3 -------------------------------------------------------------------------------


def test_zarr_round_trip_on_s3(s3):
    fm = s3_registry(s3)
    data = np.random.default_rng(1).integers(0, 60000, (3, 2, 64, 80)).astype("uint16")
    root = f"s3://{BUCKET}/run1/plate.zarr"
    fm.save(data, f"{root}/A/1/0", backend="zarr")
    np.testing.assert_array_equal(fm.load(f"{root}/A/1/0", backend="zarr"), data)
    assert "run1/plate.zarr/A/1/0/zarr.json" in s3.keys("run1/")
    for t in range(3):  # a live series grows on S3 too
        fm.save(data[t, 0], f"{root}/live/t{t:03d}", backend="zarr")
    assert fm.load(f"{root}/live", backend="zarr").shape == (3, 64, 80)
    lazy = fm.load(f"{root}/A/1/0", backend="zarr", lazy=True)
    np.testing.assert_array_equal(lazy[2, 1], data[2, 1])
    assert fm.list_files(root, backend="zarr", recursive=True) == [f"{root}/A/1/0",
                                                                    f"{root}/live"]
    assert fm.is_dir(f"{root}/A", backend="zarr") and fm.is_file(f"{root}/live", backend="zarr")
    fm.delete(f"{root}/A", backend="zarr", recursive=True)
    assert not fm.exists(f"{root}/A/1/0", backend="zarr")
    assert not [k for k in s3.keys("run1/plate.zarr/A")]


@pytest.mark.filterwarnings("ignore:Consolidated metadata")
def test_zarr_on_s3_keeps_consolidated_metadata_true(s3):
    import zarr
    from zarr.storage import FsspecStore

    fm = s3_registry(s3)
    root = f"s3://{BUCKET}/consolidated.zarr"
    fm.save(np.ones((2, 2), "uint8"), f"{root}/a", backend="zarr")
    store = FsspecStore.from_url(root, storage_options=s3.options(), read_only=False)
    zarr.consolidate_metadata(store)
    fm.save(np.full((3, 3), 4, "uint8"), f"{root}/b", backend="zarr")
    fm.delete(f"{root}/a", backend="zarr")
    group = zarr.open_group(store, mode="r", use_consolidated=True)
    assert sorted(group.keys()) == ["b"]
    assert group["b"][:].sum() == 36


def test_ome_zarr_plate_on_s3_is_valid(s3):
    import zarr
    from ome_zarr_models.v05.hcs import HCS

    fm = s3_registry(s3)
    wells = {"A/1": [np.full((32, 32), 5, "uint8")], "B/2": [np.full((32, 32), 7, "uint8")]}
    url = f"s3://{BUCKET}/plates/p1.ome.zarr"
    fm.save(wells, url, backend="zarr", ome="plate", levels=2)
    group = zarr.open_group(store=fm.get_backend("zarr").store(url), mode="r")
    plate = HCS.from_zarr(group)
    assert [w.path for w in plate.ome_attributes.plate.wells] == ["A/1", "B/2"]
    assert int(fm.load(f"{url}/B/2/0", backend="zarr").max()) == 7


def test_zarr_to_a_missing_bucket_says_so_and_writes_nothing(s3):
    fm = s3_registry(s3)
    with pytest.raises(FileNotFoundError, match="no-such-bucket.*bucket exist"):
        fm.save(np.zeros((4, 4)), "s3://no-such-bucket/x.zarr/a", backend="zarr")
    assert "no-such-bucket" not in [b["Name"] for b in s3.client().list_buckets()["Buckets"]]


def test_refused_credentials_are_reported():
    with moto_server(authenticate=True) as server:
        good = s3_registry(server)
        good.save(b"allowed", f"s3://{BUCKET}/ok.bin", backend="objectstore")  # keys from env
        with pytest.MonkeyPatch.context() as patch:
            patch.setenv("AWS_ACCESS_KEY_ID", "AKIANOTAUSER00000000")
            patch.setenv("AWS_SECRET_ACCESS_KEY", "wrong")
            fm = s3_registry(server)
            with pytest.raises(PermissionError, match="refused.*AWS_ACCESS_KEY_ID"):
                fm.save(b"secret", f"s3://{BUCKET}/refused/a.bin", backend="objectstore")
            with pytest.raises(PermissionError, match="refused.*credentials"):
                fm.save(np.zeros((4, 4)), f"s3://{BUCKET}/refused/x.zarr/a", backend="zarr")
        assert server.keys() == ["ok.bin"]


# -- the byte-level objectstore backend ---------------------------------------------------------


def test_objectstore_round_trips_files(s3):
    fm = s3_registry(s3)
    base = f"s3://{BUCKET}/files"
    image = np.arange(64 * 48, dtype="uint16").reshape(64, 48)
    fm.save(image, f"{base}/A01/t000.tif", backend="objectstore")
    fm.save(image, f"{base}/A01/t000.npy", backend="objectstore")
    fm.save({"gain": 2, "ok": True}, f"{base}/meta.json", backend="objectstore")
    fm.save("a,b\n1,2\n", f"{base}/table.csv", backend="objectstore")
    fm.save(b"\x00\x01raw", f"{base}/blob.bin", backend="objectstore")
    fm.save([Roi("rectangle", [[1, 2], [5, 9]], "box")], f"{base}/A01/cells.roi.zip",
            backend="objectstore", axes={"t": 0})
    np.testing.assert_array_equal(fm.load(f"{base}/A01/t000.tif", backend="objectstore"), image)
    np.testing.assert_array_equal(fm.load(f"{base}/A01/t000.npy", backend="objectstore"), image)
    assert fm.load(f"{base}/meta.json", backend="objectstore") == {"gain": 2, "ok": True}
    assert fm.load(f"{base}/table.csv", backend="objectstore") == "a,b\n1,2\n"
    assert fm.load(f"{base}/blob.bin", backend="objectstore") == b"\x00\x01raw"
    assert fm.load(f"{base}/A01/cells.roi.zip", backend="objectstore") == [
        Roi("rectangle", [[1, 2], [5, 9]], "box")]
    backend = fm.get_backend("objectstore")
    assert backend.can_hold_bytes
    assert backend.read_bytes(f"{base}/blob.bin") == b"\x00\x01raw"
    assert fm.list_files(base, backend="objectstore") == [
        f"{base}/blob.bin", f"{base}/meta.json", f"{base}/table.csv"]
    assert fm.list_files(base, backend="objectstore", recursive=True, extensions=[".tif"]) == [
        f"{base}/A01/t000.tif"]
    assert fm.list_dir(base, backend="objectstore") == ["A01", "blob.bin", "meta.json",
                                                         "table.csv"]
    assert fm.is_dir(f"{base}/A01", backend="objectstore")
    assert fm.is_file(f"{base}/blob.bin", backend="objectstore")
    with pytest.raises(OSError, match="recursive=True"):
        fm.delete(f"{base}/A01", backend="objectstore")
    fm.delete(f"{base}/A01", backend="objectstore", recursive=True)
    fm.delete(f"{base}/blob.bin", backend="objectstore")
    assert s3.keys("files/") == ["files/meta.json", "files/table.csv"]
    with pytest.raises(FileNotFoundError, match="nothing at .*gone.bin"):
        fm.load(f"{base}/gone.bin", backend="objectstore")
    with pytest.raises(FileNotFoundError, match="no-such-bucket.*bucket exist"):
        fm.save(b"x", "s3://no-such-bucket/a.bin", backend="objectstore")
    with pytest.raises(ValueError, match="URLs such as 's3://bucket/key'"):
        fm.save(b"x", "relative/a.bin", backend="objectstore")


def test_a_tree_moves_out_of_and_within_an_object_store(s3, tmp_path):
    """A prefix is gone with its last object, so removing the source's "directories" after
    their files failed: every tree move raised TransferError after it had succeeded, and a
    missing object's delete was reported as a write to a missing bucket."""
    fm = s3_registry(s3)
    fm.register_backend("disk", DiskBackend(tmp_path))
    base = f"s3://{BUCKET}/trees"
    fm.save(np.arange(3), f"{base}/run/a.npy", backend="objectstore")
    fm.save(np.arange(4), f"{base}/run/sub/b.npy", backend="objectstore")
    fm.move(f"{base}/run", "back", src_backend="objectstore", dst_backend="disk")
    assert sorted(fm.list_files("back", "disk", recursive=True)) == ["back/a.npy",
                                                                      "back/sub/b.npy"]
    assert s3.keys("trees/") == []
    fm.move("back", f"{base}/again", src_backend="disk", dst_backend="objectstore")
    fm.move(f"{base}/again", f"{base}/moved", "objectstore")
    assert s3.keys("trees/") == ["trees/moved/a.npy", "trees/moved/sub/b.npy"]
    with pytest.raises(FileNotFoundError, match="nothing at .*gone.bin") as missing:
        fm.delete(f"{base}/gone.bin", backend="objectstore")
    assert "bucket" not in str(missing.value)


def test_an_object_that_is_also_a_prefix_is_never_lost_by_a_move(s3, tmp_path):
    """S3 holds 'run1' and 'run1/part.bin' at once: a move copied only part.bin, then deleted
    the 'directory' run1, which deleted the object run1 that was never copied."""
    fm = s3_registry(s3)
    fm.register_backend("disk", DiskBackend(tmp_path))
    base = f"s3://{BUCKET}/dual"
    fm.save(b"the object", f"{base}/run1", backend="objectstore")
    fm.save(b"under it", f"{base}/run1/part.bin", backend="objectstore")
    for src in (f"{base}/run1", base):  # the path itself, or a tree holding one
        with pytest.raises(UnsupportedOperationError, match="both a file and a directory"):
            fm.move(src, "out", src_backend="objectstore", dst_backend="disk")
    assert s3.keys("dual/") == ["dual/run1", "dual/run1/part.bin"]
    assert not (tmp_path / "out").exists()
    # a prefix deleted without recursive=True: said as such, not as a lost connection
    with pytest.raises(OSError, match="holds objects.*recursive=True") as refused:
        fm.delete(base, backend="objectstore")
    assert not isinstance(refused.value, ConnectionError)
    assert s3.keys("dual/") == ["dual/run1", "dual/run1/part.bin"]


def test_dropped_connection_mid_upload_leaves_no_partial_object(s3):
    """The line drops after 64 KiB of a 2 MiB upload: a clear error, and neither the object
    nor the zarr array becomes visible."""
    port = int(s3.endpoint.rsplit(":", 1)[1])
    proxy = CuttableProxy(port, limit=64 * 1024)
    fm = s3_registry(s3, proxy.endpoint, timeout=15, **FAIL_FAST)
    payload = np.random.default_rng(2).bytes(2 * 1024 * 1024)
    started = time.monotonic()
    with pytest.raises(ConnectionError, match="did not answer.*nothing was written"):
        fm.save(payload, f"s3://{BUCKET}/dropped/big.bin", backend="objectstore")
    assert time.monotonic() - started < 60
    assert s3.keys("dropped/") == []

    proxy = CuttableProxy(port, limit=256 * 1024)
    fm = s3_registry(s3, proxy.endpoint, **FAIL_FAST)
    noise = np.random.default_rng(3).integers(0, 65535, (8, 256, 256)).astype("uint16")
    with pytest.raises(ConnectionError, match="did not answer"):
        fm.save(noise, f"s3://{BUCKET}/dropped/x.zarr/stack", backend="zarr", compression="none")
    # chunks may have landed, but no metadata: no array is visible to any reader
    assert "dropped/x.zarr/stack/zarr.json" not in s3.keys("dropped/")
    assert not s3_registry(s3).exists(f"s3://{BUCKET}/dropped/x.zarr/stack", backend="zarr")


def test_a_server_that_is_gone_gives_a_clear_error(s3):
    port = int(s3.endpoint.rsplit(":", 1)[1])
    proxy = CuttableProxy(port)
    fm = s3_registry(s3, proxy.endpoint, **FAIL_FAST)
    fm.save(b"first", f"s3://{BUCKET}/gone/a.bin", backend="objectstore")
    proxy.cut()
    with pytest.raises(ConnectionError, match="did not answer.*retry"):
        fm.load(f"s3://{BUCKET}/gone/a.bin", backend="objectstore")
    with pytest.raises(ConnectionError, match="did not answer"):
        fm.load(f"s3://{BUCKET}/gone/x.zarr/a", backend="zarr")
    # botocore's own connection errors are not OSErrors; a write still says nothing landed
    with pytest.raises(ConnectionError, match="did not answer.*retry; nothing was written"):
        fm.save(b"second", f"s3://{BUCKET}/gone/b.bin", backend="objectstore")
    with pytest.raises(ConnectionError, match="did not answer.*retry; no array was written"):
        fm.save(np.zeros((4, 4), "uint8"), f"s3://{BUCKET}/gone/y.zarr/a", backend="zarr")
