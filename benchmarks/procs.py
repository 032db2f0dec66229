"""Processes of a benchmark run: start them pinned, wait for them, read their counters, stop them.

CPU time and memory come from ``/proc``: utime + stime of a process and all its descendants
(a server that forks a worker is counted whole), VmRSS likewise, and the busy time of each core
from ``/proc/stat``, so a run can tell how much of a core the system under test used and how
much went to everything else on the machine.
"""

from __future__ import annotations

import contextlib
import os
import signal
import socket
import subprocess
import time
import urllib.error
import urllib.request
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Protocol

TICK = os.sysconf("SC_CLK_TCK")
PROXY_CORE = 0
LOAD_CORE = 1


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def pinned(core: int, argv: Sequence[str]) -> list[str]:
    """``argv`` run on one core (taskset execs, so the pid stays the server's)."""
    return ["taskset", "-c", str(core), *argv]


@dataclass
class Proc:
    name: str
    popen: subprocess.Popen[bytes]
    log: Path
    stop_timeout: float = 10.0
    extra_pids: Callable[[], list[int]] = field(default=lambda: [])

    @property
    def pid(self) -> int:
        return self.popen.pid

    def alive(self) -> bool:
        return self.popen.poll() is None

    def tree(self) -> list[int]:
        return [self.pid, *descendants(self.pid)]

    def cpu_seconds(self) -> float:
        return sum(cpu_seconds(pid) for pid in self.tree())

    def rss_mb(self) -> float:
        return sum(rss_kb(pid) for pid in self.tree()) / 1024

    def log_tail(self, lines: int = 20) -> str:
        try:
            return "\n".join(self.log.read_text(errors="replace").splitlines()[-lines:])
        except OSError:
            return ""

    def stop(self) -> None:
        if self.popen.poll() is not None:
            return
        self.popen.send_signal(signal.SIGTERM)
        try:
            self.popen.wait(timeout=self.stop_timeout)
        except subprocess.TimeoutExpired:
            for pid in reversed(self.tree()):
                with contextlib.suppress(ProcessLookupError):
                    os.kill(pid, signal.SIGKILL)
            self.popen.wait()


def start(name: str, argv: Sequence[str], *, core: int | None, logs: Path,
          env: dict[str, str] | None = None, cwd: Path | None = None,
          stop_timeout: float = 10.0) -> Proc:
    """``argv`` with its output in ``logs/NAME.log``, pinned to ``core`` unless it is None."""
    log = logs / f"{name}.log"
    with open(log, "wb") as out:
        popen = subprocess.Popen(argv if core is None else pinned(core, argv), stdout=out,
                                 stderr=subprocess.STDOUT,
                                 stdin=subprocess.DEVNULL, env={**os.environ, **(env or {})},
                                 cwd=cwd)
    return Proc(name, popen, log, stop_timeout)


def http_get(url: str, timeout: float = 2.0, headers: dict[str, str] | None = None,
             data: bytes | None = None) -> tuple[int, bytes]:
    """GET ``url`` (POST ``data`` when given): the status and the body."""
    request = urllib.request.Request(url, data=data, headers=headers or {})
    try:
        with urllib.request.urlopen(request, timeout=timeout) as response:
            return response.status, response.read()
    except urllib.error.HTTPError as exc:
        return exc.code, exc.read()


def wait_http(proc: Proc, url: str, *, timeout: float = 30.0,
              headers: dict[str, str] | None = None) -> float:
    """Seconds until ``url`` answers 200; if it never does, stops the process (nothing holds
    it yet to stop it later) and raises with the log's tail."""
    began = time.monotonic()
    while time.monotonic() - began < timeout:
        if not proc.alive():
            raise RuntimeError(f"{proc.name} exited with {proc.popen.returncode}:\n"
                               f"{proc.log_tail()}")
        with contextlib.suppress(OSError):
            if http_get(url, timeout=1.0, headers=headers)[0] == 200:
                return time.monotonic() - began
        time.sleep(0.1)
    proc.stop()
    raise RuntimeError(f"{proc.name} did not answer {url} within {timeout:g} s:\n"
                       f"{proc.log_tail()}")


# -- /proc ------------------------------------------------------------------------------


def _stat_fields(pid: int) -> list[str] | None:
    try:
        text = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    return text[text.rindex(")") + 2:].split()


def cpu_seconds(pid: int) -> float:
    """utime + stime of one process (all its threads)."""
    fields = _stat_fields(pid)
    if fields is None:
        return 0.0
    # Fields after the command: state(0) ppid(1) ... utime(11) stime(12).
    return (int(fields[11]) + int(fields[12])) / TICK


