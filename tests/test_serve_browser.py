"""``oxigaf serve`` in a real browser: headless Chromium (Debian's ``chromium`` and ``chromium-driver``,
which .ci/run installs) uploads a photo, clicks Generate, waits for the views and saves a screenshot."""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import numpy as np
import pytest
from PIL import Image
from serve_helpers import server

selenium = pytest.importorskip("selenium")
from selenium import webdriver  # noqa: E402
from selenium.webdriver.chrome.service import Service  # noqa: E402
from selenium.webdriver.common.by import By  # noqa: E402
from selenium.webdriver.support import expected_conditions as ec  # noqa: E402
from selenium.webdriver.support.ui import WebDriverWait  # noqa: E402

CHROMIUM = shutil.which("chromium") or "/usr/bin/chromium"
CHROMEDRIVER = shutil.which("chromedriver") or "/usr/bin/chromedriver"
# Headless, and nothing that reaches out to other hosts.
FLAGS = ("--headless=new", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
         "--disable-background-networking", "--disable-component-update", "--disable-sync",
         "--disable-dev-shm-usage", "--window-size=1400,1200")
# Few steps keep the test fast; OXIGAF_SERVE_BROWSER_STEPS=30 makes the views worth a screenshot.
STEPS = int(os.environ.get("OXIGAF_SERVE_BROWSER_STEPS", "2"))

pytestmark = pytest.mark.skipif(
    not (os.path.isfile(CHROMIUM) and os.path.isfile(CHROMEDRIVER)),
    reason="needs Debian's chromium and chromium-driver (apt-get install chromium chromium-driver; .ci/run does)",
)


@pytest.fixture()
def browser(tmp_path):
    opts = webdriver.ChromeOptions()
    opts.binary_location = CHROMIUM
    for flag in FLAGS:
        opts.add_argument(flag)
    opts.add_argument(f"--user-data-dir={tmp_path / 'profile'}")
    opts.set_capability("goog:loggingPrefs", {"performance": "ALL"})  # the network requests it makes
    driver = webdriver.Chrome(service=Service(CHROMEDRIVER), options=opts)
    try:
        yield driver
    finally:
        driver.quit()


def test_upload_generate_and_see_the_views(tmp_path, browser):
    root = tmp_path / "out"
    with server(root, "--steps", str(STEPS), module="oxigaf.cli serve") as (url, root, proc):  # the oxigaf command
        photo = root / "examples" / "toy_head.png"
        browser.get(url)
        wait = WebDriverWait(browser, 120)
        upload = wait.until(ec.presence_of_element_located((By.CSS_SELECTOR, "#photo input[type=file]")))
        upload.send_keys(str(photo))
        # the photo shows before Generate is pressed
        wait.until(ec.presence_of_element_located((By.CSS_SELECTOR, "#photo img")))
        browser.find_element(By.CSS_SELECTOR, "#generate").click()
        views = WebDriverWait(browser, 300).until(
            lambda d: [img for img in d.find_elements(By.CSS_SELECTOR, "#views img")
                       if d.execute_script("return arguments[0].complete && arguments[0].naturalWidth", img)]
            if len(d.find_elements(By.CSS_SELECTOR, "#views img")) >= 4 else False)
        assert len(views) >= 4
        wait.until(lambda d: d.find_elements(By.CSS_SELECTOR, "#turntable img"))
        wait.until(lambda d: d.find_elements(By.CSS_SELECTOR, "#download a"))
        assert not browser.find_elements(By.CSS_SELECTOR, ".toast-body.error")
        # every request the page made (failed ones too) went to the server: no fonts, scripts or
        # analytics from other hosts
        asked = [json.loads(e["message"])["message"].get("params", {}).get("request", {}).get("url")
                 for e in browser.get_log("performance")]
        web = [u for u in asked if u and u.startswith(("http:", "https:", "ws:", "wss:"))]
        assert web and all(u.startswith(url) for u in web), [u for u in web if not u.startswith(url)]
        shot = tmp_path / "serve.png"
        browser.execute_script("window.scrollTo(0, 0)")
        browser.save_screenshot(str(shot))
        assert proc.poll() is None
    with Image.open(shot) as img:
        assert img.size[0] >= 1000 and np.asarray(img.convert("L")).std() > 10  # not a blank page
    # the request's own folder holds what the page showed
    runs = [p for p in (root / "runs").iterdir() if not p.name.startswith(".")]
    assert len(runs) == 1 and len(list((runs[0] / "oxigaf").glob("view_*.png"))) == 4
    # OXIGAF_SERVE_SCREENSHOT=docs/serve.png keeps the screenshot (the README's picture is made so)
    if os.environ.get("OXIGAF_SERVE_SCREENSHOT"):
        Path(os.environ["OXIGAF_SERVE_SCREENSHOT"]).write_bytes(shot.read_bytes())
