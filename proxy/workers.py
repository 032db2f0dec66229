"""``vllm-gateway serve --workers N``: N gateway processes on one port, one supervisor.

The supervisor binds the address first (an address in use exits 2, as one process does), then
runs each worker as ``vllm-gateway serve`` of its own on that address with ``SO_REUSEPORT``: the
kernel spreads the connections over the workers' listening sockets by their addresses, so a
burst of new connections is not taken by whichever worker wakes first. The workers are one
``[cluster]`` (exact limits, one elected pool owner): on ``cluster.redis_url`` where the
configuration has one, else on a private redis-server (``cluster.private_redis``) that lives as
long as the supervisor.

What the supervisor does, and nothing more: SIGTERM and SIGINT go on to every worker (each
drains as one process does; a second signal ends the streams at once), and it exits once they
have; SIGHUP goes on to them (each reloads); a worker that exits unasked is started again after
a back-off that doubles, up to ``RESTART_LIMIT`` times in a row (a worker that ran
``STABLE_S`` starts the count again); then, or when a worker exits with status 2 (its
configuration refused), the others are stopped and the supervisor exits with a failure.

Each worker leads a session of its own, so a terminal's Ctrl-C (or a SIGTERM to the process
group) reaches the supervisor alone and every worker drains once; each gets SIGTERM from the
kernel if the supervisor dies (``PR_SET_PDEATHSIG``: the supervisor is one thread). A private
redis-server that exits is started again at once (empty: the workers register what they hold,
as after any Redis restart); one that cannot start stops the gateway.
"""

from __future__ import annotations

import contextlib
import ctypes
import dataclasses
import signal
import subprocess
import sys
import time
from collections.abc import Iterator, Sequence
from pathlib import Path

import structlog

from cluster.private_redis import RedisServer, RedisUnavailable

# Exit status of a worker whose configuration is refused (``cli.EXIT_CONFIG``): not restarted.
EXIT_CONFIG = 2
# A worker that exits unasked is started again after BACKOFF_S, doubled at each exit in a row
# up to BACKOFF_MAX_S; the RESTART_LIMIT-th exit in a row stops the gateway. A worker that ran
# STABLE_S before it exited starts the count again.
BACKOFF_S = 0.5
BACKOFF_MAX_S = 10.0
RESTART_LIMIT = 5
STABLE_S = 30.0
# Seconds beyond the workers' own drain (given by the caller) before the supervisor kills them.
STOP_MARGIN_S = 10.0
SIGNALS = {signal.SIGCHLD, signal.SIGTERM, signal.SIGINT, signal.SIGHUP}
PR_SET_PDEATHSIG = 1

_libc = ctypes.CDLL(None, use_errno=True)


def tied_to_parent() -> None:
    """In a child before its exec: unblock the signals the supervisor waits for (a mask is
    inherited), and have the kernel send SIGTERM when the supervisor dies."""
    signal.pthread_sigmask(signal.SIG_UNBLOCK, SIGNALS)
    _libc.prctl(PR_SET_PDEATHSIG, signal.SIGTERM, 0, 0, 0)


@dataclasses.dataclass
class Worker:
    index: int
    proc: subprocess.Popen[bytes] | None = None
    started: float = 0.0
    exits: int = 0  # unasked exits in a row
    restart_at: float | None = None


def _status(code: int) -> str:
    return f"signal {signal.Signals(-code).name}" if code < 0 else f"status {code}"


