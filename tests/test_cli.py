"""The command line, as real processes: what an operator sees from ``vllm-gateway``."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import httpx2
import pytest

from backends.launcher import free_port
from kernel.config import Config
from tests.support import HTTP, chat, gateway_process

ROOT = Path(__file__).resolve().parent.parent
CLEAN_ENV = {k: v for k, v in os.environ.items() if not k.startswith("GATEWAY_")}
GOOD = """
[gateway]
max_concurrent = 5
max_models_concurrent = 2

[[models]]
name = "remote"
launcher = "static"
url = "http://127.0.0.1:9"
"""


def command(*args: str) -> list[str]:
    return [sys.executable, "-m", "proxy.cli", *args]


def environment(env: dict[str, str] | None = None) -> dict[str, str]:
    """No GATEWAY_* variable but those given."""
    return {**CLEAN_ENV, "PYTHONPATH": str(ROOT), **(env or {})}


def cli(*args: str, env: dict[str, str] | None = None) -> subprocess.Popen[str]:
    """``vllm-gateway ARGS``, running."""
    return subprocess.Popen(command(*args), cwd=ROOT, text=True, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, env=environment(env))


def run(*args: str, env: dict[str, str] | None = None,
        cwd: Path = ROOT) -> subprocess.CompletedProcess[str]:
    """``vllm-gateway ARGS`` to its end (killed past 30 s: it starts nothing of its own)."""
    return subprocess.run(command(*args), cwd=cwd, capture_output=True, text=True,
                          env=environment(env), timeout=30)


def listening(port: int) -> bool:
    with socket.socket() as sock:
        return sock.connect_ex(("127.0.0.1", port)) == 0


def write(folder: Path, text: str) -> Path:
    path = folder / "gw.toml"
    path.write_text(text)
    return path


# case: (appended to GOOD, environment, command, what follows "config error: ").
# A plain "serve" gets --bind 127.0.0.1:PORT, the port the test watches.
BAD = {
    "file": ("[gateway.extra]\nx = 1\n", {}, ["serve"],
             "gateway.extra = {{'x': 1}} (from file {path}): unknown key; allowed keys: "
             "bind, max_queue_size, "),
    "variable": ("", {"GATEWAY_MAX_MODELS_CONCURRENT": "0"}, ["serve"],
                 "gateway.max_models_concurrent = 0 (from environment variable "
                 "GATEWAY_MAX_MODELS_CONCURRENT): must be an integer from 1 to 1000"),
    "variable-over-file": ("", {"GATEWAY_MAX_CONCURRENT": "-1"}, ["serve"],
                           "gateway.max_concurrent = -1 (from environment variable "
                           "GATEWAY_MAX_CONCURRENT): must be an integer from 1 to 10000"),
    "bind-option": ("", {}, ["serve", "--bind", "127.0.0.1:http"],
                    "gateway.bind = '127.0.0.1:http' (from command-line option --bind): must "
                    "be HOST:PORT: a host name, an IPv4 address or an [IPv6] address, and a "
                    "port from 1 to 65535"),
    "check-config": ("", {"GATEWAY_HTTP_TIMEOUT": "-5"}, ["check-config"],
                     "upstream.timeout = -5.0 (from environment variable GATEWAY_HTTP_TIMEOUT): "
                     "must be a number from 0.001 to 86400.0"),
}


@pytest.fixture(scope="module")
def bad_starts(tmp_path_factory: pytest.TempPathFactory):
    """Every bad start at once: each costs a Python start-up, in parallel they cost about one."""
    starts = {}
    for case, (extra, env, args, _) in BAD.items():
        path = write(tmp_path_factory.mktemp(case), GOOD + extra)
        port = free_port()
        command = [*args, "--bind", f"127.0.0.1:{port}"] if args == ["serve"] else args
        starts[case] = (cli(*command, "--config", str(path), env=env), port, path)
    yield starts
    for proc, _, _ in starts.values():
        if proc.poll() is None:
            proc.kill()
        proc.communicate()


@pytest.mark.parametrize("case", BAD)
def test_bad_config_exits_2_with_one_line_and_binds_nothing(bad_starts, case):
    proc, port, path = bad_starts[case]
    while proc.poll() is None:
        assert not listening(port)
        time.sleep(0.01)
    out, err = proc.communicate(timeout=30)
    assert (proc.returncode, out) == (2, "")
    assert len(err.splitlines()) == 1 and err.endswith("\n"), err
    assert err.startswith("vllm-gateway: config error: " + BAD[case][3].format(path=path)), err
    assert not listening(port)


@pytest.mark.parametrize(("args", "in_root", "expected"), [
    (["--config", "nowhere.toml"], True, "nowhere.toml (named by --config)"),
    ([], False, "config.toml (the default; name another with --config or GATEWAY_CONFIG)"),
], ids=["option", "default"])
def test_missing_config_file_is_one_clear_line(tmp_path, args, in_root, expected):
    result = run("check-config", *args, cwd=ROOT if in_root else tmp_path)
    assert (result.returncode, result.stdout) == (2, "")
    assert result.stderr == (f"vllm-gateway: config error: config file {expected} cannot be "
                             "read: No such file or directory\n")


def test_check_config_prints_the_shipped_configuration_by_default():
    result = run("check-config")
    assert (result.returncode, result.stderr) == (0, "")
    shown = json.loads(result.stdout)
    assert shown["source"] == "file config.toml"
    assert [m["name"] for m in shown["models"]] == ["sim-small", "sim-large"]
    # Two models of 50 slots each (each model is one server by default).
    assert shown["derived"] == {"upstream_pool_size": 50 * 2, "upstream_keepalive_size": 50 * 2}


def test_check_config_honours_variables_and_masks_secrets(tmp_path):
    path = write(tmp_path, GOOD)
    result = run("check-config", env={
        "GATEWAY_CONFIG": str(path), "GATEWAY_MAX_CONCURRENT": "7",
        "GATEWAY_MAX_MODELS_CONCURRENT": "4", "GATEWAY_HTTP_TIMEOUT": "900",
        "GATEWAY_ADMIN_TOKEN": "s3cret-admin"})
    assert (result.returncode, result.stderr) == (0, "")
    assert "s3cret-admin" not in result.stdout
    shown = json.loads(result.stdout)
    assert shown["source"] == f"file {path}"
    assert (shown["gateway"]["max_concurrent"], shown["gateway"]["max_models_concurrent"],
            shown["upstream"]["timeout"], shown["admin"]["token"]) == (7, 4, 900.0, "***")
    assert shown["derived"] == {"upstream_pool_size": 7, "upstream_keepalive_size": 7}


def test_check_config_into_a_closed_pipe_is_quiet(tmp_path, processes):
    """``check-config | head -1``: the reader is gone before the output is written."""
    read_end, write_end = os.pipe()
    os.close(read_end)
    try:
        proc = processes.start(command("check-config", "--config", str(write(tmp_path, GOOD))),
                               cwd=ROOT, text=True, stdout=write_end, stderr=subprocess.PIPE,
                               env=environment())
    finally:
        os.close(write_end)
    _, err = proc.communicate(timeout=30)
    assert (proc.returncode, err) == (0, "")


def test_serve_answers_health_and_exits_0_on_sigterm(tmp_path, monkeypatch):
    for name in os.environ.keys() - CLEAN_ENV.keys():  # gateway_process passes os.environ on
        monkeypatch.delenv(name)
    env = {"GATEWAY_ADMIN_TOKEN": "s3cret-admin"}
    with gateway_process(GOOD, tmp_path, env=env) as (url, proc):
        assert httpx2.get(url + "/health").status_code == 200
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(timeout=15) == 0
    assert not listening(int(url.rpartition(":")[2]))
    log = (tmp_path / "gateway.log").read_text()
    assert "s3cret-admin" not in log
    started = [json.loads(line) for line in log.splitlines() if "effective configuration" in line]
    assert len(started) == 1
    assert started[0]["config"]["admin"]["token"] == "***"
    assert started[0]["config"]["derived"] == {"upstream_pool_size": 5,
                                               "upstream_keepalive_size": 5}


SIMULATED = """
[[models]]
name = "sim"
launcher = "process"
command = ["{python}", "-m", "simulator", "--port", "{port}", "--model", "{name}"]
startup_timeout = 20.0
"""


def test_serve_logs_json_lines_to_the_end_of_a_shutdown(tmp_path: Path) -> None:
    """Not a terminal: every line is JSON, hypercorn's own included; after ``draining`` the
    model it started is logged stopped, and the last line says the gateway stopped."""
    with gateway_process(SIMULATED, tmp_path) as (url, proc):
        assert HTTP.post(url + "/v1/chat/completions", json=chat("sim")).status_code == 200
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(timeout=15) == 0
    lines = [json.loads(line) for line in (tmp_path / "gateway.log").read_text().splitlines()]
    events = [line["event"] for line in lines]
    assert any(event.startswith("Running on http://127.0.0.1:") for event in events)
    assert events[events.index("draining"):] == ["draining", "model stopped", "gateway stopped"]
    assert lines[-2]["model"] == "sim" and lines[-2]["reason"] == "gateway stopping"
    assert lines[-1]["exit_status"] == 0


def test_serve_shows_the_configuration_as_a_block_in_the_console_format(tmp_path: Path) -> None:
    with gateway_process(SIMULATED, tmp_path, env={"GATEWAY_LOG_FORMAT": "console"}):
        pass
    log = (tmp_path / "gateway.log").read_text().splitlines()
    head = next(i for i, line in enumerate(log) if "effective configuration" in line)
    block = log[head + 1:head + 1 + 4]
    assert block[0] == f"  source: file {tmp_path / 'gateway.toml'}"
    assert block[1].startswith("  [gateway] bind=127.0.0.1:")
    assert all(len(line) <= 100 for line in log[head + 1:] if line.startswith(" "))
    assert any(line.startswith("  [[models]] name=sim launcher=process") for line in log)
    assert not any(line.startswith("{") for line in log)
    assert "\x1b[" not in "".join(log)  # no colours in a file


def test_serve_on_an_address_in_use_exits_2_with_one_line_naming_the_user(
        tmp_path: Path) -> None:
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        result = run("serve", "--config", str(write(tmp_path, SIMULATED)),
                     "--bind", f"127.0.0.1:{port}")
    assert (result.returncode, result.stdout) == (2, "")
    assert result.stderr == (
        f"vllm-gateway: cannot listen on 127.0.0.1:{port}: the address is in use (by pid "
        f"{os.getpid()}: {' '.join(Path('/proc/self/cmdline').read_text().split(chr(0))[:-1])}"
        "); choose another with --bind or gateway.bind\n")


def test_serve_runs_on_uvloop_unless_told_otherwise(tmp_path: Path) -> None:
    def uvloop_mapped(pid: int) -> bool:  # anyio imports uvloop only to run on it
        return "/uvloop/loop." in Path(f"/proc/{pid}/maps").read_text()

    with gateway_process(GOOD, tmp_path) as (_, proc):
        assert uvloop_mapped(proc.pid)
    with gateway_process(GOOD, tmp_path, "--worker", "asyncio") as (_, proc):
        assert not uvloop_mapped(proc.pid)


def test_trio_worker_refuses_container_models(tmp_path: Path) -> None:
    config = tmp_path / "c.toml"
    config.write_text('[engines.local]\nurl = "unix:///run/podman/podman.sock"\n'
                      '[[models]]\nname = "m"\nlauncher = "container"\nengine = "local"\n'
                      'image = "localhost/x:1"\n')
    result = subprocess.run(
        [sys.executable, "-m", "proxy.cli", "serve", "--config", str(config), "--worker", "trio"],
        cwd=ROOT, capture_output=True, text=True, timeout=30)
    assert result.returncode == 2
    assert "trio worker cannot run container models (m)" in result.stderr
    assert "aiodocker" in result.stderr


def test_uvicorn_refuses_the_trio_worker_in_one_line(tmp_path: Path) -> None:
    config = tmp_path / "c.toml"
    config.write_text(GOOD)
    result = subprocess.run(
        [sys.executable, "-m", "proxy.cli", "serve", "--config", str(config), "--server",
         "uvicorn", "--worker", "trio"], cwd=ROOT, capture_output=True, text=True, timeout=30)
    assert result.returncode == 2
    assert result.stderr == ("vllm-gateway: --server uvicorn: uvicorn runs on asyncio only; "
                             "use --worker asyncio or uvloop\n")


def test_the_server_gives_the_shutdown_the_time_the_slowest_stop_takes() -> None:
    from proxy.cli import _hypercorn_config
    from tests.support import make_config

    def shutdown_timeout(config: Config) -> float:
        hc = _hypercorn_config(config)  # it binds the address: a free port, never 8080
        for fd in hc.bind:
            os.close(int(fd.removeprefix("fd://")))
        return hc.shutdown_timeout

    model = {"name": "c", "launcher": "container", "engine": "slow", "image": "i"}
    gateway = {"bind": f"127.0.0.1:{free_port()}"}
    slow = make_config([model], engines={"slow": {"url": "unix:///x.sock", "stop_timeout": 300.0,
                                                  "api_timeout": 20.0}}, gateway=gateway)
    # Hypercorn's own 60 s would cut the stop short and leave the container running.
    assert shutdown_timeout(slow) >= 300 + 2 * 20
    quick = make_config([{"name": "s", "launcher": "static", "url": "http://127.0.0.1:9"}],
                        gateway=gateway)
    assert shutdown_timeout(quick) == 60
