"""What a learner meets in JupyterLab: notebook 02 opened in a real browser, run, and its explorer used.

One test, ``test_explorer_in_jupyterlab``, as a person would do it:

1. JupyterLab on a free loopback port (127.0.0.1, a random token, ``--no-browser``), rooted in a temporary
   folder holding a *copy* of ``notebooks/02_inner_loop.ipynb`` (the committed file is never touched), with
   its own Jupyter config, data and settings folders (so the copy is untrusted, like a fresh checkout's).
2. Headless Chromium (Debian's ``/usr/bin/chromium``) driven by Playwright opens the notebook. Before anything
   runs, the explorer's output must show a picture (the PNG saved next to the widget), not the text
   ``interactive(children=...``.
3. Run > Run All Cells; the live explorer appears (sliders and its plot).
4. The "SGD steps" slider is dragged; the plot must change (its image data and a screenshot of the output
   differ), and the slider's readout must show the new value.
5. Screenshots (fresh, after running, after moving the slider) are kept under the test's ``tmp_path`` and
   copied to ``bench/out/browser/`` (git-ignored); their paths are printed (``pytest -s`` shows them).

The server is stopped in a ``finally``. Every wait is bounded (16-40 s here when the machine is quiet; the bounds allow for a busy one).
Skips, saying how to enable it, without Chromium (``apt-get install chromium``) or Playwright for Python
(``pip install playwright``; no ``playwright install``: the test uses the system's Chromium).
"""
from __future__ import annotations

import json
import os
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
NOTEBOOK = ROOT / "notebooks" / "02_inner_loop.ipynb"
SHOTS_DIR = ROOT / "bench" / "out" / "browser"
CHROMIUM = os.environ.get("METATUT_CHROMIUM") or shutil.which("chromium") or "/usr/bin/chromium"
HOW_TO_ENABLE = ("to run it: `apt-get install chromium` (Debian's package, /usr/bin/chromium) and "
                 "`pip install playwright` (the Python package; `playwright install` is not needed)")

SERVER_START_S = 90      # JupyterLab up and answering
RUN_ALL_S = 240          # the notebook run under METATUT_FAST=1 until the explorer shows its plot (loaded CI)
ACTION_MS = 45_000       # one click, one page load (generous: the suite runs beside it on 2 cores)
LAUNCH_MS = 90_000       # starting Chromium, slow on a busy machine


def _skip_unless_available():
    try:
        import playwright.sync_api  # noqa: F401
    except ImportError:
        pytest.skip("the browser test needs Playwright for Python: " + HOW_TO_ENABLE)
    if not (Path(CHROMIUM).is_file() and os.access(CHROMIUM, os.X_OK)):
        pytest.skip(f"the browser test needs Chromium ({CHROMIUM} not found): " + HOW_TO_ENABLE)
    try:
        import jupyterlab  # noqa: F401
        import ipywidgets  # noqa: F401
    except ImportError as err:
        pytest.skip(f"the browser test needs the course extra ({err.name}): pip install -e '.[course,test]'")


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _start_lab(root: Path, home: Path, port: int, token: str, log) -> subprocess.Popen:
    """JupyterLab on 127.0.0.1:port, rooted in ``root``, with Jupyter's own folders under ``home``."""
    env = dict(os.environ)
    env.update({
        "JUPYTER_CONFIG_DIR": str(home / "config"),
        "JUPYTER_DATA_DIR": str(home / "data"),        # no notebook signatures: the copy is untrusted
        "JUPYTER_RUNTIME_DIR": str(home / "runtime"),
        "JUPYTERLAB_WORKSPACES_DIR": str(home / "workspaces"),
        "IPYTHONDIR": str(home / "ipython"),
        "METATUT_FAST": "1",                           # the ci budget: the notebook runs in seconds
        "METATUT_PROGRESS": "0",
        "OMP_NUM_THREADS": "1",
        "MPLBACKEND": "module://matplotlib_inline.backend_inline",
    })
    settings = home / "app-settings"
    settings.mkdir(parents=True)
    # Render every cell (no windowing), so that the explorer's output is in the page without scrolling tricks.
    (settings / "overrides.json").write_text(json.dumps(
        {"@jupyterlab/notebook-extension:tracker": {"windowingMode": "none"},
         "@jupyterlab/apputils-extension:notification": {"fetchNews": "false", "checkForUpdates": False}}))
    command = [
        sys.executable, "-m", "jupyter", "lab", "--no-browser",
        "--ServerApp.ip=127.0.0.1", f"--ServerApp.port={port}", "--ServerApp.port_retries=0",
        f"--IdentityProvider.token={token}", f"--ServerApp.root_dir={root}",
        f"--LabApp.app_settings_dir={settings}", f"--LabApp.user_settings_dir={home / 'user-settings'}",
        "--LabApp.news_url=", "--LabApp.check_for_updates_class=jupyterlab.NeverCheckForUpdate",
        "--ServerApp.open_browser=False", "--ServerApp.allow_remote_access=False",
    ]
    if hasattr(os, "geteuid") and os.geteuid() == 0:
        command.append("--allow-root")   # containers often run as root
    return subprocess.Popen(command, cwd=root, env=env, stdout=log, stderr=subprocess.STDOUT,
                            start_new_session=True)


