"""Debian's Chromium, headless, driven by selenium through Debian's chromedriver: for the
web console's tests (``apt-get install chromium chromium-driver``; dev/test does it).

``with chromium(profile_dir) as driver: driver.get(url)`` — a fresh profile in
*profile_dir* (removed afterwards), no network of its own (no component updates, sync,
background requests), no sandbox (tests run as root in containers), a 1400x1000 window.
``Screenshots(directory, record)`` saves numbered PNGs and tells where they are.
"""
from __future__ import annotations

import contextlib
import os
import shutil
import time
from pathlib import Path

CHROMIUM = Path("/usr/bin/chromium")
CHROMEDRIVER = Path("/usr/bin/chromedriver")
ARGS = ("--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking",
        "--disable-component-update", "--disable-sync", "--no-first-run",
        "--disable-dev-shm-usage", "--window-size=1400,1000")


@contextlib.contextmanager
def chromium(profile_dir: Path, page_load_timeout: float = 120.0):
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service

    if not (CHROMIUM.exists() and CHROMEDRIVER.exists()):
        raise RuntimeError("Debian's chromium and chromium-driver are needed "
                           "(apt-get install -y chromium chromium-driver; dev/test does it)")
    os.environ.setdefault("SE_AVOID_STATS", "true")
    profile_dir = Path(profile_dir)
    options = webdriver.ChromeOptions()
    options.binary_location = str(CHROMIUM)
    for arg in (*ARGS, f"--user-data-dir={profile_dir}"):
        options.add_argument(arg)
    service = Service(str(CHROMEDRIVER),
                      log_output=str(profile_dir.parent / "chromedriver.log"))
    driver = webdriver.Chrome(service=service, options=options)
    driver.set_page_load_timeout(page_load_timeout)
    try:
        yield driver
    finally:
        driver.quit()
        shutil.rmtree(profile_dir, ignore_errors=True)


class Screenshots:
    """``shot(driver, "studies")`` -> *directory*/01-studies.png; the path is printed and
    passed to *record* (e.g. pytest's ``record_property``) so it is in the test's output."""

    def __init__(self, directory: Path, record=None):
        self.directory, self.record = Path(directory), record
        self.taken: list[Path] = []

    def __call__(self, driver, name: str) -> Path:
        self.directory.mkdir(parents=True, exist_ok=True)
        path = self.directory / f"{len(self.taken) + 1:02d}-{name}.png"
        if not driver.save_screenshot(str(path)):
            raise RuntimeError(f"no screenshot saved to {path}")
        self.taken.append(path)
        print(f"screenshot: {path}")
        if self.record is not None:
            self.record(f"screenshot {name}", str(path))
        return path


def texts(driver, css: str) -> list[str]:
    """The visible text of every element *css* selects."""
    from selenium.webdriver.common.by import By
    return [e.text for e in driver.find_elements(By.CSS_SELECTOR, css)]


def wait_until(check, what: str, bound: float = 240.0, every: float = 0.25):
    """Poll *check* until truthy (its value is returned); AssertionError after *bound*
    seconds (a long bound: a busy machine must not fail a test)."""
    deadline = time.monotonic() + bound
    while True:
        value = check()
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"still not: {what}")
        time.sleep(every)
