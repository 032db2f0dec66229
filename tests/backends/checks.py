"""Whether a process runs, as the pool and launcher tests check it."""

from __future__ import annotations

from pathlib import Path


def running(pid: int) -> bool:
    """Whether the process exists, not counting a zombie (an orphan that init has yet to reap)."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return False
    return stat.rpartition(")")[2].split()[0] != "Z"