def _wait_for_server(server: subprocess.Popen, port: int, token: str, log_path: Path) -> None:
    deadline = time.monotonic() + SERVER_START_S
    while time.monotonic() < deadline:
        if server.poll() is not None:
            pytest.fail(f"JupyterLab exited with {server.returncode}:\n{log_path.read_text()[-3000:]}")
        try:
            with urllib.request.urlopen(f"http://127.0.0.1:{port}/api/status?token={token}", timeout=5) as r:
                if r.status == 200:
                    return
        except OSError:
            pass
        time.sleep(0.5)
    pytest.fail(f"JupyterLab did not answer within {SERVER_START_S} s:\n{log_path.read_text()[-3000:]}")


def _stop(server: subprocess.Popen) -> None:
    if server.poll() is not None:
        return
    os.killpg(server.pid, signal.SIGTERM)   # the server and the kernels it started (its own session)
    try:
        server.wait(timeout=15)
    except subprocess.TimeoutExpired:
        os.killpg(server.pid, signal.SIGKILL)
        server.wait(timeout=15)


def _keep(shot: Path) -> Path:
    SHOTS_DIR.mkdir(parents=True, exist_ok=True)
    kept = SHOTS_DIR / shot.name
    shutil.copyfile(shot, kept)
    print(f"screenshot: {shot} (copy: {kept.relative_to(ROOT)})")
    return kept


def test_explorer_in_jupyterlab(tmp_path):
    _skip_unless_available()
    from playwright.sync_api import expect, sync_playwright

    started = time.monotonic()
    root, home = tmp_path / "lab", tmp_path / "jupyter"
    root.mkdir()
    home.mkdir()
    shutil.copyfile(NOTEBOOK, root / NOTEBOOK.name)
    committed = NOTEBOOK.read_bytes()
    port, token = _free_port(), secrets.token_hex(16)
    log_path = tmp_path / "jupyterlab.log"
    with open(log_path, "w") as log:
        server = _start_lab(root, home, port, token, log)
        try:
            _wait_for_server(server, port, token, log_path)
            with sync_playwright() as pw:
                browser = pw.chromium.launch(executable_path=CHROMIUM, headless=True, timeout=LAUNCH_MS)
                try:
                    page = browser.new_page(viewport={"width": 1400, "height": 1000})
                    page.set_default_timeout(ACTION_MS)
                    page.goto(f"http://127.0.0.1:{port}/lab/tree/{NOTEBOOK.name}?token={token}")
                    _use_the_explorer(page, expect, tmp_path)
                finally:
                    browser.close()
        finally:
            _stop(server)
    assert NOTEBOOK.read_bytes() == committed, "the browser test must not modify the committed notebook"
    elapsed = time.monotonic() - started
    print(f"browser test: {elapsed:.0f} s")
    assert elapsed < 480  # bounded: every wait above has its own timeout


def _use_the_explorer(page, expect, tmp_path: Path) -> None:
    notebook = page.locator(".jp-NotebookPanel:not(.lm-mod-hidden) .jp-Notebook")
    expect(notebook).to_be_visible(timeout=60_000)
    cell = page.locator(".jp-CodeCell").filter(has_text="explorer = adaptation_explorer(")
    expect(cell).to_have_count(1)
    output = cell.locator(".jp-OutputArea")

    # 1. A fresh reader (nothing run, untrusted copy): a picture of the explorer, not the widget's repr.
    cell.scroll_into_view_if_needed()
    expect(output.locator("img")).to_have_count(1)
    assert "interactive(children" not in output.inner_text()
    _keep(_shot(output, tmp_path / "explorer_fresh.png"))

    # 2. Run > Run All Cells, then wait for the live explorer and its plot.
    page.locator(".lm-MenuBar-itemLabel", has_text="Run").first.click()
    page.locator(".lm-Menu-itemLabel", has_text="Run All Cells").first.click()
    slider = cell.locator(".widget-slider", has_text="SGD steps")
    expect(slider).to_be_visible(timeout=RUN_ALL_S * 1000)
    plot = cell.locator(".widget-output img")
    expect(plot).to_have_count(1, timeout=30_000)
    readout = slider.locator(".widget-readout")
    before_value = readout.inner_text().strip()
    before_src = plot.get_attribute("src")
    cell.scroll_into_view_if_needed()
    before_shot = _shot(cell, tmp_path / "explorer_live.png")
    _keep(before_shot)

    # 3. Drag the "SGD steps" handle to the right; the explorer recomputes on release.
    handle = slider.locator(".noUi-handle")
    box = handle.bounding_box()
    track = slider.locator(".noUi-target").bounding_box()
    page.mouse.move(box["x"] + box["width"] / 2, box["y"] + box["height"] / 2)
    page.mouse.down()
    page.mouse.move(box["x"] + box["width"] / 2 + 0.25 * track["width"], box["y"] + box["height"] / 2, steps=8)
    page.mouse.up()
    expect(readout).not_to_have_text(before_value, timeout=10_000)
    after_value = readout.inner_text().strip()
    assert int(after_value) > int(before_value), (before_value, after_value)

    # 4. The plot follows: its image data and the screenshot both change, and the legend names the new count.
    deadline = time.monotonic() + 30
    while plot.count() != 1 or plot.get_attribute("src") == before_src:
        assert time.monotonic() < deadline, "the plot did not change after moving the slider"
        page.wait_for_timeout(250)
    expect(plot).to_be_visible()
    page.wait_for_timeout(500)   # let the new image paint
    after_shot = _shot(cell, tmp_path / "explorer_after_slider.png")
    assert after_shot.read_bytes() != before_shot.read_bytes()
    _keep(after_shot)


def _shot(locator, path: Path) -> Path:
    locator.screenshot(path=str(path))
    assert path.stat().st_size > 1000
    return path
