import os
import shutil
import tempfile
from pathlib import Path

import pytest
import torch

from normscope.data import load_digits

CHROMIUM = Path("/usr/bin/chromium")
CHROMEDRIVER = Path("/usr/bin/chromedriver")
BROWSER_INSTALL = "apt-get install chromium chromium-driver"
_browser_skips: list[str] = []


@pytest.fixture(scope="session")
def digits64():
    """The first 64 digits in float64."""
    images, labels = load_digits(torch.float64)
    return images[:64], labels[:64]


@pytest.fixture(scope="session")
def digits32():
    images, labels = load_digits(torch.float32)
    return images[:64], labels[:64]


def _skip_or_fail(reason: str) -> None:
    """Skip the browser test, except where the environment variable CI is set: there it must run."""
    if os.environ.get("CI"):
        pytest.fail(reason + "; CI is set, so the browser test must run")
    _browser_skips.append(reason)
    pytest.skip(reason)


@pytest.fixture()
def browser():
    """A headless Chromium driven by selenium (Debian's chromium and chromium-driver)."""
    if not (CHROMIUM.exists() and CHROMEDRIVER.exists()):
        _skip_or_fail(f"headless Chromium needs {CHROMIUM} and {CHROMEDRIVER} ({BROWSER_INSTALL})")
    try:
        from selenium import webdriver
    except ImportError:
        _skip_or_fail("the browser test needs selenium (pip install selenium)")
    from selenium.webdriver.chrome.service import Service

    profile = tempfile.mkdtemp(prefix="normscope-chromium-")
    options = webdriver.ChromeOptions()
    options.binary_location = str(CHROMIUM)
    for arg in ("--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                "--disable-background-networking", "--disable-component-update", "--disable-sync",
                "--disable-dev-shm-usage", "--window-size=1280,1000", f"--user-data-dir={profile}"):
        options.add_argument(arg)
    options.set_capability("goog:loggingPrefs", {"browser": "ALL"})
    driver = webdriver.Chrome(service=Service(str(CHROMEDRIVER)), options=options)
    try:
        yield driver
    finally:
        driver.quit()
        shutil.rmtree(profile, ignore_errors=True)


def pytest_terminal_summary(terminalreporter) -> None:
    """One line in the summary when browser tests were skipped, with the reason and the install line."""
    if _browser_skips:
        terminalreporter.write_line(f"{len(_browser_skips)} browser test(s) of the report skipped: {_browser_skips[0]}", yellow=True)
