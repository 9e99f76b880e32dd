"""Headless Chromium for tests: Debian's chromium and chromium-driver, driven by Selenium. The test
set-up installs them (scripts/_env.sh, as root); elsewhere the browser tests skip saying so, and
fail under CBORG_REQUIRE_SERVICES=1."""
from __future__ import annotations

import contextlib
import os
import shutil
from pathlib import Path

import pytest

CHROMIUM = os.environ.get("CBORG_CHROMIUM", "/usr/bin/chromium")
CHROMEDRIVER = os.environ.get("CBORG_CHROMEDRIVER", "/usr/bin/chromedriver")
PHONE = (390, 844)          # a phone's viewport, CSS pixels
DESKTOP = (1280, 900)


def missing() -> str | None:
    for p in (CHROMIUM, CHROMEDRIVER):
        if not (os.path.exists(p) or shutil.which(p)):
            return (f"{p} is not installed: the test set-up installs Debian's chromium and chromium-driver "
                    "(scripts/_env.sh, as root: apt-get install chromium chromium-driver)")
    try:
        import selenium  # noqa: F401
    except ImportError:
        return "selenium is not installed (pip install 'cborg[dev]')"
    return None


def require_browser() -> None:
    why = missing()
    if why:
        if os.environ.get("CBORG_REQUIRE_SERVICES") == "1":
            pytest.fail(why + " - CBORG_REQUIRE_SERVICES=1 forbids skipping")
        pytest.skip(why)


@contextlib.contextmanager
def chromium(size: tuple[int, int] = DESKTOP):
    """A fresh headless browser (its own profile: no cookies shared between tests' users)."""
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service

    o = webdriver.ChromeOptions()
    o.binary_location = CHROMIUM
    for a in ("--headless=new", "--no-sandbox", "--disable-dev-shm-usage", "--disable-gpu",
              "--disable-extensions", "--no-first-run", "--disable-background-networking",
              f"--window-size={size[0]},{size[1]}", "--force-device-scale-factor=1"):
        o.add_argument(a)
    d = webdriver.Chrome(service=Service(CHROMEDRIVER), options=o)
    d.set_page_load_timeout(60)
    try:
        yield d
    finally:
        d.quit()


def screenshot(driver, name: str, tmp: Path) -> Path:
    """A PNG of the whole page in CBORG_SCREENSHOTS (e.g. docs/key-manager), else under tmp."""
    out = Path(os.environ.get("CBORG_SCREENSHOTS") or tmp)
    out.mkdir(parents=True, exist_ok=True)
    w = driver.get_window_size()["width"]
    h = driver.execute_script("return document.documentElement.scrollHeight")
    driver.set_window_size(w, max(h, 300) + 140)       # (the window's frame: the viewport is smaller)
    path = out / f"{name}.png"
    driver.find_element("tag name", "body").screenshot(str(path))
    return path
