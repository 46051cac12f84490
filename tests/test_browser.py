"""A real browser: JupyterLab headless, Debian's Chromium driven by Playwright, every widget panel moved by hand.

nbval proves every notebook's kernel code runs; it never loads the JupyterLab front end, so it cannot see a widget
that renders blank, a slider whose callback never fires, an output that never redraws, or a panel that a later
cell broke (notebook 05's went dead after Run All when a profiler cell rebound its ``out`` widget). This test does
what a learner does, for every notebook with an ipywidgets panel: open it in JupyterLab, Run All, then move one
control of each panel and check that the panel's output changed, never went blank while it recomputed, and that
a redrawn plot is a whole plot.

One JupyterLab server serves every notebook (quick mode, each notebook's kernel shut down after its test). Its
app settings come from ``binder/overrides.json``, the file ``make install`` and Binder install, so the test also
sees that JupyterLab does not ask about Jupyter news.

It uses the system browser (``/usr/bin/chromium``, Debian's ``chromium`` package) and never downloads one.
Screenshots land in ``artifacts/browser/`` (gitignored) for a person to look at. Locally the test skips with the
reason when Chromium or Playwright is missing; under CI (``CI`` set) a missing piece is a failure, so a green CI
always means the browser really ran. ``pytest tests/test_browser.py -k 05`` runs one notebook.
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

ROOT = Path(__file__).resolve().parents[1]
CHROMIUM = Path(os.environ.get("COURSE_CHROMIUM", "/usr/bin/chromium"))
ARTIFACTS = ROOT / "artifacts" / "browser"
# No network, no first-run UI, nothing in the background: the browser only talks to our local server.
CHROMIUM_ARGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                 "--disable-background-networking", "--disable-component-update", "--disable-sync"]
RUN_ALL_TIMEOUT_S = 1500  # quick mode, 2 cores: 05 runs GPTQ on the real model (minutes); room for a busy machine
REDRAW_TIMEOUT_S = 120

# What a learner moves in each notebook's panels, after Run All: one check per panel, each a list of actions
# (kind, the control's description or button text), then the panel's output must change. A button that only
# re-runs the same settings would redraw the same picture, so a slider moves first.
PANELS: dict[str, list[list[tuple[str, str]]]] = {
    "01_background": [[("slider", "new tokens")]],
    "02_core_concepts": [[("dropdown", "model")]],
    "05_quantization": [[("slider", "bits")], [("button", "measure perplexity")]],
    "06_pruning": [[("slider", "ratio")]],
    "07_distillation": [[("slider", "alpha"), ("button", "distil")], [("slider", "k")]],
    "08_math_model": [[("slider", "batch")]],
    "10_applications": [[("slider", "answer tokens")]],
    "12_faq": [[("radio", "")]],
}


def _widget_notebooks() -> set[str]:
    """Every chapter notebook that builds ipywidgets."""
    found = set()
    for path in (ROOT / "notebooks").glob("[0-9]*.ipynb"):
        cells = json.loads(path.read_text())["cells"]
        if any(re.search(r"^\s*(import ipywidgets|from ipywidgets)|quiz_panel\(", "".join(c["source"]), re.M)
               for c in cells if c["cell_type"] == "code"):
            found.add(path.stem)
    return found


def test_every_widget_notebook_has_its_panels_driven():
    """A new notebook with a panel must be added to PANELS, or the browser never moves it."""
    assert _widget_notebooks() == set(PANELS), (
        f"notebooks with ipywidgets: {sorted(_widget_notebooks())}; driven by the browser test: {sorted(PANELS)}")


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


def _api(base: str, token: str, path: str, method: str = "GET"):
    req = urllib.request.Request(f"{base}{path}?token={token}", method=method)
    with urllib.request.urlopen(req, timeout=30) as r:
        body = r.read()
    return json.loads(body) if body else None


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


@pytest.fixture(scope="module")
def lab(tmp_path_factory):
    """One JupyterLab on a free loopback port with a random token, serving copies of the notebooks.

    The copies keep the repository clean: the browser's autosave would otherwise write outputs into a committed
    notebook. Settings, workspaces and runtime files live in a temporary folder so no earlier session leaks in;
    the app-wide settings are the shipped binder/overrides.json.
    """
    _require_browser()
    tmp = tmp_path_factory.mktemp("lab")
    root = tmp / "root"
    shutil.copytree(ROOT / "notebooks", root / "notebooks", ignore=shutil.ignore_patterns(".ipynb_checkpoints"))
    if (ROOT / "assets").is_dir():  # notebooks may show pictures from ../assets
        shutil.copytree(ROOT / "assets", root / "assets")
    app_settings = tmp / "app-settings"
    app_settings.mkdir()
    shutil.copy(ROOT / "binder" / "overrides.json", app_settings / "overrides.json")
    settings = tmp / "settings"
    for plugin, values in {
        "@jupyterlab/docmanager-extension/plugin": {"autosave": False},
        # Otherwise JupyterLab 4 asks "Select Kernel" before starting the notebook's own kernel.
        # windowingMode none: render every cell, so a screenshot never catches an output that is not painted yet.
        "@jupyterlab/notebook-extension/tracker": {"autoStartDefaultKernel": True, "windowingMode": "none"},
    }.items():
        path = settings / f"{plugin}.jupyterlab-settings"
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps(values))
    port, token = _free_port(), secrets.token_hex(16)
    env = dict(os.environ, COURSE_QUICK="1", HF_HUB_OFFLINE="1", JUPYTER_RUNTIME_DIR=str(tmp / "runtime"),
               JUPYTER_CONFIG_DIR=str(tmp / "config"))
    log = tmp / "jupyterlab.log"
    cmd = [sys.executable, "-m", "jupyterlab", "--no-browser", "--ip=127.0.0.1", f"--port={port}",
           "--ServerApp.port_retries=0", f"--IdentityProvider.token={token}", f"--ServerApp.root_dir={root}",
           f"--LabApp.user_settings_dir={settings}", f"--LabApp.workspaces_dir={tmp / 'workspaces'}",
           f"--LabApp.app_settings_dir={app_settings}", "--LabApp.expose_app_in_browser=True"]
    if hasattr(os, "geteuid") and os.geteuid() == 0:  # CI and containers run as root
        cmd.append("--allow-root")
    with log.open("w") as fh:
        proc = subprocess.Popen(cmd, env=env, stdout=fh, stderr=subprocess.STDOUT, start_new_session=True)
    try:
        base = f"http://127.0.0.1:{port}"
        _wait_for_server(f"{base}/api/status?token={token}", proc, log)
        yield {"base": base, "token": token, "log": log}
    finally:
        # The server shuts its kernels down on SIGTERM; the process group catches anything left over.
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(timeout=20)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()


@pytest.fixture(scope="module")
def browser(lab):
    from playwright.sync_api import sync_playwright

    with sync_playwright() as pw:
        b = pw.chromium.launch(executable_path=str(CHROMIUM), headless=True, args=CHROMIUM_ARGS)
        try:
            yield b
        finally:
            b.close()


# What a panel shows, without its controls: the text and the image data inside its Output and HTML widgets, so
# a redrawn plot, a new printed number or new feedback all count as a change (a slider's readout does not).
_PANEL_JS = """
(cell) => Array.from(cell.querySelectorAll('.widget-output, .widget-html')).map(e =>
  e.innerText + '\\n' + Array.from(e.querySelectorAll('img')).map(i => i.getAttribute('src') || '').join('\\n')
).join('\\n---\\n')
"""

# Whether every Output widget of the cell shows something (text or a picture): a panel that clears its output
# and then computes for seconds shows nothing in between.
_SHOWS_ALL_JS = """
(cell) => Array.from(cell.querySelectorAll('.widget-output')).every(e =>
  e.innerText.trim().length > 0 || e.querySelector('img') !== null)
