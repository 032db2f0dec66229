"""The dashboard (``GET /admin/ui``) in a real browser, against ``vllm-gateway serve`` with two
simulated models: the token, live requests, the buttons, and screenshots at a desktop's and a
phone's size, light and dark."""

from __future__ import annotations

import os
import struct
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from anyio.from_thread import start_blocking_portal

from tests.support import (
    HTTP,
    chat,
    gateway_process,
    make_config,
    redis_server,
    serving,
    static_model,
)

TOKEN = "dash-t0ken"
ADMIN = {"authorization": f"Bearer {TOKEN}"}
SIM = '["{python}", "-m", "simulator", "--port", "{port}", "--model", "{name}"]'
CONFIG = f"""
[gateway]
gpu_memory_mb = 24576
log_format = "json"

[admin]
token = "{TOKEN}"

[[tenants]]
name = "default"
rpm_limit = 1000

[[models]]
name = "llama-3.1-8b"
launcher = "process"
command = {SIM}
startup_timeout = 20.0
vram_mb = 16384
gpus = [0]

[[models]]
name = "qwen2.5-1.5b"
launcher = "process"
command = {SIM}
startup_timeout = 20.0
vram_mb = 4096
gpus = [0]
"""
READY, STOPPED = "llama-3.1-8b", "qwen2.5-1.5b"


@pytest.fixture
def gateway(tmp_path: Path) -> Iterator[str]:
    with gateway_process(CONFIG, tmp_path) as (url, _):
        yield url


def wait_for(driver: Any, check: Any, within: float = 10.0) -> Any:
    from selenium.webdriver.support.ui import WebDriverWait

    return WebDriverWait(driver, within, poll_frequency=0.02).until(lambda _: check())


def by_css(driver: Any, css: str) -> Any:
    from selenium.webdriver.common.by import By

    return driver.find_element(By.CSS_SELECTOR, css)


def all_css(driver: Any, css: str) -> list[Any]:
    from selenium.webdriver.common.by import By

    return driver.find_elements(By.CSS_SELECTOR, css)


def open_page(driver: Any, url: str, *, width: int = 1280, height: int = 800) -> None:
    driver.execute_cdp_cmd("Emulation.setDeviceMetricsOverride", {
        "width": width, "height": height, "deviceScaleFactor": 1, "mobile": width < 600})
    driver.get(url + "/admin/ui")


def sign_in(driver: Any, token: str = TOKEN) -> None:
    field = by_css(driver, "#token")
    field.clear()
    field.send_keys(token + "\n")


def signed_in(driver: Any) -> None:
    sign_in(driver)
    wait_for(driver, lambda: by_css(driver, "#conn").text == "● live")


def state_of(driver: Any, model: str) -> str:
    return by_css(driver, f'tr[data-model="{model}"] td.state').text


def admin_state(url: str, model: str) -> str:
    listed = HTTP.get(url + "/admin/models", headers=ADMIN).json()["data"]
    return next(m["state"] for m in listed if m["name"] == model)


def test_the_page_asks_for_the_token_and_refuses_a_wrong_one(browser: Any, gateway: str) -> None:
    open_page(browser, gateway)
    assert by_css(browser, "#login").is_displayed()
    assert not by_css(browser, "#board").is_displayed()
    # The field has the focus: typing is all it takes.
    assert browser.switch_to.active_element == by_css(browser, "#token")

    sign_in(browser, "not-the-token")
    wait_for(browser, lambda: "refused" in by_css(browser, "#login-error").text)
    assert "403" in by_css(browser, "#login-error").text
    assert not by_css(browser, "#board").is_displayed()
    assert browser.execute_script("return sessionStorage.length") == 0

    signed_in(browser)
    assert not by_css(browser, "#login").is_displayed()
    assert not by_css(browser, "#cluster-section").is_displayed()  # no [cluster]
    names = [row.get_attribute("data-model") for row in all_css(browser, "#models tbody tr")]
    assert names == [READY, STOPPED]
    # Asked once: a reload in the same tab keeps it; signing out forgets it.
    browser.refresh()
    wait_for(browser, lambda: by_css(browser, "#conn").text == "● live")
    assert not by_css(browser, "#login").is_displayed()
    by_css(browser, "#signout").click()
    assert by_css(browser, "#login").is_displayed()
    assert browser.execute_script("return sessionStorage.length") == 0


