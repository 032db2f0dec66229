"""The streaming load generator: its own process, raw HTTP/1.1 over asyncio protocols on uvloop.

``python -m benchmarks.loadgen '<json spec>'`` runs one scenario and prints one JSON line with
its result on stdout. A hand-written client (not aiohttp) so the generator, which shares a core
with the backend, spends a few microseconds per chunk: it decodes the chunked framing, splits
SSE events at blank lines and timestamps every event on arrival (``time.monotonic``, the same
clock as the responder's send stamps, so a relay's hold time can be read per event).

Modes (``spec["mode"]``):

* ``streams``: closed loop, ``concurrency`` keep-alive connections, each sending the next
  streaming request as soon as the last one ended; counts the streams that finished inside the
  measurement window ``[window_start, window_end]`` (absolute ``time.monotonic`` values, so the
  caller can sample CPU counters at the same moments).
* ``paced``: ``streams`` long streams started evenly over ``ramp`` seconds, each long enough to
  cover the window; per-event inter-arrival gaps and relay delays inside the window.
* ``burst``: ``count`` requests spread evenly over ``spread`` seconds, each on a new connection
  (a burst of clients); the status of each, and whether 429s carry ``Retry-After``.
* ``serve``: ``vllm bench serve``'s load at a fixed concurrency: random prompts, a fixed
  number of output tokens, a burst at the start; TTFT, ITL and output tokens/s.
* ``soak``: closed loop over several models (``per_model`` connections each) until
  ``window_end``, alternating streaming and plain requests; per-second counts and statuses.
  With ``disconnect`` (a share), that share of the requests hang up at a random moment within
  ``hang_up_within`` seconds of being sent (a stream mid-stream, a plain request before its
  answer); every failed request is listed with its model and times, to be put down to a cause.
"""

from __future__ import annotations

import asyncio
import itertools
import json
import math
import os
import random
import statistics
import sys
import time
from collections import Counter
from collections.abc import Callable
from typing import Any

mono = time.monotonic


class HTTPError(Exception):
    pass


class Exchange:
    """What one request got back."""

    __slots__ = ("body_tail", "complete", "delays", "ended", "events", "first", "headers",
                 "hung_up", "reads", "started", "status", "token_times")

    def __init__(self) -> None:
        self.status = 0
        self.headers: dict[bytes, bytes] = {}
        self.events = 0
        self.reads = 0
        self.started = mono()
        self.first = 0.0
        self.ended = 0.0
        self.complete = False
        self.hung_up = False  # the client hung up before the answer was in
        self.body_tail = b""
        self.token_times: list[float] | None = None
        self.delays: list[float] | None = None


