"""Runs a model's server so that it never outlives the gateway: ``python leash.py FD COMMAND...``.

The leash starts COMMAND as its child and waits for whichever comes first: the child's exit,
which it passes on as its own (same status, same signal), or the end of the pipe on ``FD``,
whose write end only the gateway holds, so it ends when the gateway dies however it dies
(``kill -9``, the OOM killer). Then the leash ends the server's process group as a stop does:
SIGTERM, ``GRACE`` seconds, SIGKILL. The kernel's parent-death signal would not do: it follows
the thread that started the process, and trio starts processes from worker threads that end.

The leash ignores SIGTERM and SIGINT (the gateway signals the whole group; the server decides)
and runs with ``-I -S``: no site, no environment, no imports beyond the standard library.
"""

import os
import select
import signal
import sys

GRACE = 5.0


def _spawn(command: list[str], lifeline: int) -> int:
    pid = os.fork()
    if pid:
        return pid
    os.close(lifeline)
    for signum in (signal.SIGTERM, signal.SIGINT):
        signal.signal(signum, signal.SIG_DFL)  # an ignored signal would stay ignored in exec
    try:
        os.execvp(command[0], command)
    except OSError as exc:
        print(f"cannot run {command[0]!r}: {exc.strerror}", file=sys.stderr, flush=True)
    os._exit(127)


def _exit_like(status: int) -> None:
    if os.WIFSIGNALED(status):
        signum = os.WTERMSIG(status)
        if signum not in (signal.SIGKILL, signal.SIGSTOP):  # those have no handler to reset
            signal.signal(signum, signal.SIG_DFL)
        os.kill(os.getpid(), signum)
    sys.exit(os.waitstatus_to_exitcode(status))


def _ready(fds: list[int], timeout: float | None = None) -> set[int]:
    """Those of ``fds`` readable or closed within ``timeout`` seconds (None: however long). By
    poll, not select: the lifeline keeps the gateway's number for it, past select's 1,024 in a
    gateway with a thousand connections open."""
    poller = select.poll()
    for fd in fds:
        poller.register(fd, select.POLLIN)
    return {fd for fd, _ in poller.poll(None if timeout is None else timeout * 1000)}


def main() -> None:
    for signum in (signal.SIGTERM, signal.SIGINT):
        signal.signal(signum, signal.SIG_IGN)
    lifeline, command = int(sys.argv[1]), sys.argv[2:]
    pid = _spawn(command, lifeline)
    child = os.pidfd_open(pid)
    if child not in _ready([child, lifeline]):  # the gateway is gone
        os.killpg(0, signal.SIGTERM)
        if not _ready([child], GRACE):
            os.killpg(0, signal.SIGKILL)
    _exit_like(os.waitpid(pid, 0)[1])


if __name__ == "__main__":
    main()