def test_a_request_appears_within_a_second(browser: Any, gateway: str) -> None:
    open_page(browser, gateway)
    signed_in(browser)
    answer = HTTP.post(gateway + "/v1/chat/completions", json=chat(STOPPED),
                       headers={"x-request-id": "from-the-test"}, timeout=30)
    assert answer.status_code == 200
    row = wait_for(browser, lambda: all_css(
        browser, 'tr[data-request-id="from-the-test"]'), within=1.0)[0]
    cells = [cell.text for cell in row.find_elements("css selector", "td")]
    assert cells[1:4] == [STOPPED, "/v1/chat/completions", "200"]
    refused = HTTP.post(gateway + "/v1/chat/completions", json=chat("nope"),
                        headers={"x-request-id": "unknown-model"})
    assert refused.status_code == 404
    row = wait_for(browser, lambda: all_css(
        browser, 'tr[data-request-id="unknown-model"]'), within=1.0)[0]
    assert row.find_element("css selector", "td.error").text == "model_not_found"
    # Newest first.
    ids = [r.get_attribute("data-request-id") for r in all_css(browser, "#requests tbody tr")]
    assert ids[:2] == ["unknown-model", "from-the-test"]
    # The tenants panel: the request and its tokens (the simulator's 4, a prompt of 1).
    row = wait_for(browser, lambda: all_css(
        browser, f'#tenants tr[data-tenant="default"][data-model="{STOPPED}"]'), within=2.0)[0]
    cells = [cell.text for cell in row.find_elements("css selector", "th, td")]
    assert cells == ["default", "0", "1 / 1000", "5", STOPPED, "1", "1", "4", "0", cells[-1]]


def test_load_unload_and_drain_through_the_buttons(browser: Any, gateway: str) -> None:
    from selenium.webdriver.common.keys import Keys

    open_page(browser, gateway)
    signed_in(browser)
    load = by_css(browser, f'tr[data-model="{READY}"] button[data-verb="load"]')
    unload = by_css(browser, f'tr[data-model="{READY}"] button[data-verb="unload"]')
    assert state_of(browser, READY) == "stopped"
    assert not unload.is_enabled()

    # Asked first: cancelling does nothing.
    load.click()
    dialog = by_css(browser, "#confirm")
    assert dialog.is_displayed()
    assert READY in by_css(browser, "#confirm-text").text
    by_css(browser, "#confirm-cancel").click()
    assert not dialog.is_displayed()
    time.sleep(0.3)
    assert admin_state(gateway, READY) == "stopped"

    # With the keyboard alone: Enter on the button, Tab from Cancel to Load, Enter.
    load.send_keys(Keys.ENTER)
    assert dialog.is_displayed()
    active = browser.switch_to.active_element
    assert active == by_css(browser, "#confirm-cancel")
    active.send_keys(Keys.TAB)
    browser.switch_to.active_element.send_keys(Keys.ENTER)
    wait_for(browser, lambda: state_of(browser, READY) == "starting")
    wait_for(browser, lambda: state_of(browser, READY) == "ready", within=30)
    wait_for(browser, lambda: "now ready" in by_css(browser, "#outcome").text)
    assert admin_state(gateway, READY) == "ready"
    address = by_css(browser, f'tr[data-model="{READY}"] td.address').text
    assert address.startswith("http://127.0.0.1:")

    unload.click()
    by_css(browser, "#confirm-ok").click()
    wait_for(browser, lambda: state_of(browser, READY) == "stopped", within=30)
    wait_for(browser, lambda: "now stopped" in by_css(browser, "#outcome").text)
    assert admin_state(gateway, READY) == "stopped"

    by_css(browser, "#drain").click()
    by_css(browser, "#confirm-ok").click()
    wait_for(browser, lambda: by_css(browser, "#gateway").text.startswith("draining"))
    assert "Draining" in by_css(browser, "#outcome").text
    assert HTTP.get(gateway + "/ready").status_code == 503
    assert not by_css(browser, "#drain").is_enabled()


def png_size(path: Path) -> tuple[int, int]:
    header = path.read_bytes()[:24]
    assert header[:8] == b"\x89PNG\r\n\x1a\n"
    return struct.unpack(">II", header[16:24])


def screenshot(driver: Any, path: Path, width: int, height: int) -> None:
    path.write_bytes(driver.get_screenshot_as_png())
    assert png_size(path) == (width, height)
    # A blank or half-drawn page compresses to a few KB.
    assert path.stat().st_size > 30_000


