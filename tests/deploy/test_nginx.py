"""The gateway behind a real nginx running deploy/nginx.conf: tokens stream through one by one,
a client that leaves aborts the generation, and the access log names the real client."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import time
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from itertools import pairwise
from pathlib import Path

import httpx2
import pytest

from backends.launcher import free_port
from tests.support import HTTP, ROOT, Simulator, chat, gateway_process, simulator, wait_until

from .conftest import access_log, need, stop

SITE = ROOT / "deploy" / "nginx.conf"
TOKENS_PER_SECOND = 20


def nginx_binary() -> str | None:
    return shutil.which("nginx") or next(
        (path for path in ("/usr/sbin/nginx", "/usr/local/sbin/nginx") if os.access(path, os.X_OK)),
        None)


def site_config(listen: int, gateway: int) -> str:
    """deploy/nginx.conf with this test's ports in place of 80 and 8080."""
    text = SITE.read_text()
    for old, new in (("listen 80;", f"listen 127.0.0.1:{listen};"),
                     ("server 127.0.0.1:8080;", f"server 127.0.0.1:{gateway};")):
        assert text.count(old) == 1, f"deploy/nginx.conf should hold {old!r} once"
        text = text.replace(old, new)
    return text


def main_config(prefix: Path) -> str:
    """What a distribution's nginx.conf gives around a site file, all inside ``prefix``."""
    temp = "\n".join(f"    {kind}_temp_path {prefix}/{kind};"
                     for kind in ("client_body", "proxy", "fastcgi", "uwsgi", "scgi"))
    user = "user root;" if os.geteuid() == 0 else ""  # workers can enter pytest's 0700 tmp
    return f"""{user}
worker_processes 1;
pid {prefix}/nginx.pid;
error_log {prefix}/error.log;
events {{ worker_connections 256; }}
http {{
    access_log {prefix}/access.log;
{temp}
    include {prefix}/site.conf;
}}
"""


@dataclass
class Stack:
    nginx: str
    gateway: str
    gateway_log: Path
    sim: Simulator


@pytest.fixture(scope="module")
def stack(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Stack]:
    binary = nginx_binary()
    need(None if binary else "nginx missing; run scripts/setup-system.sh (as root)")
    assert binary is not None
    tmp = tmp_path_factory.mktemp("nginx")
    with simulator("--tokens-per-second", str(TOKENS_PER_SECOND), model="sim") as sim:
        config = f"""
[gateway]
trusted_proxies = ["127.0.0.1"]
log_format = "json"

[[models]]
name = "sim"
launcher = "static"
url = "{sim.url}"
"""
        with gateway_process(config, tmp) as (gateway, _):
            port = free_port()
            (tmp / "site.conf").write_text(site_config(port, int(gateway.rsplit(":", 1)[1])))
            (tmp / "nginx.conf").write_text(main_config(tmp))
            with open(tmp / "stderr.log", "w") as stderr:
                nginx = subprocess.Popen(
                    [binary, "-p", str(tmp), "-c", str(tmp / "nginx.conf"), "-g", "daemon off;"],
                    stdout=subprocess.DEVNULL, stderr=stderr)
            url = f"http://127.0.0.1:{port}"
            try:
                wait_until(lambda: nginx.poll() is not None
                           or HTTP.get(url + "/health").status_code == 200)
                assert nginx.poll() is None, (tmp / "stderr.log").read_text()
                yield Stack(url, gateway, tmp / "gateway.log", sim)
            finally:
                stop(nginx)


def content_arrivals(client: httpx2.Client, url: str, **request: object) -> list[float]:
    arrivals = []
    with client.stream("POST", url + "/v1/chat/completions", json=chat("sim", stream=True,
                                                                       **request)) as response:
        assert response.status_code == 200
        assert response.headers["content-type"].startswith("text/event-stream")
        for line in response.iter_lines():
            if line.startswith("data: {") and json.loads(line[6:])["choices"][0]["delta"].get(
                    "content"):
                arrivals.append(time.monotonic())
    return arrivals


def test_tokens_arrive_one_by_one_through_nginx(stack: Stack) -> None:
    arrivals = content_arrivals(HTTP, stack.nginx, max_tokens=10)
    assert len(arrivals) == 10
    # 10 tokens at 20 per second: the first is 0.45 s ahead of the last, each ~50 ms apart;
    # a buffering proxy would deliver them together at the end.
    assert arrivals[-1] - arrivals[0] > 0.3
    assert sum(later - earlier > 0.02 for earlier, later in pairwise(arrivals)) >= 6


def test_a_client_leaving_through_nginx_aborts_the_generation(stack: Stack) -> None:
    HTTP.post(stack.sim.url + "/sim/reset")
    seen = 0
    with HTTP.stream("POST", stack.nginx + "/v1/chat/completions",
                     json=chat("sim", max_tokens=400, stream=True)) as response:
        for line in response.iter_lines():
            seen += '"content":"tok "' in line
            if seen == 2:
                break  # leaving the block closes the connection, 20 s before the answer ends
    wait_until(lambda: stack.sim.stats()["aborted"] == 1, timeout=5)
    assert stack.sim.stats()["completed"] == 0


def test_access_log_names_the_client_nginx_forwarded_and_only_that(stack: Stack) -> None:
    def ask(url: str, source: str, **headers: str) -> str:
        request_id = uuid.uuid4().hex
        transport = httpx2.HTTPTransport(local_address=source)
        with httpx2.Client(transport=transport, timeout=10) as client:
            response = client.get(url + "/v1/models", headers={"x-request-id": request_id,
                                                               **headers})
        assert response.status_code == 200
        return request_id

    through_nginx = ask(stack.nginx, "127.0.0.5")
    spoofed_through_nginx = ask(stack.nginx, "127.0.0.5", **{"x-forwarded-for": "203.0.113.9"})
    spoofed_direct = ask(stack.gateway, "127.0.0.7", **{"x-forwarded-for": "203.0.113.9"})

    def client(request_id: str) -> str:
        wait_until(lambda: access_log(stack.gateway_log, request_id) is not None, timeout=5)
        entry = access_log(stack.gateway_log, request_id)
        assert entry is not None
        return entry["client"]

    assert client(through_nginx) == "127.0.0.5"  # nginx itself connects from 127.0.0.1
    assert client(spoofed_through_nginx) == "127.0.0.5"  # nginx appends the real peer last
    assert client(spoofed_direct) == "127.0.0.7"  # not a trusted proxy: its header is ignored


def test_a_413_the_gateway_refuses_before_reading_reaches_the_client_through_nginx(
        stack: Stack) -> None:
    # Under nginx's client_max_body_size (16m), over the gateway's max_body_bytes (10 MiB):
    # nginx sends the whole body on, the gateway refuses it by its Content-Length.
    for _ in range(2):
        response = HTTP.post(stack.nginx + "/v1/chat/completions", content=b"x" * (12 << 20),
                             headers={"content-type": "application/json"}, timeout=30)
        assert response.status_code == 413
        assert response.json()["error"]["code"] == "request_too_large"
