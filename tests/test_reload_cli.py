"""Live reload of a real ``vllm-gateway serve`` process: SIGHUP reads the file again, and
``--watch-config`` reads it once per change, complete, whether the file is renamed into place
or truncated then written."""

from __future__ import annotations

import os
import signal
import time
from pathlib import Path
from typing import Any

from tests.support import HTTP, gateway_process, wait_until

TOKEN = "t0ken"


def config_text(queue: int) -> str:
    return (f'[admin]\ntoken = "{TOKEN}"\n[[models]]\nname = "m"\nlauncher = "static"\n'
            f'url = "http://127.0.0.1:9"\nmax_queue_size = {queue}\n')


def reloads(url: str) -> dict[str, Any]:
    view = HTTP.get(url + "/admin/models", headers={"authorization": f"Bearer {TOKEN}"}).json()
    return view["config"]["reloads"]


def test_sighup_and_watch_config_each_reload_once(tmp_path: Path) -> None:
    """One process for both (a start costs seconds): SIGHUP reads the file again; the watch
    reads a rename into place, then a truncate-then-write, once each."""
    with gateway_process(config_text(5), tmp_path, "--watch-config") as (url, proc):
        path = tmp_path / "gateway.toml"
        before = HTTP.get(url + "/health").json()["config_hash"]
        proc.send_signal(signal.SIGHUP)  # the file as it is: applied, nothing changed
        wait_until(lambda: reloads(url)["applied"] == 1)
        assert HTTP.get(url + "/health").json()["config_hash"] == before
        staged = tmp_path / "staged.toml"
        staged.write_text(config_text(6))
        os.replace(staged, path)
        wait_until(lambda: reloads(url)["applied"] == 2)
        assert HTTP.get(url + "/health").json()["config_hash"] != before
        with path.open("w") as f:  # an editor: truncate, then write a moment later
            f.flush()
            os.fsync(f.fileno())
            time.sleep(0.05)
            f.write(config_text(7))
        wait_until(lambda: reloads(url)["applied"] == 3)
        time.sleep(0.5)
        assert reloads(url) == {"applied": 3, "invalid": 0, "refused": 0}
        assert proc.poll() is None
