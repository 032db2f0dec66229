"""The dashboard's tests drive a real browser: Debian's headless Chromium through its
chromedriver (``apt-get install chromium chromium-driver``; scripts/setup-system.sh installs
both). Without them the tests skip, saying so; with VLLM_GATEWAY_TEST_REQUIRE_ENGINE=1 (CI)
they fail instead. Screenshots go to $VLLM_GATEWAY_TEST_ARTIFACTS (else pytest's temporary
folder), to be kept by CI and looked at."""

from __future__ import annotations

import os
import shutil
import tempfile
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.support import need

CHROMIUM = "/usr/bin/chromium"
CHROMEDRIVER = "/usr/bin/chromedriver"
# Headless, as root, and quiet: no sandbox (root), no network of its own, a profile of its own.
FLAGS = ("--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
         "--disable-background-networking", "--disable-component-update", "--disable-sync",
         "--window-size=1280,800")


def _problem() -> str | None:
    missing = [path for path in (CHROMIUM, CHROMEDRIVER) if not Path(path).exists()]
    if missing:
        # Both packages, whichever is missing: the browser is no use without its driver.
        return (f"{' and '.join(missing)} missing: apt-get install chromium chromium-driver "
                "(Debian's packages; scripts/setup-system.sh installs them)")
    try:
        import selenium  # noqa: F401
    except ImportError:
        return "selenium missing: scripts/bootstrap.sh installs the test extras"
    return None


@pytest.fixture(scope="session")
def browser() -> Iterator[object]:
    need(_problem())
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service

    profile = tempfile.mkdtemp(prefix="vllm-gateway-chromium-")
    options = webdriver.ChromeOptions()
    options.binary_location = CHROMIUM
    for flag in (*FLAGS, f"--user-data-dir={profile}"):
        options.add_argument(flag)
    driver = webdriver.Chrome(service=Service(CHROMEDRIVER), options=options)
    try:
        yield driver
    finally:
        driver.quit()
        shutil.rmtree(profile, ignore_errors=True)


@pytest.fixture(scope="session")
def artifacts(tmp_path_factory: pytest.TempPathFactory) -> Path:
    folder = os.environ.get("VLLM_GATEWAY_TEST_ARTIFACTS")
    path = Path(folder) if folder else tmp_path_factory.mktemp("artifacts")
    path.mkdir(parents=True, exist_ok=True)
    return path