class Connection(asyncio.Protocol):
    """One keep-alive HTTP/1.1 connection; one exchange at a time."""

    def __init__(self) -> None:
        self.transport: asyncio.Transport | None = None
        self.closed = asyncio.get_running_loop().create_future()
        self.waiter: asyncio.Future[Exchange] | None = None
        self.ex: Exchange | None = None
        self.last: Exchange | None = None  # kept after the exchange ends or is cancelled
        self.keep_times = False
        self._reset_parser()

    def _reset_parser(self) -> None:
        self.buf = bytearray()
        self.state = 0  # 0 head, 1 content-length body, 2 chunked, 3 until close
        self.remaining = 0
        self.chunk_left = -1  # -1: expecting a size line
        self.event_buf = b""
        self.keep_alive = True

    # -- protocol callbacks ------------------------------------------------

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]

    def connection_lost(self, exc: Exception | None) -> None:
        self.transport = None
        if not self.closed.done():
            self.closed.set_result(None)
        if self.waiter is not None and not self.waiter.done():
            ex = self.ex
            if ex is not None and self.state == 3:
                ex.complete = True
                ex.ended = mono()
                self.waiter.set_result(ex)
            else:
                self.waiter.set_exception(HTTPError(f"connection lost: {exc!r}"))

    def data_received(self, data: bytes) -> None:
        ex = self.ex
        if ex is None:
            return
        now = mono()
        ex.reads += 1
        if not ex.first:
            ex.first = now
        self.buf += data
        try:
            self._parse(ex, now)
        except Exception as exc:  # a malformed answer ends this connection
            if self.waiter is not None and not self.waiter.done():
                self.waiter.set_exception(HTTPError(f"bad response: {exc!r}"))
            if self.transport is not None:
                self.transport.abort()

    # -- parsing -----------------------------------------------------------

    def _parse(self, ex: Exchange, now: float) -> None:
        buf = self.buf
        if self.state == 0:
            end = buf.find(b"\r\n\r\n")
            if end < 0:
                return
            lines = bytes(buf[:end]).split(b"\r\n")
            del buf[:end + 4]
            ex.status = int(lines[0].split(b" ", 2)[1])
            headers = ex.headers
            for line in lines[1:]:
                name, _, value = line.partition(b":")
                headers[name.strip().lower()] = value.strip()
            if headers.get(b"connection", b"").lower() == b"close":
                self.keep_alive = False
            if headers.get(b"transfer-encoding", b"").lower() == b"chunked":
                self.state = 2
            elif b"content-length" in headers:
                self.state = 1
                self.remaining = int(headers[b"content-length"])
            else:
                self.state = 3
                self.keep_alive = False
        if self.state == 1:
            take = bytes(buf[:self.remaining])
            del buf[:len(take)]
            self.remaining -= len(take)
            if take:
                self._body(ex, take, now)
            if self.remaining == 0:
                self._done(ex, now)
        elif self.state == 2:
            self._chunked(ex, buf, now)
        elif self.state == 3 and buf:
            take = bytes(buf)
            del buf[:]
            self._body(ex, take, now)

    def _chunked(self, ex: Exchange, buf: bytearray, now: float) -> None:
        """Decode chunked framing; ``chunk_left``: -1 size line next, -2 last CRLF, -3 CRLF."""
        while True:
            if self.chunk_left == -1:
                eol = buf.find(b"\r\n")
                if eol < 0:
                    return
                size = int(bytes(buf[:eol]).split(b";", 1)[0], 16)
                del buf[:eol + 2]
                self.chunk_left = size if size else -2
            if self.chunk_left == -2:  # no trailers expected: the terminating blank line
                if len(buf) < 2:
                    return
                del buf[:2]
                self._done(ex, now)
                return
            if self.chunk_left > 0:
                if not buf:
                    return
                take = bytes(buf[:self.chunk_left])
                del buf[:len(take)]
                self.chunk_left -= len(take)
                self._body(ex, take, now)
                if self.chunk_left:
                    return
                self.chunk_left = -3
            if self.chunk_left == -3:
                if len(buf) < 2:
                    return
                del buf[:2]
                self.chunk_left = -1

    def _body(self, ex: Exchange, data: bytes, now: float) -> None:
        """Count SSE events completed by ``data``, timestamp token events."""
        data = self.event_buf + data
        parts = data.split(b"\n\n")
        self.event_buf = parts.pop()
        ex.body_tail = (ex.body_tail + data)[-64:]
        if not parts:
            return
        ex.events += len(parts)
        if self.keep_times:
            times = ex.token_times
            delays = ex.delays
            assert times is not None and delays is not None
            for event in parts:
                if b"tok" not in event:  # role chunk, usage, [DONE]
                    continue
                times.append(now)
                at = event.find(b'"t=')
                # NaN where a relay dropped the stamp, so delays stay aligned with times.
                delays.append(now - float(event[at + 3:event.index(b'"', at + 3)])
                              if at >= 0 else math.nan)

    def _done(self, ex: Exchange, now: float) -> None:
        ex.complete = True
        ex.ended = now
        if self.event_buf:
            ex.body_tail = (ex.body_tail + self.event_buf)[-64:]
        waiter = self.waiter
        if not self.keep_alive and self.transport is not None:
            self.transport.close()
        if waiter is not None and not waiter.done():
            waiter.set_result(ex)

    # -- API ----------------------------------------------------------------

    async def exchange(self, request: bytes, *, keep_times: bool = False) -> Exchange:
        if self.transport is None:
            raise HTTPError("connection closed")
        loop = asyncio.get_running_loop()
        self._reset_parser()
        ex = self.ex = self.last = Exchange()
        self.keep_times = keep_times
        if keep_times:
            ex.token_times = []
            ex.delays = []
        self.waiter = loop.create_future()
        self.transport.write(request)
        try:
            return await self.waiter
        finally:
            self.waiter = None
            self.ex = None

    def close(self) -> None:
        if self.transport is not None:
            self.transport.close()