def test_screenshots_with_one_model_ready_and_one_stopped(browser: Any, gateway: str,
                                                         artifacts: Path) -> None:
    assert HTTP.post(gateway + f"/admin/models/{READY}/load", headers=ADMIN,
                     timeout=30).status_code == 200
    open_page(browser, gateway)
    signed_in(browser)
    for i in range(12):
        stream = i % 3 == 0
        response = HTTP.post(gateway + "/v1/chat/completions",
                             json=chat(READY, max_tokens=8, stream=stream), timeout=30)
        assert response.status_code == 200
    HTTP.post(gateway + "/v1/chat/completions", json=chat("gpt-4o"))
    wait_for(browser, lambda: len(all_css(browser, "#requests tbody tr")) == 13)
    assert state_of(browser, READY) == "ready"
    assert state_of(browser, STOPPED) == "stopped"
    assert "16.0 GiB" in by_css(browser, ".gpu").text

    screenshot(browser, artifacts / "dashboard-1280x800.png", 1280, 800)
    overflow = "return document.documentElement.scrollWidth > window.innerWidth"
    assert not browser.execute_script(overflow)

    browser.execute_cdp_cmd("Emulation.setEmulatedMedia", {
        "features": [{"name": "prefers-color-scheme", "value": "dark"}]})
    try:
        background = browser.execute_script(
            "return getComputedStyle(document.body).backgroundColor")
        assert background == "rgb(18, 20, 24)"
        screenshot(browser, artifacts / "dashboard-1280x800-dark.png", 1280, 800)
    finally:
        browser.execute_cdp_cmd("Emulation.setEmulatedMedia", {"features": []})

    browser.execute_cdp_cmd("Emulation.setDeviceMetricsOverride", {
        "width": 390, "height": 844, "deviceScaleFactor": 1, "mobile": True})
    try:
        wait_for(browser, lambda: not browser.execute_script(overflow))
        # The models are cards on a phone: each cell says what it is.
        label = browser.execute_script(
            "return getComputedStyle(arguments[0], '::before').content",
            by_css(browser, f'tr[data-model="{READY}"] td.in_flight'))
        assert label == '"In flight"'
        screenshot(browser, artifacts / "dashboard-390x844.png", 390, 844)
    finally:
        browser.execute_cdp_cmd("Emulation.clearDeviceMetricsOverride", {})


def test_a_model_with_replicas_shows_each_one(browser: Any, tmp_path: Path) -> None:
    config = CONFIG + """
[[models]]
name = "replicated"
launcher = "process"
command = """ + SIM + """
startup_timeout = 20.0
max_replicas = 2
min_replicas = 2
"""
    with gateway_process(config, tmp_path) as (url, _):
        open_page(browser, url)
        signed_in(browser)
        wait_for(browser, lambda: "2/2 replicas ready" in state_of(browser, "replicated"),
                 within=30)
        badges = [b.text for b in all_css(browser, 'tr[data-model="replicated"] td.state .badge')]
        assert badges == ["ready", "#0", "#1"]
        address = by_css(browser, 'tr[data-model="replicated"] td.address').text
        assert address.startswith("#0 http://127.0.0.1:") and ", #1 http://127.0.0.1:" in address


def test_a_cluster_shows_its_members_and_the_pools_owner(browser: Any, tmp_path: Path) -> None:
    # In this process, on a thread (a gateway process would take seconds to start).
    with redis_server(tmp_path) as redis_url, start_blocking_portal() as portal:
        config = make_config([static_model("m", "http://127.0.0.1:9")], admin={"token": TOKEN},
                             cluster={"redis_url": redis_url})
        with portal.wrap_async_context_manager(serving(config)) as (url, gateway):
            open_page(browser, url)
            signed_in(browser)
            wait_for(browser, lambda: by_css(browser, "#cluster-section").is_displayed())
            (row,) = all_css(browser, "#cluster tbody tr")
            assert row.get_attribute("data-member") == gateway.node.id
            assert row.find_element("css selector", "td.num").text == str(os.getpid())
            assert by_css(browser, "#cluster td.role").text == "owner, this page"
            summary = by_css(browser, "#cluster-summary").text
            assert f"Pool owner: {gateway.node.id} (fencing token 1)" in summary
            assert "the owner." in summary
