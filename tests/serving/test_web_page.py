"""The web page at ``/`` in real headless Chromium (Debian's, installed by scripts/install_chromium.sh).

Selenium drives /usr/bin/chromedriver (given explicitly, so selenium never
downloads a driver): type a prompt, set greedy decoding, press Generate, wait
for the streamed answer, and compare it with ``transformers``' greedy text.
"""
from __future__ import annotations

import os
import subprocess

import pytest
from conftest import ROOT

CHROMIUM, CHROMEDRIVER = "/usr/bin/chromium", "/usr/bin/chromedriver"


@pytest.fixture(scope="module")
def browser():
    if not (os.access(CHROMIUM, os.X_OK) and os.access(CHROMEDRIVER, os.X_OK)):
        r = subprocess.run(["bash", os.path.join(ROOT, "scripts", "install_chromium.sh")], capture_output=True,
                           text=True, timeout=600)
        if r.returncode != 0:
            message = f"chromium could not be installed:\n{r.stdout[-2000:]}{r.stderr[-2000:]}"
            if os.environ.get("CI"):
                pytest.fail(message)          # CI runs as root: it must be able to install it
            pytest.skip(message)
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service

    options = webdriver.ChromeOptions()
    options.binary_location = CHROMIUM
    for arg in ("--headless=new", "--no-sandbox", "--disable-dev-shm-usage", "--disable-gpu"):
        options.add_argument(arg)
    driver = webdriver.Chrome(service=Service(executable_path=CHROMEDRIVER), options=options)
    driver.set_page_load_timeout(60)
    yield driver
    driver.quit()


def test_page_streams_a_greedy_answer(browser, one_rank_server, hf_greedy, tiny_tokenizer):
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support.ui import WebDriverWait

    prompt, n = "The quick brown fox", 12
    browser.get(one_rank_server.url + "/")
    WebDriverWait(browser, 30).until(lambda d: d.find_element(By.ID, "model-name").text != "(loading)")
    for field, value in (("prompt", prompt), ("max_tokens", str(n)), ("temperature", "0")):
        element = browser.find_element(By.ID, field)
        element.clear()
        element.send_keys(value)
    browser.find_element(By.ID, "generate").click()
    WebDriverWait(browser, 60).until(
        lambda d: d.find_element(By.ID, "status").get_attribute("data-state") in ("done", "error"))
    status = browser.find_element(By.ID, "status").text
    assert status.startswith("done"), status
    ids = hf_greedy(prompt, n)
    gen = [t for t in ids[len(tiny_tokenizer.tokenize(prompt)):] if t != tiny_tokenizer.eod]
    answer = browser.execute_script("return document.getElementById('answer').textContent")
    assert answer == tiny_tokenizer.detokenize(gen)
    chunks = int(status.split(", ")[1].split()[0])
    assert chunks > 1                    # the answer arrived in pieces (streamed)


def test_an_error_is_shown_in_red(browser, one_rank_server):
    """A request the server refuses (more tokens than the model has positions): the status says the error,
    in the error colour (#b00), not the grey of a normal status line."""
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support.ui import WebDriverWait

    browser.get(one_rank_server.url + "/")
    WebDriverWait(browser, 30).until(lambda d: d.find_element(By.ID, "model-name").text != "(loading)")
    element = browser.find_element(By.ID, "max_tokens")
    element.clear()
    element.send_keys("100000")
    browser.find_element(By.ID, "generate").click()
    WebDriverWait(browser, 60).until(
        lambda d: d.find_element(By.ID, "status").get_attribute("data-state") in ("done", "error"))
    status = browser.find_element(By.ID, "status")
    assert status.get_attribute("data-state") == "error" and status.text.startswith("error 400"), status.text
    assert status.value_of_css_property("color") in ("rgba(187, 0, 0, 1)", "rgb(187, 0, 0)")
