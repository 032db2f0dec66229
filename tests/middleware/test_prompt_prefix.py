"""A request's prompt as chained block hashes: read as vLLM reads it (chat messages in order,
a completion's prompt, token ids), cut in whole blocks, each hash covering those before it."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from typing import Any

import pytest

from middleware.prompt_prefix import chained_blocks, prefix_blocks, prompt_text
from tests.support import ROOT

SYSTEM = "You are a helpful assistant who answers in French. " * 4  # 204 characters


def body(**fields: Any) -> bytes:
    return json.dumps({"model": "m", **fields}).encode()


def shared(a: tuple[int, ...], b: tuple[int, ...]) -> int:
    """How many blocks two prompts share from the first."""
    return next((i for i, (x, y) in enumerate(zip(a, b, strict=False)) if x != y),
                min(len(a), len(b)))


def test_chat_requests_with_one_system_prompt_share_its_blocks_and_differ_after() -> None:
    one = prefix_blocks(body(messages=[{"role": "system", "content": SYSTEM},
                                       {"role": "user", "content": "Bonjour " * 20}]), 32)
    two = prefix_blocks(body(messages=[{"role": "system", "content": SYSTEM},
                                       {"role": "user", "content": "Salut " * 30}]), 32)
    # "system" + a separator + 204 characters: the first 6 blocks of 32 hold the system prompt.
    assert shared(one, two) == 6
    assert (len(one), len(two)) == (11, 12)
    assert len(set(one)) == len(one)


def test_a_growing_conversation_keeps_the_blocks_of_its_earlier_turns() -> None:
    turns = [{"role": "system", "content": SYSTEM}, {"role": "user", "content": "a" * 100}]
    earlier = prefix_blocks(body(messages=turns), 16)
    later = prefix_blocks(body(messages=[*turns, {"role": "assistant", "content": "b" * 50},
                                         {"role": "user", "content": "c" * 50}]), 16)
    assert later[:len(earlier)] == earlier and len(later) > len(earlier)


def test_the_order_of_messages_and_their_roles_count() -> None:
    a = {"role": "user", "content": "x" * 64}
    b = {"role": "assistant", "content": "y" * 64}
    assert prefix_blocks(body(messages=[a, b]), 16) != prefix_blocks(body(messages=[b, a]), 16)
    as_system = prefix_blocks(body(messages=[{**a, "role": "system"}]), 16)
    assert as_system[0] != prefix_blocks(body(messages=[a]), 16)[0]


def test_content_parts_read_as_their_text_and_a_string_the_same() -> None:
    parts = [{"type": "text", "text": SYSTEM}]
    assert prompt_text(body(messages=[{"role": "user", "content": parts}])) == prompt_text(
        body(messages=[{"role": "user", "content": SYSTEM}]))
    image = {"type": "image_url", "image_url": {"url": "data:image/png;base64,AAAA"}}
    assert "data:image/png;base64,AAAA" in prompt_text(
        body(messages=[{"role": "user", "content": [*parts, image]}]))


def test_anthropic_system_comes_first() -> None:
    text = prompt_text(body(system=SYSTEM, messages=[{"role": "user", "content": "hi"}]))
    assert text.startswith(SYSTEM) and text.endswith("hi")


@pytest.mark.parametrize(("prompt", "text"), [
    ("Once upon a time", "Once upon a time"),
    (["Once upon a time", "Twice"], "Once upon a time"),
    ([1, 22, 333], "1,22,333"),
    ([[1, 22], [4]], "1,22"),
    ([], ""),
    (7, ""),
])
def test_a_completion_prompt_is_read_as_vllm_takes_it(prompt: Any, text: str) -> None:
    assert prompt_text(body(prompt=prompt)) == text


def test_token_id_prompts_that_share_a_prefix_share_blocks() -> None:
    start = list(range(100, 200))
    one = prefix_blocks(body(prompt=[*start, 1, 2, 3]), 32)
    two = prefix_blocks(body(prompt=[*start, 7, 8, 9]), 32)
    assert shared(one, two) == 12  # 100 ids of 3 digits and a comma: 400 characters


@pytest.mark.parametrize("raw", [b"not json", b"[1, 2]", b'{"messages": 3}',
                                 b'{"messages": [1]}', b"{}", b"--boundary\r\n"])
def test_a_body_with_no_prompt_has_no_blocks(raw: bytes) -> None:
    assert prefix_blocks(raw, 16) == ()


def test_only_whole_blocks_are_hashed_and_each_covers_those_before() -> None:
    assert chained_blocks("a" * 47, 16) == chained_blocks("a" * 32, 16)
    assert len(chained_blocks("a" * 48, 16)) == 3
    # The same block after a different start hashes differently.
    assert chained_blocks("x" * 16 + "a" * 16, 16)[1] != chained_blocks("y" * 16 + "a" * 16, 16)[1]
    assert chained_blocks("short", 16) == ()


def test_every_process_computes_the_same_hashes() -> None:
    code = ("from middleware.prompt_prefix import chained_blocks; "
            "print(list(chained_blocks('Ünïcode prompt ' * 20, 16)))")
    runs = [subprocess.run([sys.executable, "-c", code], cwd=ROOT, check=True, text=True,
                           capture_output=True, env={**os.environ, "PYTHONHASHSEED": seed}).stdout
            for seed in ("1", "2")]
    assert runs[0] == runs[1] == f"{list(chained_blocks('Ünïcode prompt ' * 20, 16))}\n"
