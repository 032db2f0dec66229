"""The process launcher on its own: output, exit, and stopping the server with its children."""

from __future__ import annotations

import os
from collections.abc import Callable

import pytest
from anyio import create_task_group, current_time, fail_after, sleep

from backends.launcher import LaunchError
from backends.process import ProcessLauncher, server_env
from kernel.config import ModelSettings
from tests.backends.checks import running
from tests.support import eventually, make_config

pytestmark = pytest.mark.anyio

# A shell that starts a long-lived child, says its pid, then does what the test asks.
CHILD_THEN = "sleep 60 & echo $!; "



async def output_where(launcher: ProcessLauncher, check: Callable[[str], bool]) -> str:
    """Wait until the launcher's output tail passes ``check``."""
    with fail_after(10):
        while not check(tail := await launcher.output_tail()):
            await sleep(0.01)
    return tail

def model(*command: str) -> ModelSettings:
    return make_config([{"name": "m", "launcher": "process", "command": list(command)}]).models[0]


async def test_keeps_the_last_lines_and_the_exit_status() -> None:
    launcher = ProcessLauncher(model(
        "{python}", "-c", "import sys; print('one'); print('two {name}', end=''); sys.exit(3)"))
    async with create_task_group() as tg:
        address = await launcher.start(tg)
        assert address.startswith("http://127.0.0.1:")
        with fail_after(10):
            reason = await launcher.wait_exit()
        assert reason == "the process exited with status 3"
        assert not launcher.is_alive()
        assert await launcher.output_tail() == "one\ntwo m"
        await launcher.stop()
    assert launcher.pid is None
    assert launcher.address is None


async def test_notices_the_exit_while_a_child_keeps_the_output_open() -> None:
    launcher = ProcessLauncher(model("sh", "-c", CHILD_THEN + "exit 4"))
    async with create_task_group() as tg:
        await launcher.start(tg)
        with fail_after(10):
            reason = await launcher.wait_exit()
        assert reason == "the process exited with status 4"
        child = int(await launcher.output_tail())
        assert running(child)
        await launcher.stop()
    await eventually(lambda: not running(child))


async def test_a_gateway_with_a_thousand_descriptors_open_starts_and_stops_a_server() -> None:
    # Its leash's lifeline is numbered past 1,024 (what select() can watch), as in a gateway
    # with a thousand client connections open.
    held = [os.open(os.devnull, os.O_RDONLY) for _ in range(1100)]
    launcher = ProcessLauncher(model("sh", "-c", CHILD_THEN + "wait"))
    try:
        async with create_task_group() as tg:
            await launcher.start(tg)
            await output_where(launcher, bool)
            pid, child = launcher.pid, int(await launcher.output_tail())
            assert pid is not None and launcher.is_alive()
            await launcher.stop()
    finally:
        for fd in held:
            os.close(fd)
    assert not running(pid)
    await eventually(lambda: not running(child))


async def test_stop_ends_the_server_and_its_children() -> None:
    launcher = ProcessLauncher(model("sh", "-c", CHILD_THEN + "wait"))
    async with create_task_group() as tg:
        await launcher.start(tg)
        await output_where(launcher, bool)
        pid, child = launcher.pid, int(await launcher.output_tail())
        assert pid is not None
        assert running(pid) and running(child)
        await launcher.stop()
    assert not running(pid)
    await eventually(lambda: not running(child))


async def test_stop_kills_a_server_that_ignores_sigterm() -> None:
    launcher = ProcessLauncher(model(
        "{python}", "-c", "import signal, time; signal.signal(signal.SIGTERM, signal.SIG_IGN); "
        "print('up', flush=True); time.sleep(60)"), stop_timeout=0.5)
    async with create_task_group() as tg:
        await launcher.start(tg)
        await output_where(launcher, lambda tail: tail == "up")
        pid = launcher.pid
        assert pid is not None
        began = current_time()
        await launcher.stop()
        assert 0.5 <= current_time() - began < 5
    assert not running(pid)


async def test_a_command_that_does_not_exist() -> None:
    launcher = ProcessLauncher(model("/nonexistent/vllm", "serve"))
    async with create_task_group() as tg:
        with pytest.raises(LaunchError, match="cannot run '/nonexistent/vllm': No such file"):
            await launcher.start(tg)
    assert not launcher.is_alive()
    await launcher.stop()


async def test_the_server_sees_no_gateway_secret_and_its_gpus(
        monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("GATEWAY_ADMIN_TOKEN", "admin-secret")
    monkeypatch.setenv("GATEWAY_AUTH_API_KEYS", "client-key")
    monkeypatch.setenv("HF_HOME", "/srv/hf")
    table = {"name": "m", "launcher": "process", "gpus": [1, 3], "env": {"MINE": "1"},
             "command": ["{python}", "-c", "import os; print(sorted(k for k in os.environ if "
                         "k.startswith(('GATEWAY_', 'CUDA_', 'HF_', 'MINE')))); "
                         "print(os.environ['CUDA_VISIBLE_DEVICES'])"]}
    launcher = ProcessLauncher(make_config([table]).models[0])
    async with create_task_group() as tg:
        await launcher.start(tg)
        with fail_after(10):
            await launcher.wait_exit()
        tail = await launcher.output_tail()
        await launcher.stop()
    assert tail == ("['CUDA_DEVICE_ORDER', 'CUDA_VISIBLE_DEVICES', 'HF_HOME', 'MINE']\n1,3")


def test_a_server_with_adapters_may_load_them_at_run_time() -> None:
    table = {"name": "m", "launcher": "process", "command": ["vllm"], "env": {"MINE": "1"},
             "adapters": [{"name": "sql", "path": "/"}]}
    env = server_env(make_config([table]).models[0], {"PATH": "/bin"})
    assert env == {"PATH": "/bin", "MINE": "1", "VLLM_ALLOW_RUNTIME_LORA_UPDATING": "True"}
    assert "VLLM_ALLOW_RUNTIME_LORA_UPDATING" not in server_env(model("vllm"), {})


async def test_a_server_killed_by_a_signal_is_reported_so() -> None:
    launcher = ProcessLauncher(model("sh", "-c", "kill -KILL $$"))
    async with create_task_group() as tg:
        await launcher.start(tg)
        with fail_after(10):
            assert await launcher.wait_exit() == "the process was killed by signal 9"
        await launcher.stop()

