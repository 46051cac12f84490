"""A real browser: JupyterLab headless, Debian's Chromium driven by Playwright, a widget slider moved by the mouse.

nbval proves every notebook's kernel code runs; it never loads the JupyterLab front end, so it cannot see a widget
that renders blank, a slider whose callback never fires, or an output that never redraws. This test does what a
learner does: open a chapter notebook in JupyterLab, Run All, drag the slider, and check that the output changed.

It uses the system browser (``/usr/bin/chromium``, Debian's ``chromium`` package) and never downloads one. A
screenshot lands in ``artifacts/browser/`` (gitignored) for a person to look at. Locally the test skips with the
reason when Chromium or Playwright is missing; under CI (``CI`` set) a missing piece is a failure, so a green CI
always means the browser really ran.

``COURSE_BROWSER_NOTEBOOK`` (a path) picks another notebook; it must show an ipywidgets slider whose callback
redraws an output in the same cell.
"""

from __future__ import annotations

import json
import os
import re
import secrets
import shutil
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import pytest

pytestmark = pytest.mark.slow

ROOT = Path(__file__).resolve().parents[1]
CHROMIUM = Path(os.environ.get("COURSE_CHROMIUM", "/usr/bin/chromium"))
NOTEBOOK = Path(os.environ.get("COURSE_BROWSER_NOTEBOOK", ROOT / "notebooks" / "01_background.ipynb"))
ARTIFACTS = ROOT / "artifacts" / "browser"
# No network, no first-run UI, nothing in the background: the browser only talks to our local server.
CHROMIUM_ARGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                 "--disable-background-networking", "--disable-component-update", "--disable-sync"]
RUN_ALL_TIMEOUT_S = 300  # quick mode on 2 shared cores is about a minute; leave room for a busy CI machine
REDRAW_TIMEOUT_S = 120


def _missing(reason: str):
    """Skip locally, fail under CI: CI must have installed everything this test needs."""
    if os.environ.get("CI"):
        pytest.fail(f"{reason} (CI must install it: see .ci/run)")
    pytest.skip(reason)


def _require_browser() -> None:
    try:
        import playwright.sync_api  # noqa: F401
    except ImportError:
        _missing("the playwright package is not installed (pip install -e '.[test]')")
    if not CHROMIUM.exists():
        _missing(f"{CHROMIUM} not found (Debian: apt-get install chromium)")


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _wait_for_server(url: str, proc: subprocess.Popen, log: Path, timeout_s: float = 180) -> None:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"JupyterLab exited with {proc.returncode}:\n{log.read_text()[-3000:]}")
        try:
            with urllib.request.urlopen(url, timeout=2) as r:
                if r.status == 200:
                    return
        except OSError:
            time.sleep(0.5)
    raise TimeoutError(f"JupyterLab did not answer within {timeout_s:.0f} s:\n{log.read_text()[-3000:]}")


@pytest.fixture
def lab(tmp_path):
    """JupyterLab on a free loopback port with a random token, serving a copy of the notebook.

    The copy keeps the repository clean: the browser's autosave would otherwise write outputs into a committed
    notebook. Settings, workspaces and runtime files live in tmp_path so no earlier session leaks in.
    """
    _require_browser()
    if not NOTEBOOK.exists():
        pytest.skip(f"{NOTEBOOK.relative_to(ROOT) if NOTEBOOK.is_relative_to(ROOT) else NOTEBOOK} does not exist yet")
    root = tmp_path / "root"
    (root / "notebooks").mkdir(parents=True)
    shutil.copy(NOTEBOOK, root / "notebooks" / NOTEBOOK.name)
    if (ROOT / "assets").is_dir():  # notebooks may show pictures from ../assets
        shutil.copytree(ROOT / "assets", root / "assets")
    settings = tmp_path / "settings"
    for plugin, values in {
        "@jupyterlab/apputils-extension/notification": {"fetchNews": "false", "checkForUpdates": False},
        "@jupyterlab/docmanager-extension/plugin": {"autosave": False},
        # Otherwise JupyterLab 4 asks "Select Kernel" before starting the notebook's own kernel.
        # windowingMode none: render every cell, so a screenshot never catches an output that is not painted yet.
        "@jupyterlab/notebook-extension/tracker": {"autoStartDefaultKernel": True, "windowingMode": "none"},
    }.items():
        path = settings / f"{plugin}.jupyterlab-settings"
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps(values))
    port, token = _free_port(), secrets.token_hex(16)
    env = dict(os.environ, COURSE_QUICK="1", HF_HUB_OFFLINE="1", JUPYTER_RUNTIME_DIR=str(tmp_path / "runtime"),
               JUPYTER_CONFIG_DIR=str(tmp_path / "config"))
    log = tmp_path / "jupyterlab.log"
    cmd = [sys.executable, "-m", "jupyterlab", "--no-browser", "--ip=127.0.0.1", f"--port={port}",
           "--ServerApp.port_retries=0", f"--IdentityProvider.token={token}", f"--ServerApp.root_dir={root}",
           f"--LabApp.user_settings_dir={settings}", f"--LabApp.workspaces_dir={tmp_path / 'workspaces'}",
           "--LabApp.expose_app_in_browser=True"]
    if hasattr(os, "geteuid") and os.geteuid() == 0:  # CI and containers run as root
        cmd.append("--allow-root")
    with log.open("w") as fh:
        proc = subprocess.Popen(cmd, env=env, stdout=fh, stderr=subprocess.STDOUT, start_new_session=True)
    try:
        base = f"http://127.0.0.1:{port}"
        _wait_for_server(f"{base}/api/status?token={token}", proc, log)
        yield {"url": f"{base}/lab/tree/notebooks/{NOTEBOOK.name}?token={token}", "log": log}
    finally:
        # The server shuts its kernels down on SIGTERM; the process group catches anything left over.
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(timeout=20)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()