"""

# Wait until the panel shows new output in every Output widget, and count the polls (every 100 ms) at which an
# Output was blank on the way: one blank poll can be the instant between clear_output and the new output; a run
# of them is a panel that blanks while it recomputes. (JupyterLab's busy indicator does not follow widget
# callbacks, so "new output, nothing blank" is the only sign that a callback has finished.)
_CHANGED_JS = f"""
([cell, before]) => {{
  const shows = ({_SHOWS_ALL_JS})(cell);
  window.__blankRun = shows ? 0 : (window.__blankRun || 0) + 1;
  window.__longestBlank = Math.max(window.__longestBlank || 0, window.__blankRun);
  return shows && ({_PANEL_JS})(cell) !== before;
}}
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
(name) => {
  const app = window.jupyterapp;
  if (!app) return null;
  const panel = Array.from(app.shell.widgets('main')).find(w => w.content && w.content.model && w.content.model.cells
                                                           && w.context && w.context.path.endsWith(name));
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
_RUN_ALL_DONE_JS = (f"(name) => {{ const s = ({_NOTEBOOK_STATE_JS})(name); "
                    "return s && (s.ran === s.code || s.errors.length > 0); }")
_IDLE = '.jp-Notebook-ExecutionIndicator[data-status="idle"]'


def _accept_kernel_dialog(page, wait_s: float = 5) -> None:
    """Accept a "Select Kernel" dialog if one shows (settings should prevent it; older JupyterLabs still ask)."""
    dialog = page.locator(".jp-Dialog")
    try:
        dialog.wait_for(timeout=wait_s * 1000)
    except Exception:
        return
    dialog.locator(".jp-mod-accept").click()


def _control(page, kind: str, label: str):
    """The visible widget control a learner would use: by its description (or a button by its text)."""
    exact = re.compile(rf"^\s*{re.escape(label)}\s*$")
    if kind == "slider":
        return page.locator(".widget-slider", has=page.locator(".widget-label", has_text=exact)).first
    if kind == "dropdown":
        return page.locator(".widget-dropdown", has=page.locator(".widget-label", has_text=exact)).first
    if kind == "button":
        return page.locator("button.widget-button", has_text=exact).first
    if kind == "radio":
        return page.locator(".widget-radio-box").first
    raise ValueError(f"unknown control kind {kind!r}; use slider, dropdown, button or radio")


def _move(page, kind: str, control) -> None:
    """Change a control with real mouse and keyboard events, as a learner would."""
    if kind == "slider":
        # Drag the handle most of the way along the track (value is sent on release: continuous_update=False).
        readout = control.locator(".widget-readout").first
        before = readout.inner_text()
        handle = control.locator(".noUi-handle").first
        track = control.locator(".noUi-target, .slider").first.bounding_box()
        box = handle.bounding_box()
        page.mouse.move(box["x"] + box["width"] / 2, box["y"] + box["height"] / 2)
        page.mouse.down()
        page.mouse.move(track["x"] + 0.8 * track["width"], box["y"] + box["height"] / 2, steps=10)
        page.mouse.up()
        page.wait_for_function("([v, r]) => r.innerText !== v", arg=[before, readout.element_handle()],
                               timeout=10_000)
    elif kind == "dropdown":
        select = control.locator("select").first
        options = select.locator("option").all_inner_texts()
        current = select.evaluate("(s) => s.options[s.selectedIndex].text")
        select.select_option(label=next(o for o in options if o != current))
    elif kind == "button":
        control.click()
    elif kind == "radio":
        control.locator("input[type=radio]").nth(1).check()


def _drive_panel(page, notebook: str, index: int, actions: list[tuple[str, str]]) -> None:
    controls = []
    for kind, label in actions:
        c = _control(page, kind, label)
        c.wait_for()
        controls.append((kind, c))
    cell = controls[-1][1].locator("xpath=ancestor::div[contains(@class, 'jp-Cell')][1]")
    cell.scroll_into_view_if_needed()
    cell_handle = cell.element_handle()
    before = page.evaluate(_PANEL_JS, cell_handle)
    what = " then ".join(f"{k} {label!r}" for k, label in actions)
    assert before.strip(), f"{notebook}: the panel of {what} shows no output after Run All"
    assert page.evaluate(_SHOWS_ALL_JS, cell_handle), f"{notebook}: an output of the panel of {what} is blank"
    ink_before = page.evaluate(_INK_JS, cell_handle)

    page.evaluate("() => { window.__blankRun = 0; window.__longestBlank = 0; }")
    for kind, control in controls:
        control.scroll_into_view_if_needed()
        _move(page, kind, control)
    try:
        page.wait_for_function(_CHANGED_JS, arg=[cell_handle, before], timeout=REDRAW_TIMEOUT_S * 1000, polling=100)
    except Exception as e:
        raise AssertionError(f"{notebook}: moving {what} did not change the panel's output within "
                             f"{REDRAW_TIMEOUT_S} s (is its callback alive after Run All?)") from e
    # Let the redraw settle (clear_output(wait=True) swaps content in steps) before reading the result.
    page.wait_for_timeout(500)
    page.wait_for_function("(cell) => Array.from(cell.querySelectorAll('img'))"
                           ".every(i => i.complete && i.naturalWidth > 0)", arg=cell_handle)
    after = page.evaluate(_PANEL_JS, cell_handle)
    longest_blank = page.evaluate("() => window.__longestBlank")
    cell.evaluate("(el) => el.scrollIntoView({block: 'start'})")
    page.wait_for_timeout(300)
    page.screenshot(path=str(ARTIFACTS / f"{notebook}-panel{index}.png"))
    ink_after = page.evaluate(_INK_JS, cell_handle)

    assert after != before, f"{notebook}: moving {what} did not change the output"
    assert longest_blank <= 2, (
        f"{notebook}: the panel of {what} went blank for ~{longest_blank / 10:.1f} s while it recomputed: keep the "
        "old output until the new one is ready (clear_output(wait=True) after computing)")
    # A redrawn plot must be a whole plot: a figure rendered half-built (seen with a plot made in a widget callback)
    # still changes the output, but has far less ink than the first drawing of the same plot.
    if ink_before:
        assert ink_after, f"{notebook}: the plot disappeared when {what} moved"
        assert max(ink_after) >= 0.5 * max(ink_before), (
            f"{notebook}: the redrawn plot is mostly blank: {max(ink_after):.3f} of its pixels are drawn, against "
            f"{max(ink_before):.3f} before (see artifacts/browser/{notebook}-panel{index}.png)")


@pytest.mark.slow
@pytest.mark.parametrize("notebook", sorted(PANELS))
def test_panels_respond_after_run_all(lab, browser, notebook):
    path = ROOT / "notebooks" / f"{notebook}.ipynb"
    if not path.exists():
        pytest.skip(f"notebooks/{path.name} does not exist")
    ARTIFACTS.mkdir(parents=True, exist_ok=True)
    page = browser.new_page(viewport={"width": 1400, "height": 1000})
    page.set_default_timeout(60_000)
    try:
        # reset: a fresh workspace, so the notebooks of earlier tests are not reopened (each with a new kernel).
        page.goto(f"{lab['base']}/lab/tree/notebooks/{path.name}?reset&token={lab['token']}")
        page.locator(".jp-Notebook .jp-Cell").first.wait_for()
        # The kernel must be up before Run All, or the first cells queue behind its start-up.
        _accept_kernel_dialog(page)
        page.get_by_text(re.compile(r"\| Idle$")).first.wait_for(timeout=120_000)  # status bar: "<kernel> | Idle"

        # Run > Run All Cells, through the menu bar, as a learner would.
        page.locator(".lm-MenuBar-itemLabel", has_text="Run").first.click()
        page.get_by_role("menuitem", name="Run All Cells", exact=True).click()
        page.wait_for_function(_RUN_ALL_DONE_JS, arg=path.name, timeout=RUN_ALL_TIMEOUT_S * 1000, polling=1000)
        state = page.evaluate(_NOTEBOOK_STATE_JS, path.name)
        assert not state["errors"], f"a cell raised in the browser: {state['errors']}"
        assert state["code"] > 0 and state["ran"] == state["code"], f"not every cell ran: {state}"
        page.locator(_IDLE).wait_for(timeout=REDRAW_TIMEOUT_S * 1000)

        for index, actions in enumerate(PANELS[notebook]):
            _drive_panel(page, notebook, index, actions)

        # binder/overrides.json (the app settings here) turns JupyterLab's news question off; by now, a minute
        # or more after start-up, it would have shown.
        news = page.get_by_text(re.compile(r"Jupyter news", re.I))
        assert news.count() == 0, "JupyterLab asked about Jupyter news: binder/overrides.json is not in effect"
    except Exception:
        page.screenshot(path=str(ARTIFACTS / f"{notebook}-failure.png"))
        raise
    finally:
        page.close()
        for session in _api(lab["base"], lab["token"], "/api/sessions"):  # one kernel at a time (2 GB budget)
            _api(lab["base"], lab["token"], f"/api/sessions/{session['id']}", method="DELETE")
