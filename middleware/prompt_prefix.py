"""A request's prompt as chained block hashes, for prefix-aware replica choice (``routing``).

vLLM's prefix cache reuses the KV blocks of a prompt's start that an earlier request on the
same server computed. The gateway cannot tokenise, so it reads the prompt as vLLM sees it, in
order: a chat request's ``system`` (Anthropic's) and its messages (role, then content: the text
parts, and any other part as its JSON), a completion's ``prompt`` (of a batch, the first), a
token-id prompt as its numbers. The text is cut into blocks of ``prefix_block_chars``
characters (the last, partial block is left out, as vLLM leaves out a partial block) and each
block's hash covers every block before it (CRC-32, continued over the text), so two prompts
that share their first n blocks share their first n hashes and differ from there on. A hash
also carries its block's place, so blocks at different depths hardly collide; a collision would
only misplace a request, never answer it wrongly. CRC-32 is not salted: every gateway process
computes the same hashes.

A body that is not such a JSON request has no blocks (``()``): it goes by load.
"""

from __future__ import annotations

import zlib

import msgspec


class _Message(msgspec.Struct):
    role: object = None
    content: object = None


class _Prompt(msgspec.Struct):
    """What vLLM builds a prompt from; the rest of the body is skipped unbuilt."""

    system: object = None
    messages: list[_Message] | None = None
    prompt: object = None


_prompt = msgspec.json.Decoder(_Prompt)
_encode = msgspec.json.encode
# Between a message's role and its content, and between messages: characters a prompt hardly
# holds, so that where one message ends is part of the text.
UNIT = "\x1f"
RECORD = "\x1e"


def _content(content: object) -> str:
    """A message's content (or a system prompt): a string, or the parts in order."""
    if isinstance(content, str):
        return content
    if isinstance(content, list):
        return UNIT.join(part["text"] if isinstance(part, dict) and isinstance(
            part.get("text"), str) else _encode(part).decode() for part in content)
    return "" if content is None else _encode(content).decode()


def prompt_text(body: bytes) -> str:
    """The prompt the body asks vLLM for, as one string; "" for a body that has none."""
    try:
        asked = _prompt.decode(body)
    except (msgspec.DecodeError, RecursionError):  # ValidationError is a DecodeError
        return ""
    pieces = [] if asked.system is None else [_content(asked.system)]
    if asked.messages:
        pieces += (f"{m.role}{UNIT}{_content(m.content)}" for m in asked.messages)
        return RECORD.join(pieces)
    prompt = asked.prompt
    if isinstance(prompt, list) and prompt and isinstance(prompt[0], (str, list)):
        prompt = prompt[0]  # a batch: its prompts share their start, as a rule
    if isinstance(prompt, list):
        return ",".join(map(str, prompt))  # token ids
    return prompt if isinstance(prompt, str) else ""


def chained_blocks(text: str, size: int) -> tuple[int, ...]:
    """The hash of each whole block of ``size`` characters, each covering those before it."""
    blocks = []
    crc = 0
    crc32 = zlib.crc32
    # ASCII (known without a scan) is its own UTF-8: cut the bytes, encoded once.
    whole = memoryview(text.encode()) if text.isascii() else None
    for depth, at in enumerate(range(0, len(text) - size + 1, size)):
        block = whole[at:at + size] if whole is not None else text[at:at + size].encode()
        crc = crc32(block, crc)
        blocks.append(crc | depth << 32)
    return tuple(blocks)


def prefix_blocks(body: bytes, size: int) -> tuple[int, ...]:
    """The body's prompt as chained block hashes (``chained_blocks``)."""
    return chained_blocks(prompt_text(body), size)
