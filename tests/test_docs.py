"""The documentation site builds without a warning, and its examples run.

`mkdocs build --strict` fails on any warning: a page in the nav that does not exist, a
link or anchor to nowhere. Every ```python block of the pages below runs, in order, in one
namespace per page, in a fresh process (so example backends do not register in this one),
with Python receivers standing in for napari and Fiji. A block preceded by a
``<!-- no-test: why -->`` line is skipped (fragments, things needing a network or a cluster).
"""

from __future__ import annotations

import json
import re
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
DOCS = ROOT / "docs"
RUNNABLE_PAGES = ["quickstart.md", "concepts.md", "custom_backends.md", "streaming.md",
                  "migrating.md", "zarr.md"]

BLOCK = re.compile(r"^(?P<marker><!-- no-test[^>]*-->\n)?```python\n(?P<code>.*?)^```$",
                   re.MULTILINE | re.DOTALL)

RUNNER = textwrap.dedent('''
    import json, os, sys, traceback
    from polystore.streaming import FijiStreamingBackend, NapariStreamingBackend, receiver_for

    page, blocks = json.load(open(sys.argv[1]))
    # stand-ins for napari and Fiji, found through the endpoint environment variables
    receivers = [receiver_for(cls, "tcp://127.0.0.1:0", on_frame=lambda f: None,
                              on_rois=lambda r: None).start()
                 for cls in (NapariStreamingBackend, FijiStreamingBackend)]
    os.environ["POLYSTORE_NAPARI_ENDPOINT"] = receivers[0].endpoint
    os.environ["POLYSTORE_FIJI_ENDPOINT"] = receivers[1].endpoint
    namespace = {"__name__": "docs_example"}
    status = 0
    for line, code in blocks:
        try:
            exec(compile(code, f"docs/{page}, block at line {line}", "exec"), namespace)
        except BaseException:
            traceback.print_exc()
            print(f"FAILED: the block at line {line} of docs/{page}")
            status = 1
            break
    from polystore.streaming.delivery import _live_senders
    for sender in list(_live_senders):
        sender.close()
    for receiver in receivers:
        receiver.stop()
    if status == 0:
        print(f"ran {len(blocks)} block(s)")
    sys.exit(status)
''')


def python_blocks(page: str) -> list[tuple[int, str]]:
    """(line number, code) of every runnable ```python block of a docs page."""
    text = (DOCS / page).read_text(encoding="utf-8")
    blocks = []
    for match in BLOCK.finditer(text):
        if match["marker"]:
            continue
        line = text.count("\n", 0, match.start("code")) + 1
        blocks.append((line, match["code"]))
    return blocks


def test_mkdocs_build_strict(tmp_path):
    result = subprocess.run(
        [sys.executable, "-m", "mkdocs", "build", "--strict", "--config-file",
         str(ROOT / "mkdocs.yml"), "--site-dir", str(tmp_path / "site")],
        capture_output=True, text=True, cwd=ROOT, timeout=120,
    )  # fmt: skip
    output = result.stdout + result.stderr
    assert result.returncode == 0, f"mkdocs build --strict failed:\n{output}"
    assert "WARNING" not in output, output
    assert (tmp_path / "site" / "custom_backends" / "index.html").is_file()


def test_nav_lists_every_page():
    nav = (ROOT / "mkdocs.yml").read_text(encoding="utf-8")
    for page in ["index.md", "quickstart.md", "concepts.md", "custom_backends.md",
                 "streaming.md", "protocol.md", "napari.md", "fiji.md", "performance.md",
                 "reliability.md", "zarr.md"]:  # fmt: skip
        assert re.search(rf":\s+{re.escape(page)}\s*$", nav, re.MULTILINE), page


@pytest.mark.parametrize("page", RUNNABLE_PAGES)
def test_examples_run(page, tmp_path):
    blocks = python_blocks(page)
    assert blocks, f"no runnable example in docs/{page}"
    spec = tmp_path / "blocks.json"
    spec.write_text(json.dumps([page, blocks]))
    script = tmp_path / "run_blocks.py"
    script.write_text(RUNNER)
    work = tmp_path / "work"
    work.mkdir()
    result = subprocess.run([sys.executable, str(script), str(spec)], capture_output=True,
                            text=True, cwd=work, timeout=180)
    assert result.returncode == 0, result.stdout + result.stderr
    assert f"ran {len(blocks)} block(s)" in result.stdout


def test_custom_backends_guide_covers_the_seed_guide():
    """Every topic of the original custom-backends guide has a section of its own."""
    headings = [line.lower() for line in (DOCS / "custom_backends.md").read_text().splitlines()
                if line.startswith("#")]
    for topic in ["basic backend", "read-only", "context manager", "compression", "caching",
                  "database", "testing", "extension filtering", "best practices",
                  "publishing"]:  # fmt: skip
        assert any(topic in h for h in headings), f"no section about {topic!r}"
    text = (DOCS / "custom_backends.md").read_text()
    for needle in ["polystore.backends", "SUPPORTED_EXTENSIONS", "_filter_streamable_files",
                   "[project.entry-points", "BackendNotInstantiableError"]:  # fmt: skip
        assert needle in text, needle


def test_readme_links_and_commands():
    readme = (ROOT / "README.md").read_text(encoding="utf-8")
    assert "bash scripts/install.sh && polystore demo" in readme
    assert "bash scripts/test.sh" in readme
    for target in re.findall(r"\]\(([^)#]+)\)", readme):
        if not target.startswith(("http://", "https://")):
            assert (ROOT / target).exists(), f"README links to missing {target}"


def test_both_viewers_have_a_screenshot_of_every_shared_scene():
    """Issue 14's acceptance: napari and Fiji screenshots of the same data. The scenes live
    once in scripts/scenes.py; napari's pictures used to come from other data in the tests."""
    scenes = re.findall(r'^    "(\w+)": scene_\w+,$', (ROOT / "scripts" / "scenes.py").read_text(),
                        re.MULTILINE)
    assert set(scenes) >= {"channels", "labels", "rois", "rgb"}
    for viewer, page in (("napari", "napari.md"), ("fiji", "fiji.md")):
        text = (DOCS / page).read_text(encoding="utf-8")
        script = (ROOT / "scripts" / f"{viewer}_screenshots.py").read_text()
        assert "from scenes import SCENES" in script
        for scene in scenes:
            image = f"images/{viewer}_{scene}.png"
            assert (DOCS / image).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n", image
            assert image in text, f"docs/{page} does not show {image}"
