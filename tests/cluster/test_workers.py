"""``vllm-gateway serve --workers 2`` as a real process in front of a static simulator: its two
workers share one port and a private redis-server it starts, keep a model's limits exactly
across themselves, elect one pool owner, reload on its SIGHUP, and stop with it, the
redis-server and its folder too; a worker killed by kill -9 is started again while the other
serves, and so is the private redis-server. Without redis-server on PATH, or without coredis,
``--workers 2`` is refused with one line and status 2."""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import anyio
import httpx2
import pytest

from cluster import private_redis
from proxy import workers
from proxy.cli import main
from tests.cluster.test_gateways import model_table
from tests.cluster.test_pool_owner import ADMIN, TOKEN
from tests.support import chat, gateway_process, is_running, need, simulator, wait_until


def config_text(sim_url: str) -> str:
    return model_table(sim_url) + f"""
[admin]
token = "{TOKEN}"
"""


@dataclass
class Served:
    url: str
    proc: subprocess.Popen[bytes]
    log: Path
    runtime: Path

    def worker_pids(self) -> list[int]:
        """The workers the supervisor started, in order (its log's ``worker started``)."""
        lines = [json.loads(line) for line in self.log.read_text().splitlines()
                 if line.startswith("{")]
        return [line["pid"] for line in lines if line.get("event") == "worker started"]

    def redis_pid(self) -> int:
        """The private redis-server's pid (the supervisor's child that is not a worker)."""
        pid = self.proc.pid
        (redis,) = [child for child in map(int, Path(
            f"/proc/{pid}/task/{pid}/children").read_text().split()) if child not in
            self.worker_pids()]
        return redis


@contextlib.contextmanager
def workers_gateway(tmp_path: Path, sim_url: str, *args: str) -> Iterator[Served]:
    """``serve --workers 2`` with its private redis-server's folder in a runtime directory of
    its own (a short path: a unix socket's may not pass 107 bytes, and an xdist worker's
    ``tmp_path`` is long), until both workers are members; SIGTERM at the end."""
    need(None if shutil.which(private_redis.BINARY)
         else "redis-server is not installed (Debian: apt-get install redis-server)")
    runtime = Path(tempfile.mkdtemp(prefix="run-"))
    env = {"XDG_RUNTIME_DIR": str(runtime), "GATEWAY_LOG_FORMAT": "json"}
    try:
        with gateway_process(config_text(sim_url), tmp_path, "--workers", "2", *args,
                             env=env) as (url, proc):
            served = Served(url, proc, tmp_path / "gateway.log", runtime)
            wait_until(lambda: len(members(url)) == 2, timeout=30)
            yield served
    finally:
        shutil.rmtree(runtime, ignore_errors=True)


def snapshot(url: str) -> dict[str, object]:
    """The cluster as the worker that takes this new connection sees it (the admin event
    stream's first snapshot)."""
    with httpx2.Client(timeout=5) as fresh, fresh.stream(
            "GET", url + "/admin/events", headers=ADMIN) as events:
        for line in events.iter_lines():
            if line.startswith("data: "):
                return json.loads(line[6:])["cluster"]
    raise AssertionError("no snapshot")


def members(url: str) -> list[dict[str, object]]:
    return snapshot(url)["members"]  # type: ignore[return-value]


def answering(url: str, tries: int = 40) -> dict[int, bool]:
    """The pid of each worker that answered one of ``tries`` new connections, and whether it
    owns the pool."""
    seen: dict[int, bool] = {}
    for _ in range(tries):
        cluster = snapshot(url)
        me = next(m for m in cluster["members"]  # type: ignore[attr-defined]
                  if m["id"] == cluster["member"])
        seen[me["pid"]] = bool(cluster["owns_pool"])
        if len(seen) == 2:
            break
    return seen


def burst(url: str, count: int, max_tokens: int) -> list[int]:
    """``count`` requests at once (each on a connection of its own); their statuses."""
    statuses: list[int] = []

    async def main() -> None:
        async with httpx2.AsyncClient(timeout=60) as client, anyio.create_task_group() as tg:
            async def one() -> None:
                answer = await client.post(url + "/v1/chat/completions",
                                           json=chat("m", max_tokens=max_tokens))
                statuses.append(answer.status_code)

            for _ in range(count):
                tg.start_soon(one)

    anyio.run(main)
    return sorted(statuses)