async def connect(host: str, port: int) -> Connection:
    loop = asyncio.get_running_loop()
    _, protocol = await loop.create_connection(Connection, host, port)
    return protocol


def build_request(spec: dict[str, Any], body: dict[str, Any], *, close: bool = False) -> bytes:
    payload = json.dumps(body, separators=(",", ":")).encode()
    headers = {"host": f"{spec['host']}:{spec['port']}", "content-type": "application/json",
               "content-length": str(len(payload)), **spec.get("headers", {})}
    if close:
        headers["connection"] = "close"
    head = f"POST {spec['path']} HTTP/1.1\r\n" + "".join(
        f"{k}: {v}\r\n" for k, v in headers.items()) + "\r\n"
    return head.encode() + payload


def chat_body(model: str, max_tokens: int, stream: bool) -> dict[str, Any]:
    return {"model": model, "messages": [{"role": "user", "content": "hi"}],
            "max_tokens": max_tokens, "stream": stream}


def quantiles(values: list[float], qs: tuple[float, ...] = (0.5, 0.9, 0.99, 0.999)
              ) -> dict[str, float | None]:
    if not values:
        return {f"p{q * 100:g}": None for q in qs}
    ordered = sorted(values)
    last = len(ordered) - 1
    return {f"p{q * 100:g}": ordered[min(last, round(q * last))] for q in qs}


def _stream_ok(ex: Exchange) -> bool:
    return ex.complete and ex.status == 200 and b"[DONE]" in ex.body_tail


async def sleep_until(t: float) -> None:
    delay = t - mono()
    if delay > 0:
        await asyncio.sleep(delay)


async def closed_loop(spec: dict[str, Any], request: bytes, end: float, each_within: float,
                      pause: float, record: Callable[[Exchange], None],
                      fail: Callable[[str, float], None],
                      hang_up: Callable[[], float | None] | None = None) -> None:
    """One client on one keep-alive connection, sending ``request`` again as soon as the last
    answer is in, until ``end``; a failed exchange goes to ``fail`` (the exception's name, the
    time the attempt began), the connection is dropped, and a new one made after ``pause``
    seconds. Where ``hang_up()`` gives a delay, the client hangs up that long after sending
    unless the answer is in by then (``record`` gets the exchange, ``hung_up`` set) and goes on
    at once on a new connection."""
    conn: Connection | None = None
    try:
        while mono() < end:
            began = mono()
            after = hang_up() if hang_up is not None else None
            try:
                if conn is None or conn.transport is None:
                    conn = await connect(spec["host"], spec["port"])
                ex = await asyncio.wait_for(conn.exchange(request), after or each_within)
            except (OSError, HTTPError, TimeoutError) as exc:
                last = conn.last if conn is not None else None
                if conn is not None:
                    conn.close()
                conn = None
                if (after is not None and isinstance(exc, TimeoutError) and last is not None
                        and last.started >= began):
                    last.hung_up = True
                    record(last)
                    continue
                fail(type(exc).__name__, began)
                await asyncio.sleep(pause)
                continue
            record(ex)
    finally:
        if conn is not None:
            conn.close()


# -- modes ----------------------------------------------------------------------------------