# A fingerprint of a cell's outputs without the slider itself (its handle and readout move with the mouse):
# text, and the data of every image, so a redrawn plot or a new printed number both count as a change.
_OUTPUT_FINGERPRINT_JS = """
(cell) => {
  const area = cell.querySelector('.jp-OutputArea');
  if (!area) return '';
  const copy = area.cloneNode(true);
  copy.querySelectorAll('.widget-slider, .widget-hslider, .widget-readout').forEach(e => e.remove());
  const imgs = Array.from(copy.querySelectorAll('img')).map(i => i.getAttribute('src') || '');
  return copy.innerText + '\\n' + imgs.join('\\n');
}
"""

# The share of non-white pixels of each image in a cell's outputs: a plot that was drawn, or one that is blank.
_INK_JS = """
(cell) => Array.from(cell.querySelectorAll('.jp-OutputArea img')).filter(i => i.naturalWidth > 0).map(img => {
  const c = document.createElement('canvas');
  c.width = img.naturalWidth; c.height = img.naturalHeight;
  const ctx = c.getContext('2d');
  ctx.drawImage(img, 0, 0);
  const d = ctx.getImageData(0, 0, c.width, c.height).data;
  let ink = 0;
  for (let k = 0; k < d.length; k += 4) if (d[k + 3] > 0 && (d[k] < 230 || d[k + 1] < 230 || d[k + 2] < 230)) ink++;
  return ink / (c.width * c.height);
})
"""

# The notebook's own model, read through the app that --LabApp.expose_app_in_browser puts on window: which code
# cells have run (an execution count) and which outputs are errors. More reliable than the rendered page, where an
# error and a warning are both red text on stderr.
_NOTEBOOK_STATE_JS = """
() => {
  const app = window.jupyterapp;
  if (!app) return null;
  const panel = Array.from(app.shell.widgets('main')).find(w => w.content && w.content.model && w.content.model.cells);
  if (!panel) return null;
  const cells = panel.content.model.cells;
  let code = 0, ran = 0;
  const errors = [];
  for (let i = 0; i < cells.length; i++) {
    const cell = cells.get(i);
    if (cell.type !== 'code') continue;
    code += 1;
    if (cell.executionCount) ran += 1;
    for (const o of cell.outputs.toJSON()) {
      if (o.output_type === 'error') errors.push(`cell ${i}: ${o.ename}: ${o.evalue}`);
    }
  }
  return {code, ran, errors};
}
"""
# Run All stops at the first error, so "done" is every code cell counted or any error shown.
_RUN_ALL_DONE_JS = (f"() => {{ const s = ({_NOTEBOOK_STATE_JS})(); "
                    "return s && (s.ran === s.code || s.errors.length > 0); }")


def _accept_kernel_dialog(page, wait_s: float = 5) -> None:
    """Accept a "Select Kernel" dialog if one shows (settings should prevent it; older JupyterLabs still ask)."""
    dialog = page.locator(".jp-Dialog")
    try:
        dialog.wait_for(timeout=wait_s * 1000)
    except Exception:
        return
    dialog.locator(".jp-mod-accept").click()


