"""What every test shares: both event loops, quiet logs, a ``processes`` fixture that ends what a
test started, and, after the suite, a check that no process of the suite is left running and a
line with the number of tests run and the time they took (the figures the README gives).

The suite runs on pytest-xdist's workers (``-n`` in pyproject's addopts; ``-n 0`` runs it in one
process), each test on whichever worker is free, but for two groups (``GROUPS``), each run on
one worker, one test after another: the real-vLLM tier (its tests share one vLLM server per
worker, and each start takes both cores for a minute), and the tests that drive a container
engine (they remove containers by label and wait on the engine's event stream) with those that
keep both cores busy or time themselves closely. The third worker takes the other tests from the
start, and the others join it as their group ends. Each worker checks the processes its own tests
started and sends what it found to the controller, which names them."""

import logging
import os
import time
from collections.abc import Iterator
from typing import Any

import pytest
from xdist.scheduler import LoadScopeScheduling

from backends import states
from proxy.logs import configure_logging
from tests.support import SESSION_MARKER, Processes, end_strays, stray_processes

# Set before any test module is imported, so that every environment built from os.environ has it
# (a worker's own pid on each xdist worker: the processes its tests start are its to check).
os.environ[SESSION_MARKER] = str(os.getpid())
# Seconds the processes that the last tests' teardowns stopped get to be gone.
STRAY_GRACE = 5.0
OUTCOMES = ("passed", "failed", "error", "skipped", "xfailed", "xpassed")
# The tests that run on one xdist worker, one after another, by the start of their ids (xdist's
# controller sees the ids only; its own xdist_group marker extends the ids, which pytest 9's
# test ids no longer allow).
GROUPS = {
    "vllm": ("tests/vllm/",),
    "serial": ("tests/containers/", "tests/deploy/", "tests/ops/test_ready.py::",
               "tests/test_soak.py::", "tests/test_benchmark_smoke.py::",
               "tests/integration/test_upstream_pool.py::",
               "tests/integration/test_sleep_turns.py::",
               "tests/integration/test_accounting.py::test_burst_",
               "tests/integration/test_accounting.py::test_disconnect_soak_",
               "tests/dashboard/test_dashboard.py::", "tests/accounting/test_property.py::"),
}
_run: dict[str, float] = {}
_strays: dict[int, str] = {}

# A server's state moving off its table is a bug: the tests fail on it (production logs it).
states.STRICT = True


@pytest.fixture(params=["asyncio", "trio"])
def anyio_backend(request: pytest.FixtureRequest) -> str:
    return request.param


@pytest.fixture(autouse=True, scope="session")
def quiet_logs() -> None:
    """Warnings and errors only: the access log of thousands of requests hides a failure."""
    configure_logging("console", level=logging.WARNING)


@pytest.fixture
def processes() -> Iterator[Processes]:
    """Starts processes for a test (``processes.start``, ``processes.run``); each is ended with
    everything it started when the test ends, passed or failed."""
    started = Processes()
    yield started
    started.stop()


class GroupedScheduling(LoadScopeScheduling):
    """xdist's scheduling by scope, a scope being a group of ``GROUPS`` or else one test. The
    largest scopes are handed out first: each group starts at once, on a worker of its own."""

    def _split_scope(self, nodeid: str) -> str:
        return next((group for group, starts in GROUPS.items() if nodeid.startswith(starts)),
                    nodeid)


@pytest.hookimpl(optionalhook=True)
def pytest_xdist_make_scheduler(config: pytest.Config, log: Any) -> GroupedScheduling:
    return GroupedScheduling(config, log)


def pytest_sessionstart(session: pytest.Session) -> None:
    _run["began"] = time.monotonic()


def pytest_sessionfinish(session: pytest.Session) -> None:
    """No process of the suite may outlive it: any left is named in the summary, ended, and
    fails the run. A worker sends what it found to the controller (whose own check finds
    nothing: its workers, which ran the tests, are gone by now)."""
    _run["took"] = time.monotonic() - _run["began"]
    deadline = time.monotonic() + STRAY_GRACE
    while (strays := stray_processes(os.environ[SESSION_MARKER])) and time.monotonic() < deadline:
        time.sleep(0.1)
    if strays:
        end_strays(list(strays))
        _strays.update(strays)
    workeroutput = getattr(session.config, "workeroutput", None)
    if workeroutput is not None:
        workeroutput["strays"] = {str(pid): command for pid, command in strays.items()}
    if _strays:
        session.exitstatus = pytest.ExitCode.TESTS_FAILED


@pytest.hookimpl(optionalhook=True)
def pytest_testnodedown(node: Any, error: object) -> None:
    """A worker is done (xdist's hook, on the controller, before its session finishes)."""
    strays = getattr(node, "workeroutput", {}).get("strays", {})
    _strays.update({int(pid): command for pid, command in strays.items()})


def pytest_terminal_summary(terminalreporter: pytest.TerminalReporter) -> None:
    reporter = terminalreporter
    if _strays:
        reporter.section("processes the suite left running (now ended): a test must stop "
                         "what it starts", red=True)
        for pid, command in sorted(_strays.items()):
            reporter.line(f"pid {pid}: {command}", red=True)
    ran = {report.nodeid for outcome in OUTCOMES for report in reporter.stats.get(outcome, ())
           if isinstance(report, pytest.TestReport)}
    took = _run["took"]
    cores = len(os.sched_getaffinity(0))
    reporter.write_line(f"vllm-gateway tests: {len(ran)} run in {took:.0f} s ({took / 60:.1f} "
                        f"minutes) on {cores} cores{_workers(reporter.config)}")


def _workers(config: pytest.Config) -> str:
    count = getattr(config.option, "numprocesses", None)
    return f", {count} xdist workers" if count else ""