async def run_streams(spec: dict[str, Any]) -> dict[str, Any]:
    request = build_request(spec, chat_body(spec["model"], spec["max_tokens"], True))
    start, end = spec["window_start"], spec["window_end"]
    done: list[tuple[float, float, float, int, int]] = []  # started, first, ended, events, reads
    errors: Counter[str] = Counter()

    def record(ex: Exchange) -> None:
        if not _stream_ok(ex):
            errors[f"status {ex.status}" if ex.status != 200 else "incomplete"] += 1
            return
        done.append((ex.started, ex.first, ex.ended, ex.events, ex.reads))

    def fail(kind: str, _began: float) -> None:
        errors[kind] += 1

    await asyncio.gather(*(closed_loop(spec, request, end, spec.get("timeout", 30), 0.01,
                                       record, fail)
                           for _ in range(spec["concurrency"])))
    inside = [d for d in done if start <= d[2] <= end]
    window = end - start
    return {
        "mode": "streams", "window_s": window, "streams": len(inside),
        "streams_per_s": len(inside) / window,
        "events_per_stream": (sum(d[3] for d in inside) / len(inside)) if inside else 0,
        "reads_per_stream": (sum(d[4] for d in inside) / len(inside)) if inside else 0,
        "duration_ms": {k: v * 1000 if v is not None else None for k, v in
                        quantiles([d[2] - d[0] for d in inside]).items()},
        "ttfb_ms": {k: v * 1000 if v is not None else None for k, v in
                    quantiles([d[1] - d[0] for d in inside]).items()},
        "errors": dict(errors), "total_streams": len(done),
    }


async def run_paced(spec: dict[str, Any]) -> dict[str, Any]:
    """Each stream asks for as many tokens as carry it ``tail`` seconds past the window."""
    n, ramp, rate = spec["streams"], spec["ramp"], spec["tokens_per_second"]
    start, end = spec["window_start"], spec["window_end"]
    results: list[Exchange] = []
    errors: Counter[str] = Counter()
    began = mono()

    cut = 0
    samples: list[str] = []
    # Streams still running this long after the window are cut: a relay that fell behind
    # would otherwise keep the run waiting for its backlog.
    hard_stop = end + spec.get("grace", 2.0)

    async def one(i: int) -> None:
        nonlocal cut
        await sleep_until(began + ramp * i / n)
        tokens = max(1, math.ceil((end + spec.get("tail", 0.5) - mono()) * rate))
        request = build_request(spec, chat_body(spec["model"], tokens, True))
        try:
            conn = await connect(spec["host"], spec["port"])
        except OSError as exc:
            errors[type(exc).__name__] += 1
            return
        try:
            ex = await asyncio.wait_for(conn.exchange(request, keep_times=True),
                                        hard_stop - mono())
        except TimeoutError:
            cut += 1
            if conn.last is not None:
                results.append(conn.last)
            return
        except (OSError, HTTPError) as exc:
            errors[type(exc).__name__] += 1
            return
        finally:
            conn.close()
        if not _stream_ok(ex):
            errors[f"status {ex.status}" if ex.status != 200 else "incomplete"] += 1
            if len(samples) < 3:
                samples.append(f"status {ex.status}, complete {ex.complete}, "
                               f"ends {ex.body_tail[-64:]!r}")
        results.append(ex)

    await asyncio.gather(*(one(i) for i in range(n)))
    gaps: list[float] = []
    delays: list[float] = []
    events = 0
    covering = 0
    for ex in results:
        times, ds = ex.token_times or [], ex.delays or []
        if times and times[0] <= start and times[-1] >= end - 0.1:
            covering += 1
        prev = None
        for i, t in enumerate(times):
            if start <= t <= end:
                events += 1
                if prev is not None and prev >= start:
                    gaps.append(t - prev)
                if i < len(ds) and not math.isnan(ds[i]):
                    delays.append(ds[i])
            prev = t
    window = end - start
    ms = 1000.0
    return {
        "mode": "paced", "streams": n, "window_s": window,
        "covering_streams": covering,
        "events": events, "events_per_s": events / window,
        "offered_per_s": n * rate,
        "gap_ms": {k: v * ms if v is not None else None for k, v in quantiles(gaps).items()},
        "delay_ms": {k: v * ms if v is not None else None for k, v in quantiles(delays).items()},
        "delays_seen": len(delays),
        "errors": dict(errors), "error_samples": samples, "cut_after_window": cut,
        "completed": sum(1 for ex in results if _stream_ok(ex)),
    }