@pytest.mark.parametrize("loop", ["asyncio", "trio"])
def test_two_workers_are_one_gateway_that_restarts_a_killed_worker_and_stops_whole(
        tmp_path: Path, loop: str) -> None:
    with simulator("--tokens-per-second", "20", model="m") as sim, \
            workers_gateway(tmp_path, sim.url, "--worker", loop) as served:
        pids = served.worker_pids()
        assert len(pids) == 2
        # Both workers answer on the one port; exactly one of them owns the pool.
        owners = answering(served.url)
        assert sorted(owners) == sorted(pids)
        assert sorted(owners.values()) == [False, True]
        # 3 slots and 4 places in the queue, whichever worker each request came to.
        assert burst(served.url, 14, max_tokens=20) == [200] * 7 + [429] * 7
        # kill -9 of the worker that does not own the pool: the other serves on, and the
        # supervisor starts it again.
        victim = next(pid for pid, owns in owners.items() if not owns)
        os.kill(victim, signal.SIGKILL)
        wait_until(lambda: not is_running(victim))
        assert burst(served.url, 3, max_tokens=1) == [200] * 3
        wait_until(lambda: len(served.worker_pids()) == 3, timeout=10)
        restarted = served.worker_pids()[-1]
        wait_until(lambda: restarted in answering(served.url), timeout=30)
        assert "worker exited; starting it again" in served.log.read_text()
        # kill -9 of the private redis-server: the supervisor starts it again, and the workers
        # (registering what they hold in it, empty) answer again.
        os.kill(served.redis_pid(), signal.SIGKILL)
        wait_until(lambda: burst(served.url, 2, max_tokens=1) == [200] * 2, timeout=15)
        assert "the private redis-server exited; starting it again" in served.log.read_text()
        # SIGHUP to the supervisor: each worker reloads its configuration.
        served.proc.send_signal(signal.SIGHUP)
        wait_until(lambda: served.log.read_text().count('"event":"configuration reloaded"') == 2)
        (folder,) = served.runtime.iterdir()
        assert (folder / "redis.sock").is_socket()
        served.proc.send_signal(signal.SIGTERM)
        assert served.proc.wait(timeout=30) == 0
        # Every worker and the private redis-server gone, and its folder.
        assert not any(is_running(pid) for pid in [*pids, restarted])
        assert list(served.runtime.iterdir()) == []


def test_without_redis_server_two_workers_are_refused_in_one_line(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
        capsys: pytest.CaptureFixture[str]) -> None:
    path = tmp_path / "gateway.toml"
    path.write_text(config_text("http://127.0.0.1:9"))
    monkeypatch.setenv("PATH", str(tmp_path))
    assert main(["serve", "--config", str(path), "--workers", "2"]) == 2
    assert capsys.readouterr().err == (
        "vllm-gateway: --workers 2: the workers share their state in Redis: install "
        "redis-server (Debian: apt-get install redis-server) or set cluster.redis_url\n")


def test_without_coredis_two_workers_are_refused_in_one_line(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
        capsys: pytest.CaptureFixture[str]) -> None:
    path = tmp_path / "gateway.toml"
    path.write_text(config_text("http://127.0.0.1:9"))
    monkeypatch.setitem(sys.modules, "coredis", None)  # as if not installed
    assert main(["serve", "--config", str(path), "--workers", "2"]) == 2
    assert "pip install 'vllm-gateway[cluster]'" in capsys.readouterr().err


def test_a_worker_refused_its_configuration_stops_the_gateway_with_status_2() -> None:
    supervisor = workers.Supervisor([sys.executable, "-c", "import sys; sys.exit(2)"], 2,
                                    env=dict(os.environ), drain_s=5)
    assert supervisor.run() == 2


def test_a_worker_that_keeps_failing_is_restarted_a_bounded_number_of_times(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(workers, "BACKOFF_S", 0.01)
    starts = tmp_path / "starts"
    code = f"open({str(starts)!r}, 'a').write('x'); raise SystemExit(3)"
    supervisor = workers.Supervisor([sys.executable, "-c", code], 1, env=dict(os.environ),
                                    drain_s=5)
    assert supervisor.run() == 3
    assert starts.read_text() == "x" * workers.RESTART_LIMIT


def test_workers_must_be_a_whole_number_of_at_least_one(
        capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as exit_:
        main(["serve", "--workers", "0"])
    assert exit_.value.code == 2
    assert "argument --workers: '0' is not a whole number of at least 1" in capsys.readouterr().err
