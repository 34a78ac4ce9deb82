"""`make lab` as a learner meets it: JupyterLab starts (as root too), lists the chapters, opens one in a browser.

scripts/lab.sh (what `make lab` runs) is started on a free loopback port with a token; the
chapter notebooks are listed through the REST API (``/api/contents``, token auth, and a
request without the token must be refused); then headless Chromium opens one notebook in
JupyterLab's UI and must show its first heading. The browser part needs Debian's chromium
and chromium-driver (scripts/install_chromium.sh) and is skipped, saying so, without them. The script's arguments are checked as root and as an
ordinary user (``--allow-root`` only for root; no browser without a display).
"""
from __future__ import annotations

import json
import os
import secrets
import shutil
import subprocess
import time
import urllib.error
import urllib.request
from pathlib import Path

import pytest

from lessons_pkg.launch import free_port, kill_process_group

ROOT = Path(__file__).resolve().parents[2]
STARTUP_TIMEOUT = 90  # s; JupyterLab's start-up on a loaded 2-core machine takes 5-20 s


def _get(url: str, token: str | None) -> tuple[int, bytes]:
    request = urllib.request.Request(url, headers={"Authorization": f"token {token}"} if token else {})
    try:
        with urllib.request.urlopen(request, timeout=10) as response:
            return response.status, response.read()
    except urllib.error.HTTPError as e:
        return e.code, b""