def test_notebook_runs_and_slider_redraws(lab):
    from playwright.sync_api import sync_playwright

    ARTIFACTS.mkdir(parents=True, exist_ok=True)
    shot = ARTIFACTS / f"{NOTEBOOK.stem}.png"
    with sync_playwright() as pw:
        browser = pw.chromium.launch(executable_path=str(CHROMIUM), headless=True, args=CHROMIUM_ARGS)
        page = browser.new_page(viewport={"width": 1400, "height": 1000})
        page.set_default_timeout(60_000)
        try:
            page.goto(lab["url"])
            page.locator(".jp-Notebook .jp-Cell").first.wait_for()
            # The kernel must be up before Run All, or the first cells queue behind its start-up.
            _accept_kernel_dialog(page)
            page.get_by_text(re.compile(r"\| Idle$")).first.wait_for(timeout=120_000)  # status bar: "<kernel> | Idle"

            # Run > Run All Cells, through the menu bar, as a learner would.
            page.locator(".lm-MenuBar-itemLabel", has_text="Run").first.click()
            page.get_by_role("menuitem", name="Run All Cells", exact=True).click()
            page.wait_for_function(_RUN_ALL_DONE_JS, timeout=RUN_ALL_TIMEOUT_S * 1000, polling=1000)
            state = page.evaluate(_NOTEBOOK_STATE_JS)
            assert not state["errors"], f"a cell raised in the browser: {state['errors']}"
            assert state["code"] > 0 and state["ran"] == state["code"], f"not every cell ran: {state}"

            slider = page.locator(".jp-OutputArea .widget-slider").first
            slider.wait_for()
            slider.scroll_into_view_if_needed()
            cell = slider.locator("xpath=ancestor::div[contains(@class, 'jp-Cell')][1]")
            cell_handle = cell.element_handle()
            readout = slider.locator("xpath=..").locator(".widget-readout").first
            before_value = readout.inner_text()
            before = page.evaluate(_OUTPUT_FINGERPRINT_JS, cell_handle)
            assert before.strip(), "the slider's cell shows no output to redraw"
            ink_before = page.evaluate(_INK_JS, cell_handle)

            # Drag the handle most of the way along the track: a real mouse event, not a value set from code.
            handle = slider.locator(".noUi-handle").first
            track = slider.locator(".noUi-target, .slider").first.bounding_box()
            box = handle.bounding_box()
            page.mouse.move(box["x"] + box["width"] / 2, box["y"] + box["height"] / 2)
            page.mouse.down()
            page.mouse.move(track["x"] + 0.8 * track["width"], box["y"] + box["height"] / 2, steps=10)
            page.mouse.up()

            page.wait_for_function("([v, r]) => r.innerText !== v", arg=[before_value, readout.element_handle()],
                                   timeout=10_000)
            after_value = readout.inner_text()
            page.wait_for_function(f"(cell) => ({_OUTPUT_FINGERPRINT_JS})(cell) !== {json.dumps(before)}",
                                   arg=cell_handle, timeout=REDRAW_TIMEOUT_S * 1000, polling=500)
            # Let the redraw settle (clear_output(wait=True) swaps content in steps) before the screenshot.
            page.locator('.jp-Notebook-ExecutionIndicator[data-status="idle"]').wait_for(
                timeout=REDRAW_TIMEOUT_S * 1000)
            after = page.evaluate(_OUTPUT_FINGERPRINT_JS, cell_handle)
            # Screenshot the slider and the redrawn output, with every image decoded.
            slider.evaluate("(el) => el.scrollIntoView({block: 'start'})")
            page.wait_for_function("(cell) => Array.from(cell.querySelectorAll('img'))"
                                   ".every(i => i.complete && i.naturalWidth > 0)", arg=cell_handle)
            page.wait_for_timeout(500)
            page.screenshot(path=str(shot))
            ink_after = page.evaluate(_INK_JS, cell_handle)
        except Exception:
            page.screenshot(path=str(ARTIFACTS / f"{NOTEBOOK.stem}-failure.png"))
            raise
        finally:
            browser.close()

    assert after_value != before_value, "the slider did not move"
    assert after != before, "moving the slider did not change the output"
    assert shot.stat().st_size > 10_000, "the screenshot is suspiciously small"
    # A redrawn plot must be a whole plot: a figure rendered half-built (seen with a plot made in a widget callback)
    # still changes the output, but has far less ink than the first drawing of the same plot.
    if ink_before:
        assert ink_after, "the plot disappeared when the slider moved"
        assert max(ink_after) >= 0.5 * max(ink_before), (
            f"the redrawn plot is mostly blank: {max(ink_after):.3f} of its pixels are drawn, against "
            f"{max(ink_before):.3f} before the slider moved (see {shot.relative_to(ROOT)})")
