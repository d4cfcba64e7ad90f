"""The report in a real browser: headless Chromium lays it out, draws it and screenshots it.

Skipped when Chromium is not on PATH, unless ``GRADGUARD_REQUIRE_BROWSER=1`` (CI sets it
after installing the Debian package ``chromium``), which turns the skip into a failure.
Every browser runs in its own process group with a temporary profile, and the whole
group is killed when the command ends or times out.
"""

from __future__ import annotations

import contextlib
import html as htmllib
import json
import os
import re
import shutil
import signal
import subprocess
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from gradguard.report import SECTIONS, build_report

from .helpers import append_line, sections

BROWSERS = ("chromium", "chromium-browser", "google-chrome", "google-chrome-stable")
TIMEOUT = 120.0
"""Seconds one browser command may take (a loaded 2-core machine needs a few)."""

SECTION_IDS = [sid for sid, _ in SECTIONS]
PLOTTED = [sid for sid in SECTION_IDS if sid != "config"]

# Appended to a copy of the report: writes what the browser laid out and drew, per
# section, into the DOM, where --dump-dom shows it.
INSPECT = """
<script>
(function () {
  var out = {};
  document.querySelectorAll("section").forEach(function (section) {
    var svgs = Array.prototype.slice.call(section.querySelectorAll("svg"));
    var imgs = Array.prototype.slice.call(section.querySelectorAll("img"));
    var paths = Array.prototype.slice.call(section.querySelectorAll("svg path"));
    out[section.id] = {
      svg: svgs.length,
      svg_sizes: svgs.map(function (e) {
        var r = e.getBoundingClientRect(); return [Math.round(r.width), Math.round(r.height)];
      }),
      paths: paths.length,
      drawn_paths: paths.filter(function (p) {
        var b = p.getBBox(); return b.width > 0 || b.height > 0;
      }).length,
      img: imgs.length,
      img_loaded: imgs.filter(function (i) { return i.complete && i.naturalWidth > 0; }).length,
      empty: Array.prototype.slice.call(section.querySelectorAll("p.empty")).map(
        function (p) { return p.getBoundingClientRect().height; }),
      height: Math.round(section.getBoundingClientRect().height)
    };
  });
  var pre = document.createElement("pre");
  pre.id = "gg-inspection";
  pre.textContent = JSON.stringify(out);
  document.body.appendChild(pre);
})();
</script>
"""


@pytest.fixture(scope="module")
def browser() -> str:
    """The Chromium executable; skip (or fail, when required) without one."""
    for name in BROWSERS:
        path = shutil.which(name)
        if path is not None:
            return path
    reason = ("headless Chromium is not on PATH (looked for " + ", ".join(BROWSERS) +
              "; on Debian: apt-get install chromium)")
    if os.environ.get("GRADGUARD_REQUIRE_BROWSER") == "1":
        pytest.fail(reason + ", and GRADGUARD_REQUIRE_BROWSER=1 requires it")
    pytest.skip(reason)


def _kill_group(proc: subprocess.Popen[bytes]) -> None:
    """SIGKILL what is left of the browser's own process group (renderers, zygotes)."""
    with contextlib.suppress(ProcessLookupError, PermissionError):
        os.killpg(proc.pid, signal.SIGKILL)


def run_browser(browser: str, args: list[str], workdir: Path) -> tuple[int, str, str]:
    """Run headless Chromium with a temporary profile; (exit code, stdout, stderr)."""
    profile = workdir / "profile"
    profile.mkdir(parents=True, exist_ok=True)
    env = {**os.environ, "HOME": str(workdir), "XDG_CONFIG_HOME": str(workdir / "config"),
           "XDG_CACHE_HOME": str(workdir / "cache")}
    command = [browser, "--headless", "--no-sandbox", "--disable-gpu",
               "--disable-dev-shm-usage", "--no-first-run", "--no-default-browser-check",
               "--disable-extensions", "--hide-scrollbars", f"--user-data-dir={profile}", *args]
    proc = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            stdin=subprocess.DEVNULL, env=env, start_new_session=True)
    try:
        out, err = proc.communicate(timeout=TIMEOUT)
    except subprocess.TimeoutExpired:
        _kill_group(proc)
        out, err = proc.communicate()  # reaps the browser: no zombie
        pytest.fail(f"Chromium did not finish within {TIMEOUT:.0f} s: {' '.join(command)}\n"
                    f"{err.decode(errors='replace')[-2000:]}")
    finally:
        _kill_group(proc)
    return proc.returncode, out.decode(errors="replace"), err.decode(errors="replace")


def inspect(browser: str, report: Path, workdir: Path) -> tuple[dict[str, Any], str]:
    """(what the browser drew per section, the dumped DOM) of ``report``."""
    workdir.mkdir(parents=True, exist_ok=True)
    page = report.read_text(encoding="utf-8")
    instrumented = workdir / "inspect.html"
    instrumented.write_text(page.replace("</body>", INSPECT + "</body>"), encoding="utf-8")
    code, dom, err = run_browser(browser, ["--dump-dom", instrumented.as_uri()], workdir)
    assert code == 0, err[-2000:]
    found = re.search(r'<pre id="gg-inspection">(.*?)</pre>', dom, re.S)
    assert found is not None, f"the inspection script did not run:\n{err[-2000:]}"
    return json.loads(htmllib.unescape(found.group(1))), dom


