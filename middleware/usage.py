"""A request's tokens, read from the usage its backend reports, as the answer passes.

vLLM reports ``usage`` in every answer it counts tokens for: a plain JSON answer's last field
(``prompt_tokens``, ``completion_tokens``; the Responses API and Anthropic's Messages say
``input_tokens``, ``output_tokens``, Anthropic's with the cached part of the prompt apart), a
stream's final chunk when the request asks for it with ``stream_options.include_usage``, the
Responses API's ``response.completed`` event, Anthropic's ``message_start`` and
``message_delta`` events. ``UsageScan`` is fed the answer's chunks as they go by, unchanged: it
looks for a ``"usage"`` key (a key, not text: a JSON string escapes its quotes) and reads the
numbers of each usage object it finds, keeping the largest (a stream's counts grow). Nothing is
buffered but a usage object cut between chunks.

A streamed chat or text completion reports its usage only when asked, so ``asking_for_usage``
adds ``stream_options.include_usage`` to a body whose client did not ask, and ``UsageStrip``
drops the usage-only chunk from the answer, so the client sees what it asked for. It holds back
the part of a chunk after its last complete event (vLLM writes one event per chunk, so usually
nothing), at most ``HOLD_BYTES``.
"""

from __future__ import annotations

import json
import re

import msgspec

# A usage object's key, with its value's opening brace (a ``null`` is no usage).
_USAGE = re.compile(rb'"usage"\s*:\s*\{')
_BRACES = re.compile(rb"[{}]")
_FIGURE = re.compile(rb'"(prompt_tokens|input_tokens|cache_read_input_tokens|'
                     rb'cache_creation_input_tokens|completion_tokens|output_tokens)"\s*:\s*(\d+)')
_PROMPT = frozenset({b"prompt_tokens", b"input_tokens", b"cache_read_input_tokens",
                     b"cache_creation_input_tokens"})
# Bytes of a usage object cut between chunks that are kept (a usage object is ~100-300).
MAX_OBJECT = 4096
# The paths whose streams report usage only when asked.
ASKED_PATHS = frozenset({"/v1/chat/completions", "/v1/completions"})
# Bytes of an incomplete event that UsageStrip holds back before it lets them go unread.
HOLD_BYTES = 1 << 16


class UsageScan:
    """The largest prompt and completion counts of the usage objects in what it is fed."""

    __slots__ = ("_rest", "completion", "prompt")

    def __init__(self) -> None:
        self.prompt = 0
        self.completion = 0
        # The start of a usage object (or of its key) cut at the end of the last chunk.
        self._rest = b""

    def feed(self, chunk: bytes) -> None:
        data = self._rest + chunk if self._rest else chunk
        self._rest = b""
        if b'"usage"' not in data:
            # A key cut at the chunk's end completes in the next one.
            tail = data[-len(b'"usage"') + 1:]
            self._rest = tail if b'"' in tail else b""
            return
        position = 0
        while (found := _USAGE.search(data, position)) is not None:
            end = _object_end(data, found.end())
            if end is None:
                rest = data[found.start():]
                self._rest = rest if len(rest) <= MAX_OBJECT else b""
                return
            self._read(data[found.end():end])
            position = end
        tail = data.rfind(b'"usage"', position)
        if tail >= 0 and not data[tail + len(b'"usage"'):].strip(b" \t\r\n:"):
            self._rest = data[tail:]  # a key whose value is yet to come

    def _read(self, usage: bytes) -> None:
        prompt = completion = 0
        for name, value in _FIGURE.findall(usage):
            if name in _PROMPT:
                prompt += int(value)
            else:
                completion = int(value)
        self.prompt = max(self.prompt, prompt)
        self.completion = max(self.completion, completion)


def _object_end(data: bytes, start: int) -> int | None:
    """Where the object opened just before ``start`` ends (None: not in ``data``). A usage
    object holds no strings with braces, so its braces are counted as they come."""
    depth = 1
    for brace in _BRACES.finditer(data, start):
        depth += 1 if brace.group() == b"{" else -1
        if depth == 0:
            return brace.end()
    return None


class _Options(msgspec.Struct):
    stream_options: object = None


_options = msgspec.json.Decoder(_Options)


def asking_for_usage(body: bytes) -> bytes | None:
    """The body of a streamed completion asking for its usage where its client did not (None:
    it asks already, or its ``stream_options`` is not an object, which the backend refuses).
    The added key comes last, and a later key wins (json.loads, pydantic), so the body is not
    written again."""
    options = _options.decode(body).stream_options  # Admission read it as an object already
    if options is None:
        options = {}
    elif not isinstance(options, dict) or options.get("include_usage") is True:
        return None
    # Usage on the last chunk only: on every chunk it would have to be taken out of each.
    options = {**options, "include_usage": True, "continuous_usage_stats": False}
    end = body.rindex(b"}")
    return body[:end] + b', "stream_options": ' + json.dumps(options).encode() + b"}"


class UsageStrip:
    """An SSE answer without its usage-only events, as the client would have had it."""

    __slots__ = ("_held",)

    def __init__(self) -> None:
        self._held = b""

    def strip(self, chunk: bytes, last: bool) -> bytes:
        """What of the answer goes to the client now: its complete events but the usage-only
        ones (and at the end, whatever is left)."""
        data = self._held + chunk if self._held else chunk
        if last or len(data) > HOLD_BYTES:  # one event this large is no usage chunk
            cut = len(data)
        else:
            cut = data.rfind(b"\n\n") + 2  # 1: no complete event, nothing goes yet
            cut = cut if cut > 1 else 0
        whole, self._held = data[:cut], data[cut:]
        if _USAGE.search(whole) is None:
            return whole
        events = whole.split(b"\n\n")
        kept = [event + b"\n\n" for event in events[:-1] if not _USAGE.search(event)]
        if not _USAGE.search(events[-1]):  # what follows the last blank line (at the end)
            kept.append(events[-1])
        return b"".join(kept)