class Supervisor:
    def __init__(self, argv: Sequence[str], count: int, *, env: dict[str, str],
                 drain_s: float, redis: RedisServer | None = None) -> None:
        self.argv = list(argv)
        self.redis = redis
        self.env = env
        self.workers = [Worker(i) for i in range(count)]
        self.drain_s = drain_s
        self.stop_at: float | None = None
        self.status = 0
        self.log = structlog.get_logger("gateway")

    def _start(self, worker: Worker) -> None:
        worker.proc = subprocess.Popen(self.argv, env=self.env, start_new_session=True,
                                       preexec_fn=tied_to_parent)
        worker.started, worker.restart_at = time.monotonic(), None
        self.log.info("worker started", worker=worker.index, pid=worker.proc.pid)

    def _running(self) -> Iterator[Worker]:
        return (w for w in self.workers if w.proc is not None and w.proc.returncode is None)

    def _signal_all(self, signum: int) -> None:
        for worker in self._running():
            assert worker.proc is not None
            with contextlib.suppress(ProcessLookupError):
                worker.proc.send_signal(signum)

    def _stop(self, signum: int, status: int) -> None:
        """Stop every worker (``signum`` to each), and exit with ``status`` once they have."""
        if self.stop_at is None:
            self.stop_at = time.monotonic() + self.drain_s + STOP_MARGIN_S
            self.status = self.status or status
        for worker in self.workers:
            worker.restart_at = None
        self._signal_all(signum)

    def _exited(self, worker: Worker, code: int) -> None:
        assert worker.proc is not None
        pid, worker.proc = worker.proc.pid, None
        if self.stop_at is not None:
            self.log.info("worker stopped", worker=worker.index, pid=pid, exit=_status(code))
            if code != 0:
                self.status = self.status or 1
            return
        now = time.monotonic()
        worker.exits = 1 if now - worker.started >= STABLE_S else worker.exits + 1
        if code == EXIT_CONFIG or worker.exits >= RESTART_LIMIT:
            self.log.error("worker failed; stopping the gateway", worker=worker.index, pid=pid,
                           exit=_status(code), exits_in_a_row=worker.exits)
            self._stop(signal.SIGTERM, code if code > 0 else 1)
            return
        delay = min(BACKOFF_MAX_S, BACKOFF_S * 2 ** (worker.exits - 1))
        worker.restart_at = now + delay
        self.log.warning("worker exited; starting it again", worker=worker.index, pid=pid,
                         exit=_status(code), restart_in_s=delay, exits_in_a_row=worker.exits)

    def _reap(self) -> None:
        for worker in self.workers:
            if worker.proc is not None and (code := worker.proc.poll()) is not None:
                self._exited(worker, code)
        if self.redis is not None and self.stop_at is None and (
                code := self.redis.exited()) is not None:
            # Started again, empty: the workers register the slots and places they hold.
            self.log.error("the private redis-server exited; starting it again",
                           exit=_status(code))
            try:
                self.redis.start()
            except RedisUnavailable as exc:
                self.log.error("the private redis-server cannot start; stopping the gateway",
                               error=str(exc))
                self._stop(signal.SIGTERM, 1)

    def _timeout(self) -> float | None:
        due = [w.restart_at for w in self.workers if w.restart_at is not None]
        if self.stop_at is not None:
            due.append(self.stop_at)
        return max(0.0, min(due) - time.monotonic()) if due else None

    def run(self) -> int:
        """Start the workers and supervise them until they have all stopped; the exit status."""
        previous = signal.pthread_sigmask(signal.SIG_BLOCK, SIGNALS)
        try:
            for worker in self.workers:
                self._start(worker)
            while any(w.proc is not None for w in self.workers) or any(
                    w.restart_at is not None for w in self.workers):
                timeout = self._timeout()
                info = (signal.sigtimedwait(SIGNALS, timeout) if timeout is not None
                        else signal.sigwaitinfo(SIGNALS))
                if info is None:
                    pass
                elif info.si_signo in (signal.SIGTERM, signal.SIGINT):
                    self.log.info("shutting down the workers",
                                  signal=signal.Signals(info.si_signo).name)
                    self._stop(info.si_signo, 0)
                elif info.si_signo == signal.SIGHUP:
                    self._signal_all(signal.SIGHUP)
                self._reap()
                now = time.monotonic()
                for worker in self.workers:
                    if worker.restart_at is not None and worker.restart_at <= now:
                        self._start(worker)
                if self.stop_at is not None and now >= self.stop_at:
                    self.log.error("workers still running past the drain; killing them",
                                   pids=[w.proc.pid for w in self._running() if w.proc])
                    self.status = self.status or 1
                    self._signal_all(signal.SIGKILL)
                    self.stop_at = now + STOP_MARGIN_S
        finally:
            self._signal_all(signal.SIGKILL)  # only on an error of the supervisor itself
            for worker in self.workers:
                if worker.proc is not None:
                    worker.proc.wait()
            signal.pthread_sigmask(signal.SIG_SETMASK, previous)
        return self.status


# A worker runs the supervisor's own code: the folder it was imported from goes first on the
# path (``-m proxy.cli`` would take a ``proxy`` package from the working directory, say another
# checkout's).
_WORKER = "import sys; sys.path.insert(0, sys.argv.pop(1)); from proxy.cli import main; " \
    "sys.exit(main())"
_ROOT = str(Path(__file__).resolve().parent.parent)


def worker_argv(config: str | None, bind: str, worker: str, server: str,
                watch: bool) -> list[str]:
    """A worker's command line: ``serve`` on the supervisor's address, with SO_REUSEPORT."""
    argv = [sys.executable, "-c", _WORKER, _ROOT, "serve", "--bind", bind, "--worker", worker,
            "--server", server, "--reuse-port"]
    if config is not None:
        argv += ["--config", config]
    if watch:
        argv.append("--watch-config")
    return argv
