"""What every test shares: both event loops, quiet logs, a ``processes`` fixture that ends what a
test started, and, after the suite, a check that no process of the suite is left running and a
line with the number of tests run and the time they took (the figures the README gives)."""

import logging
import os
import time
from collections.abc import Iterator

import pytest

from backends import states
from proxy.logs import configure_logging
from tests.support import SESSION_MARKER, Processes, end_strays, stray_processes

# Set before any test module is imported, so that every environment built from os.environ has it.
os.environ[SESSION_MARKER] = str(os.getpid())
# Seconds the processes that the last tests' teardowns stopped get to be gone.
STRAY_GRACE = 5.0
OUTCOMES = ("passed", "failed", "error", "skipped", "xfailed", "xpassed")
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


def pytest_sessionstart(session: pytest.Session) -> None:
    _run["began"] = time.monotonic()


def pytest_sessionfinish(session: pytest.Session) -> None:
    """No process of the suite may outlive it: any left is named in the summary, ended, and
    fails the run."""
    _run["took"] = time.monotonic() - _run["began"]
    deadline = time.monotonic() + STRAY_GRACE
    while (strays := stray_processes(os.environ[SESSION_MARKER])) and time.monotonic() < deadline:
        time.sleep(0.1)
    if strays:
        _strays.update(strays)
        session.exitstatus = pytest.ExitCode.TESTS_FAILED
        end_strays(list(strays))


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
    reporter.write_line(f"vllm-gateway tests: {len(ran)} run in {took:.0f} s ({took / 60:.1f} "
                        f"minutes) on {len(os.sched_getaffinity(0))} cores")