def test_every_section_renders_its_plots_in_chromium(browser: str, trained_report: Path,
                                                     tmp_path: Path) -> None:
    drawn, dom = inspect(browser, trained_report, tmp_path)
    assert list(drawn) == SECTION_IDS
    in_dom = sections(dom)
    for sid in PLOTTED:
        info = drawn[sid]
        assert info["svg"] >= 1, (sid, info)
        for width, height in info["svg_sizes"]:
            assert width >= 600 and height >= 150, (sid, info)
        assert info["drawn_paths"] >= 5, (sid, info)
        assert info["img"] == info["img_loaded"], (sid, info)
        assert info["empty"] == [], (sid, info)
        # the same, counted in the DOM Chromium serialised
        assert in_dom[sid].count("<svg") == info["svg"], sid
        assert in_dom[sid].count("<path") >= info["paths"] > 0, sid
    assert drawn["config"]["height"] > 200
    assert '<span class="status status-ok" id="status">finished</span>' in dom


def test_sections_without_data_show_their_sentence(browser: str, tmp_path: Path) -> None:
    run = tmp_path / "early"
    run.mkdir()
    for step in range(1, 6):
        append_line(run / "metrics.jsonl", {"schema": 1, "step": step, "wall_time": 1.0 + step,
                                            "group": "all", "tiers": ["log"],
                                            "metrics": {"loss": 1.0 / step}})
    drawn, _ = inspect(browser, build_report(run), tmp_path / "browser")
    for sid in ("effective-lr", "accumulator", "grad-norm", "update-ratio", "throughput"):
        assert drawn[sid]["svg"] == 0, sid
        assert drawn[sid]["empty"] and all(h > 20 for h in drawn[sid]["empty"]), sid
    assert drawn["loss"]["svg"] == 1


def test_the_screenshot_shows_a_drawn_page(browser: str, trained_report: Path,
                                           tmp_path: Path) -> None:
    from PIL import Image

    shot = tmp_path / "report.png"
    code, _, err = run_browser(browser, [f"--screenshot={shot}", "--window-size=1280,4000",
                                         trained_report.as_uri()], tmp_path)
    assert code == 0, err[-2000:]
    assert shot.is_file() and shot.stat().st_size > 50_000
    with Image.open(shot) as image:
        assert image.size == (1280, 4000)
        pixels = np.asarray(image.convert("RGB"), dtype=np.int16)
    colours = np.unique(pixels.reshape(-1, 3)[::7], axis=0)
    assert len(colours) > 200, len(colours)              # text, plots, bands: many colours
    rows_with_ink = (pixels.std(axis=(1, 2)) > 8).mean()
    assert rows_with_ink > 0.3, rows_with_ink            # drawn all the way down, not blank
    # the plot colours are there: the first group's blue and the second's orange
    for rgb in ((0x25, 0x63, 0xEB), (0xEA, 0x58, 0x0C)):
        near = (np.abs(pixels - np.array(rgb)).sum(axis=2) < 40).sum()
        assert near > 500, (rgb, near)


def test_a_browser_that_hangs_is_killed_with_its_children(tmp_path: Path,
                                                          monkeypatch: pytest.MonkeyPatch) -> None:
    """The timeout kills the whole process group and reaps the browser (no zombie)."""
    fake = tmp_path / "fake-browser"
    pids = tmp_path / "pids"
    fake.write_text(f"#!/bin/sh\nsleep 300 &\necho $$ $! > {pids}\nwait\n")
    fake.chmod(0o755)
    monkeypatch.setattr(__import__(__name__, fromlist=["TIMEOUT"]), "TIMEOUT", 1.0)
    with pytest.raises(pytest.fail.Exception, match="did not finish within 1 s"):
        run_browser(str(fake), ["--dump-dom", "about:blank"], tmp_path)
    for pid in map(int, pids.read_text().split()):
        stat = Path(f"/proc/{pid}/stat")
        # gone, or (the orphaned child, briefly) a zombie waiting for init to reap it
        assert not stat.exists() or stat.read_text().split()[2] == "Z", pid
    shell = int(pids.read_text().split()[0])
    assert not Path(f"/proc/{shell}").exists()  # our own child was reaped


def test_the_demo_runs_report_renders_every_section_with_plots(browser: str,
                                                                tmp_path: Path) -> None:
    """`make demo`'s config (shortened), trained by `gradguard train`, seen in Chromium."""
    from gradguard.cli import main

    root = Path(__file__).resolve().parents[2]
    run = tmp_path / "demo"
    assert main(["train", str(root / "examples" / "ctr-demo.toml"), "-q", "--output", str(run),
                 "--set", "train.steps=200", "--set", "train.eval_every=100",
                 "--set", "workload.options.n_train=100000"]) == 0
    drawn, _ = inspect(browser, run / "report.html", tmp_path / "browser")
    assert list(drawn) == SECTION_IDS
    for sid in PLOTTED:
        assert drawn[sid]["svg"] >= 1 and drawn[sid]["drawn_paths"] >= 5, (sid, drawn[sid])
        if sid != "timeline":  # a clean run's timeline says that the guard did nothing
            assert drawn[sid]["empty"] == [], (sid, drawn[sid])  # the hybrid's groups have data
