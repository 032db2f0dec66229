"""The suite's own checks, on a small suite run as the real one is: a process a test leaves
running fails the run and is named and ended; one started through the ``processes`` fixture is
ended with all it started when its test fails; the count and the time are printed at the end."""

from __future__ import annotations

import re
import sys
from pathlib import Path

import pytest

from tests.support import ROOT, Processes, is_running

CONFTEST = "from tests.conftest import *  # noqa: F403\n"


def inner_suite(processes: Processes, tmp_path: Path, test: str,
                *options: str) -> tuple[int, str]:
    (tmp_path / "conftest.py").write_text(CONFTEST)
    (tmp_path / "test_inner.py").write_text(test)
    run = processes.run([sys.executable, "-m", "pytest", "-p", "no:cacheprovider", "-q",
                         *options, "--rootdir", str(tmp_path), str(tmp_path)],
                        cwd=tmp_path, env={"PYTHONPATH": str(ROOT), "PATH": "/usr/bin:/bin"},
                        timeout=60)
    return run.returncode, run.stdout + run.stderr


@pytest.mark.parametrize("workers", [[], ["-n", "2"]], ids=["one process", "xdist workers"])
def test_a_process_left_running_fails_the_suite_and_is_named_and_ended(
        processes: Processes, tmp_path: Path, workers: list[str]) -> None:
    status, output = inner_suite(processes, tmp_path, """
import subprocess

def test_forgets_its_process():
    subprocess.Popen(["sleep", "300"])
""", *workers)
    assert status == 1, output
    assert "1 passed" in output
    assert "processes the suite left running (now ended)" in output
    (pid,) = map(int, re.findall(r"pid (\d+): sleep 300", output))
    assert not is_running(pid)


def test_the_processes_fixture_ends_what_a_failed_test_started_and_what_that_started(
        processes: Processes, tmp_path: Path) -> None:
    status, output = inner_suite(processes, tmp_path, """
import subprocess

def test_fails_with_a_process_running(processes):
    processes.start(["sh", "-c", "sleep 300 & echo $!; sleep 300"], stdout=subprocess.PIPE,
                    text=True)
    assert False
""")
    assert status == 1, output
    assert "1 failed" in output
    assert "left running" not in output
    assert re.search(r"vllm-gateway tests: 1 run in \d+ s \(\d+\.\d minutes\) on \d+ cores",
                     output), output
