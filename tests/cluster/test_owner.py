"""The pool's owner, elected by a lease in Redis with a fencing token, on a real redis-server:
one owner of contenders that start together; another within the lease once the owner stops
renewing, with a larger token; and a real owner process stopped (SIGSTOP) past its lease steps
down when it resumes, its fenced action refused."""

from __future__ import annotations

import contextlib
import dataclasses
import json
import secrets
import signal
import subprocess
import sys
import time
from collections.abc import Callable, Iterator

import anyio
import coredis
import pytest

from cluster.owner import NotOwner, OwnerLease
from kernel.config import ClusterSettings, Config
from tests.support import ROOT, eventually, make_config, redis_server, static_model

LEASE_S = 1.0


@pytest.fixture(scope="module")
def redis_url(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    with redis_server(tmp_path_factory.mktemp("redis")) as url:
        yield url


def config(redis_url: str, prefix: str) -> Config:
    cluster = ClusterSettings(redis_url=redis_url, key_prefix=prefix, lease_s=LEASE_S,
                              enabled=True, heartbeat=LEASE_S / 4)
    return dataclasses.replace(make_config([static_model("a", "http://127.0.0.1:9")]),
                               cluster=cluster)


@pytest.mark.anyio
async def test_one_owner_and_a_takeover_with_a_larger_token(
        redis_url: str, anyio_backend: str) -> None:
    prefix = secrets.token_hex(6)
    cfg = config(redis_url, prefix)
    events: list[tuple[str, str]] = []
    leases = [OwnerLease(cfg, name, on_event=lambda what, f: events.append((what, f["member"])))
              for name in ("one", "two", "three")]
    async with coredis.Redis.from_url(redis_url, decode_responses=True) as client:
        async with anyio.create_task_group() as tg:
            stops = []
            for lease in leases:
                stop = anyio.Event()
                stops.append(stop)

                async def run(lease: OwnerLease = lease, stop: anyio.Event = stop) -> None:
                    async with lease.running(client):
                        await stop.wait()

                tg.start_soon(run)
            await eventually(lambda: any(lease.holds() for lease in leases), within=2.0)
            await anyio.sleep(LEASE_S)  # and it stays the only one
            owners = [lease for lease in leases if lease.holds()]
            assert len(owners) == 1 and events == [("owner elected", owners[0].id)]
            first = owners[0]
            token = first.token
            assert token is not None and await first.fence() == token
            stops[leases.index(first)].set()  # it stops, and resigns: another at once
            await eventually(lambda: any(lease.holds() for lease in leases if lease is not first),
                             within=LEASE_S / 4 + 0.5)
            second = next(lease for lease in leases if lease.holds())
            assert second.token is not None and second.token > token
            assert ("owner stepped down", first.id) in events
            with pytest.raises(NotOwner):
                await first.fence()
            for stop in stops:
                stop.set()


@contextlib.contextmanager
def contenders(redis_url: str) -> Iterator[Callable[[], subprocess.Popen[str]]]:
    """Start contender processes (``tests.cluster.contender``) on one fresh prefix."""
    prefix = secrets.token_hex(6)
    with contextlib.ExitStack() as stack:
        def contender() -> subprocess.Popen[str]:
            proc = subprocess.Popen(
                [sys.executable, "-m", "tests.cluster.contender", redis_url, prefix,
                 str(LEASE_S)], cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL,
                text=True)
            stack.callback(proc.wait)
            stack.callback(proc.kill)
            return proc

        yield contender


def next_line(proc: subprocess.Popen[str]) -> dict:
    assert proc.stdout is not None
    return json.loads(proc.stdout.readline())


def started_together(
        contender: Callable[[], subprocess.Popen[str]]) -> list[subprocess.Popen[str]]:
    """Two contenders started at once: the owner (token 1) first, then the other."""
    both = [contender(), contender()]
    firsts = [next_line(proc) for proc in both]
    elected = [line == {"event": "owner elected", "token": 1} for line in firsts]
    assert sorted(elected) == [False, True]  # exactly one owner
    if elected[1]:
        both.reverse()
    return both


def test_a_stopped_owner_steps_down_fenced_and_a_killed_one_is_followed(redis_url: str) -> None:
    with contenders(redis_url) as contender:
        first, second = started_together(contender)
        assert next_line(first) == {"event": "contending"}
        assert next_line(first) == {"fence": True, "valid": True, "token": 1}
        first.send_signal(signal.SIGSTOP)
        # The second is elected once the first's lease lapsed, with a larger token.
        assert next_line(second) == {"event": "owner elected", "token": 2}
        first.send_signal(signal.SIGCONT)
        # The lines the first wrote before it was stopped come first; then it steps down
        # before it acts, and its action with the old token is refused, by Redis as well.
        for _ in range(100):
            if next_line(first) == {"event": "owner stepped down", "token": 1}:
                break
        else:
            raise AssertionError("the stopped owner did not step down")
        # (One line may have been on its way when it was stopped: the checks after are refused.)
        after = [next_line(first) for _ in range(3)]
        assert after[1:] == [{"fence": False, "valid": False, "token": 1}] * 2
        assert next_line(second) == {"fence": True, "valid": True, "token": 2}
        # The second is killed: the first is elected again within the lease, with a larger
        # token (processes share one pair: each costs seconds to start on a busy machine).
        second.kill()
        killed = time.monotonic()
        for _ in range(100):
            line = next_line(first)
            if line.get("event") == "owner elected":
                break
        assert line == {"event": "owner elected", "token": 3}
        # The lease, and at most a heartbeat until the first claims.
        assert time.monotonic() - killed <= LEASE_S + LEASE_S / 4 + 0.3