async def run_burst(spec: dict[str, Any]) -> dict[str, Any]:
    count, spread = spec["count"], spec["spread"]
    request = build_request(spec, chat_body(spec["model"], spec["max_tokens"], False),
                            close=True)
    statuses: Counter[str] = Counter()
    first_429: list[float] = []
    retry_after_ok = True
    began = mono()
    admitted_times: list[float] = []

    async def one(i: int) -> None:
        nonlocal retry_after_ok
        await sleep_until(began + spread * i / count)
        try:
            conn = await connect(spec["host"], spec["port"])
            try:
                ex = await asyncio.wait_for(conn.exchange(request), spec.get("timeout", 120))
            finally:
                conn.close()
        except (OSError, HTTPError, TimeoutError) as exc:
            statuses[type(exc).__name__] += 1
            return
        statuses[str(ex.status)] += 1
        if ex.status == 429:
            first_429.append(ex.ended - began)
            try:
                if float(ex.headers.get(b"retry-after", b"0")) < 1:
                    retry_after_ok = False
            except ValueError:
                retry_after_ok = False
        elif ex.status == 200:
            admitted_times.append(ex.ended - began)

    await asyncio.gather(*(one(i) for i in range(count)))
    return {"mode": "burst", "sent": count, "spread_s": spread, "statuses": dict(statuses),
            "first_429_s": min(first_429) if first_429 else None,
            "last_200_s": max(admitted_times) if admitted_times else None,
            "retry_after_ok": retry_after_ok, "elapsed_s": mono() - began}


async def run_soak(spec: dict[str, Any]) -> dict[str, Any]:
    end = spec["window_end"]
    began = mono()
    statuses: Counter[str] = Counter()
    per_second: Counter[int] = Counter()
    hung_up: Counter[str] = Counter()
    failures: list[tuple[float, float, str, str]] = []  # began, ended, model, what
    rng = random.Random(spec.get("seed", 0))
    share, within = spec.get("disconnect", 0.0), spec.get("hang_up_within", 1.0)
    ok = 0

    def hang_up() -> float | None:
        return rng.uniform(0.1, 0.9) * within if rng.random() < share else None

    async def worker(model: str, i: int) -> None:
        stream = i % 2 == 0
        request = build_request(spec, chat_body(model, spec["max_tokens"], stream))

        def record(ex: Exchange) -> None:
            nonlocal ok
            if ex.hung_up:
                hung_up[f"{'stream' if stream else 'plain'}, "
                        f"{'after' if ex.first else 'before'} the first byte"] += 1
                return
            good = ex.status == 200 and ex.complete and (not stream or _stream_ok(ex))
            what = str(ex.status) if good or ex.status != 200 else "incomplete"
            statuses[what] += 1
            if good:
                ok += 1
                per_second[int(ex.ended - began)] += 1
            else:
                failures.append((ex.started, mono(), model, what))

        def fail(kind: str, started: float) -> None:
            statuses[kind] += 1
            failures.append((started, mono(), model, kind))

        await closed_loop(spec, request, end, spec.get("timeout", 60), 0.05, record, fail,
                          hang_up if share else None)

    await asyncio.gather(*(worker(m, i) for m in spec["models"]
                           for i in range(spec["per_model"])))
    seconds = [per_second.get(s, 0) for s in range(int(end - began))]
    return {"mode": "soak", "ok": ok, "statuses": dict(statuses), "hung_up": dict(hung_up),
            "failures": failures, "began": began, "elapsed_s": mono() - began,
            "per_second": seconds}