@pytest.fixture(scope="module")
def lab(tmp_path_factory):
    """A JupyterLab started by scripts/lab.sh: yields (base URL, token)."""
    home = tmp_path_factory.mktemp("jupyter")
    port, token = free_port(), secrets.token_hex(16)
    env = dict(os.environ, LAB_IP="127.0.0.1", LAB_PORT=str(port), LAB_OPEN="0",
               JUPYTER=str(ROOT / ".venv/bin/jupyter") if (ROOT / ".venv/bin/jupyter").exists() else "jupyter",
               JUPYTER_CONFIG_DIR=str(home / "config"), JUPYTER_DATA_DIR=str(home / "data"),
               JUPYTER_RUNTIME_DIR=str(home / "runtime"))
    log = open(home / "lab.log", "w+")
    proc = subprocess.Popen([str(ROOT / "scripts/lab.sh"), f"--IdentityProvider.token={token}",
                             "--ServerApp.port_retries=0"],
                            cwd=ROOT, env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
    base = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + STARTUP_TIMEOUT
        while True:
            if proc.poll() is not None:
                log.seek(0)
                pytest.fail(f"JupyterLab exited with status {proc.returncode}:\n{log.read()[-3000:]}")
            try:
                if _get(f"{base}/api/status", token)[0] == 200:
                    break
            except OSError:
                pass
            if time.monotonic() > deadline:
                log.seek(0)
                pytest.fail(f"JupyterLab did not answer on {base} within {STARTUP_TIMEOUT} s:\n{log.read()[-3000:]}")
            time.sleep(0.5)
        yield base, token
        for kernel in json.loads(_get(f"{base}/api/kernels", token)[1] or b"[]"):  # the opened notebook's kernel
            urllib.request.urlopen(urllib.request.Request(f"{base}/api/kernels/{kernel['id']}", method="DELETE",
                                                          headers={"Authorization": f"token {token}"}), timeout=30)
    finally:
        kill_process_group(proc)
        log.close()


def test_lab_lists_every_chapter_notebook_through_the_api_with_the_token_only(lab):
    base, token = lab
    status, body = _get(f"{base}/api/contents", token)
    assert status == 200
    listed = {item["name"] for item in json.loads(body)["content"] if item["type"] == "notebook"}
    expected = {p.name for p in (ROOT / "chapters").glob("*.ipynb")}
    assert expected and listed == expected, (sorted(listed), sorted(expected))
    assert _get(f"{base}/api/contents", None)[0] in (401, 403), "the API answered without the token"


@pytest.fixture
def browser():
    """Headless Chromium driven by selenium (skipped, saying so, without Debian's chromium and chromium-driver)."""
    chromium, driver = shutil.which("chromium") or "/usr/bin/chromium", shutil.which("chromedriver") or "/usr/bin/chromedriver"
    if not (os.path.exists(chromium) and os.path.exists(driver)):
        pytest.skip("no chromium/chromedriver: run scripts/install_chromium.sh (Debian's chromium, chromium-driver)")
    webdriver = pytest.importorskip("selenium.webdriver")
    options = webdriver.ChromeOptions()
    options.binary_location = chromium
    for flag in ("--headless=new", "--no-sandbox", "--disable-dev-shm-usage", "--disable-gpu", "--window-size=1280,900"):
        options.add_argument(flag)
    browser = webdriver.Chrome(service=webdriver.ChromeService(executable_path=driver), options=options)
    yield browser
    browser.quit()


def test_lab_opens_a_chapter_in_headless_chromium(lab, browser):
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support.ui import WebDriverWait

    base, token = lab
    notebook = "06_tensor_parallelism.ipynb"
    cells = json.loads((ROOT / "chapters" / notebook).read_text())["cells"]
    heading = next(line for c in cells if c["cell_type"] == "markdown" for line in c["source"]
                   if line.startswith("# ")).strip("# \n")
    browser.get(f"{base}/lab/tree/{notebook}?token={token}")
    WebDriverWait(browser, STARTUP_TIMEOUT).until(
        lambda b: any(heading in e.text for e in b.find_elements(By.CSS_SELECTOR, ".jp-Notebook .jp-RenderedMarkdown")))
    tabs = [e.text for e in browser.find_elements(By.CSS_SELECTOR, ".lm-TabBar-tabLabel")]
    assert notebook in tabs, tabs


def _idle_kernel_of(base: str, token: str, notebook: str) -> bool:
    status, body = _get(f"{base}/api/sessions", token)
    sessions = json.loads(body or b"[]") if status == 200 else []
    return any(s.get("path", "").endswith(notebook) and s["kernel"]["execution_state"] == "idle" for s in sessions)


def test_opening_and_saving_a_chapter_in_jupyterlab_changes_nothing(lab, browser):
    """A learner opens a chapter and saves it without touching a cell: JupyterLab must not mark it modified
    (it rewrites the kernelspec it starts the kernel from, and the language_info the kernel reports), and
    the saved file must be the stored one byte for byte."""
    from selenium.common.exceptions import StaleElementReferenceException
    from selenium.webdriver.common.action_chains import ActionChains
    from selenium.webdriver.common.by import By
    from selenium.webdriver.common.keys import Keys
    from selenium.webdriver.support.ui import WebDriverWait

    base, token = lab
    notebook = "06b_fused_kernels.ipynb"
    path = ROOT / "chapters" / notebook
    stored, mtime = path.read_bytes(), path.stat().st_mtime_ns
    try:
        # ?reset: JupyterLab's saved workspace would also reopen the chapter an earlier test opened
        browser.get(f"{base}/lab/tree/{notebook}?reset&token={token}")

        def tab_classes(b) -> str | None:  # the notebook's tab, re-read each time (JupyterLab re-renders it)
            try:
                return next((e.get_attribute("class") for e in b.find_elements(By.CSS_SELECTOR, ".lm-TabBar-tab")
                             if notebook in e.text), None)
            except StaleElementReferenceException:
                return None

        WebDriverWait(browser, STARTUP_TIMEOUT).until(lambda b: tab_classes(b) is not None)
        WebDriverWait(browser, STARTUP_TIMEOUT).until(lambda b: _idle_kernel_of(base, token, notebook))
        time.sleep(3)  # the kernel's info reply reaches the notebook's metadata after it is idle
        classes = WebDriverWait(browser, 10).until(tab_classes)
        assert "jp-mod-dirty" not in classes, "JupyterLab marked the notebook modified"
        shown = [e for e in browser.find_elements(By.CSS_SELECTOR, ".jp-NotebookPanel .jp-Notebook") if e.is_displayed()]
        assert len(shown) == 1, f"{len(shown)} notebooks on screen"
        shown[0].click()  # the keyboard's focus in the notebook, for its Ctrl+S
        ActionChains(browser).key_down(Keys.CONTROL).send_keys("s").key_up(Keys.CONTROL).perform()
        WebDriverWait(browser, 30).until(lambda b: path.stat().st_mtime_ns != mtime)
        saved = path.read_bytes()
    finally:
        if path.read_bytes() != stored:
            path.write_bytes(stored)  # the test leaves the chapter as it found it
    assert saved == stored, "JupyterLab's save of the unchanged notebook differs from the stored file"


def test_lab_script_adds_allow_root_only_for_root_and_opens_no_browser_without_a_display():
    # the arguments scripts/lab.sh hands to jupyter (JUPYTER=/bin/echo prints them instead of starting it)
    def args(env):
        base = {k: v for k, v in os.environ.items() if k not in ("DISPLAY", "WAYLAND_DISPLAY", "LAB_OPEN")}
        out = subprocess.run(["scripts/lab.sh"], cwd=ROOT, env=dict(base, JUPYTER="/bin/echo", **env), capture_output=True,
                             text=True, timeout=30, check=True).stdout.split()
        return out

    mine = args({})
    assert mine[:2] == ["lab", "chapters"] and "--ip=127.0.0.1" in mine and "--no-browser" in mine
    assert ("--allow-root" in mine) == (os.getuid() == 0)
    assert "--no-browser" not in args({"DISPLAY": ":0"}) and "--port=9999" in args({"LAB_PORT": "9999"})
    if os.getuid() == 0 and shutil.which("su"):
        as_user = subprocess.run(["su", "nobody", "-s", "/bin/bash", "-c", f"cd {ROOT} && JUPYTER=/bin/echo scripts/lab.sh"],
                                 capture_output=True, text=True, timeout=30)
        assert as_user.returncode == 0 and "--allow-root" not in as_user.stdout, as_user.stdout + as_user.stderr