def rss_kb(pid: int) -> int:
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return int(line.split()[1])
    except OSError:
        pass
    return 0


def start_time(pid: int) -> int | None:
    """When the process started (clock ticks since boot): with the pid, who it is."""
    fields = _stat_fields(pid)
    # Fields after the command: state(0) ... starttime(19).
    return None if fields is None or fields[0] == "Z" else int(fields[19])


def open_fds(pid: int) -> int:
    try:
        return len(os.listdir(f"/proc/{pid}/fd"))
    except OSError:
        return 0


def threads(pid: int) -> int:
    fields = _stat_fields(pid)
    return 0 if fields is None else int(fields[17])


def tcp_sockets(pid: int) -> list[tuple[int, int, str]]:
    """The process's TCP sockets as (local port, remote port, state), listening ones too: its
    socket descriptors looked up in the tables of its network namespace."""
    inodes = set()
    with contextlib.suppress(OSError):
        for fd in os.listdir(f"/proc/{pid}/fd"):
            with contextlib.suppress(OSError):
                link = os.readlink(f"/proc/{pid}/fd/{fd}")
                if link.startswith("socket:["):
                    inodes.add(link[8:-1])
    found = []
    for table in ("tcp", "tcp6"):
        try:
            lines = Path(f"/proc/{pid}/net/{table}").read_text().splitlines()[1:]
        except OSError:
            continue
        for line in lines:
            # sl local_address rem_address st tx_queue:rx_queue tr:tm->when retrnsmt uid
            # timeout inode
            f = line.split()
            if f[9] in inodes:
                found.append((int(f[1].rsplit(":", 1)[1], 16), int(f[2].rsplit(":", 1)[1], 16),
                              TCP_STATES.get(f[3], f[3])))
    return found


TCP_STATES = {"01": "ESTABLISHED", "02": "SYN_SENT", "03": "SYN_RECV", "04": "FIN_WAIT1",
              "05": "FIN_WAIT2", "06": "TIME_WAIT", "07": "CLOSE", "08": "CLOSE_WAIT",
              "09": "LAST_ACK", "0A": "LISTEN", "0B": "CLOSING"}


def descendants(root: int) -> list[int]:
    children: dict[int, list[int]] = {}
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            fields = _stat_fields(int(entry))
            if fields is not None:
                children.setdefault(int(fields[1]), []).append(int(entry))
    found: list[int] = []
    todo = [root]
    while todo:
        for child in children.get(todo.pop(), []):
            found.append(child)
            todo.append(child)
    return found


def core_times() -> dict[int, tuple[float, float]]:
    """Per core: (busy seconds, total seconds) since boot."""
    cores: dict[int, tuple[float, float]] = {}
    for line in Path("/proc/stat").read_text().splitlines():
        if line.startswith("cpu") and line[3].isdigit():
            name, *values = line.split()
            nums = [int(v) for v in values[:8]]
            idle = nums[3] + nums[4]
            total = sum(nums)
            cores[int(name[3:])] = ((total - idle) / TICK, total / TICK)
    return cores


def loadavg() -> list[float]:
    return [float(x) for x in Path("/proc/loadavg").read_text().split()[:3]]


class HasCPU(Protocol):
    def cpu_seconds(self) -> float: ...


@dataclass
class Pid:
    """A process known by its id only (a load generator)."""

    pid: int

    def cpu_seconds(self) -> float:
        return cpu_seconds(self.pid)


@dataclass
class Group:
    """Several processes counted as one (the two backends)."""

    members: list[HasCPU]

    def cpu_seconds(self) -> float:
        return sum(m.cpu_seconds() for m in self.members)


@dataclass
class Sample:
    """Counters read at one moment, to subtract from a later one."""

    at: float
    cores: dict[int, tuple[float, float]]
    cpu: dict[str, float]

    @classmethod
    def take(cls, procs: Mapping[str, HasCPU]) -> Sample:
        return cls(time.monotonic(), core_times(),
                   {name: p.cpu_seconds() for name, p in procs.items()})


def usage(before: Sample, after: Sample) -> dict[str, float]:
    """Busy share of each core, and CPU seconds of each process, between two samples."""
    out: dict[str, float] = {"seconds": after.at - before.at}
    for core, (busy, total) in after.cores.items():
        b0, t0 = before.cores.get(core, (0.0, 0.0))
        out[f"core{core}_busy"] = (busy - b0) / (total - t0) if total > t0 else 0.0
    for name, cpu in after.cpu.items():
        out[f"{name}_cpu_s"] = cpu - before.cpu.get(name, 0.0)
    return out