def random_prompt(rng: random.Random, words: int) -> str:
    """A prompt of ``words`` random lowercase words (vLLM's random dataset: random tokens)."""
    letters = "abcdefghijklmnopqrstuvwxyz"
    return " ".join("".join(rng.choices(letters, k=rng.randint(2, 8))) for _ in range(words))


async def run_serve(spec: dict[str, Any]) -> dict[str, Any]:
    """``vllm bench serve`` with an infinite request rate and ``--max-concurrency``: ``streams``
    clients start together, each on a new keep-alive connection, and send the next request as
    soon as theirs ended, until ``requests`` were sent. Random prompts of ``prompt_words``
    words, ``max_tokens`` output tokens. TTFT runs from the request's send (from the connect,
    for a client's first request) to its first token; ITL is the gap between tokens."""
    n, total = spec["streams"], spec["requests"]
    rng = random.Random(spec.get("seed", 0))
    requests = [build_request(spec, {
        "model": spec["model"], "max_tokens": spec["max_tokens"], "stream": True,
        "messages": [{"role": "user", "content": random_prompt(rng, spec["prompt_words"])}]})
        for _ in range(total)]
    sent = 0
    ttft: list[tuple[int, float]] = []  # (wave: the client's n-th request, seconds)
    itl: list[float] = []
    tokens = 0
    errors: Counter[str] = Counter()
    began = mono()

    async def client() -> None:
        nonlocal sent, tokens
        conn: Connection | None = None
        wave = 0
        try:
            while sent < total:
                request = requests[sent]
                sent += 1
                at = mono()
                try:
                    if conn is None or conn.transport is None:
                        conn = await connect(spec["host"], spec["port"])
                    ex = await asyncio.wait_for(conn.exchange(request, keep_times=True),
                                                spec.get("timeout", 60))
                except (OSError, HTTPError, TimeoutError) as exc:
                    errors[type(exc).__name__] += 1
                    if conn is not None:
                        conn.close()
                    conn = None
                    continue
                times = ex.token_times or []
                if not _stream_ok(ex) or not times:
                    errors[f"status {ex.status}" if ex.status != 200 else "incomplete"] += 1
                    continue
                ttft.append((wave, times[0] - at))
                itl.extend(b - a for a, b in itertools.pairwise(times))
                tokens += len(times)
                wave += 1
        finally:
            if conn is not None:
                conn.close()

    await asyncio.gather(*(client() for _ in range(n)))
    elapsed = mono() - began
    ms = 1000.0

    def summary(values: list[float]) -> dict[str, float | None]:
        qs = quantiles(values, (0.5, 0.99))
        return {"mean": statistics.fmean(values) * ms if values else None,
                **{k: v * ms if v is not None else None for k, v in qs.items()}}

    return {
        "mode": "serve", "streams": n, "requests": total, "completed": len(ttft),
        "elapsed_s": elapsed, "output_tokens_per_s": tokens / elapsed,
        "requests_per_s": len(ttft) / elapsed,
        "ttft_ms": summary([t for _, t in ttft]),
        "ttft_first_wave_ms": summary([t for w, t in ttft if w == 0]),
        "ttft_later_waves_ms": summary([t for w, t in ttft if w > 0]),
        "itl_ms": summary(itl), "errors": dict(errors),
    }


MODES = {"streams": run_streams, "paced": run_paced, "burst": run_burst, "soak": run_soak,
         "serve": run_serve}


def main(argv: list[str] | None = None) -> int:
    args = sys.argv[1:] if argv is None else argv
    if len(args) != 1:
        print("usage: python -m benchmarks.loadgen '<json spec>'", file=sys.stderr)
        return 2
    spec = json.loads(args[0])
    try:
        import uvloop
        factory = uvloop.new_event_loop
    except ImportError:  # pragma: no cover
        factory = None
    with asyncio.Runner(loop_factory=factory) as runner:
        result = runner.run(MODES[spec["mode"]](spec))
    print(json.dumps(result), flush=True)
    return 0


if __name__ == "__main__":
    status = main()
    sys.stdout.flush()
    os._exit(status)
