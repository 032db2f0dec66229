"""Prefix-aware routing against least-loaded, on two real CPU vLLM replicas of the tiny model:
vLLM's own prefix-cache hit rate (``vllm:prefix_cache_hits_total`` over
``vllm:prefix_cache_queries_total``, tokens) and the time to first token through the gateway.

The gateway runs in this process (a real socket) with one model of two replicas, each a vLLM
started by the process launcher (``min_replicas = 2``, prefix caching on: vLLM's default). The
load: ``--conversations`` agent-like conversations, each on one of ``--prompts`` long system
prompts, each ``--turns`` turns long (every turn sends the whole conversation so far, the
answers included), run by ``--clients`` clients at once; every request streams ``--tokens``
tokens. The two policies take turns on the same two servers (``--rounds`` rounds of prefix,
then least-loaded), each phase with system prompts of its own so that no phase finds what
another left in the caches; least-loaded is the model's routing with its prefix index taken
away, which is what ``routing = "least_loaded"`` is. The hit rate is the servers' counters'
growth over the phase.

    .venv/bin/python -m benchmarks.prefix_routing [--prompts 6] [--conversations 12]
        [--turns 4] [--clients 4] [--rounds 1]

Needs ``.venv-vllm`` (scripts/setup-vllm.sh); makes the tiny model in a temporary directory.
"""

from __future__ import annotations

import argparse
import json
import random
import re
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import anyio
import httpx2

from backends.pool import ModelState
from tests.support import ROOT, eventually, make_config, serving

VLLM_PYTHON = ROOT / ".venv-vllm" / "bin" / "python"
WORDS = ("model server gateway request token stream replica cache prefix block answer queue "
         "slot prompt system user assistant tool search read write file result").split()
COUNTER = re.compile(r"^(vllm:prefix_cache_(?:hits|queries)_total)\{[^}]*\} ([0-9.e+]+)$", re.M)


def vllm_model(model_dir: Path) -> dict[str, Any]:
    return {"name": "tiny", "launcher": "process", "max_replicas": 2, "min_replicas": 2,
            "max_concurrent": 8, "startup_timeout": 600.0, "idle_timeout": 3600.0,
            "command": [str(VLLM_PYTHON), "-m", "vllm.entrypoints.openai.api_server",
                        "--model", str(model_dir), "--served-model-name", "{name}",
                        "--host", "127.0.0.1", "--port", "{port}", "--load-format", "dummy",
                        "--max-model-len", "4096", "--dtype", "bfloat16"],
            "env": {"HF_HUB_OFFLINE": "1", "VLLM_CPU_KVCACHE_SPACE": "1"}}


def system_prompt(rng: random.Random, chars: int) -> str:
    words: list[str] = []
    while sum(len(w) + 1 for w in words) < chars:
        words.append(rng.choice(WORDS))
    return "You are an agent. " + " ".join(words)


def counters(http: httpx2.Client, addresses: list[str]) -> dict[str, float]:
    """The two prefix-cache counters, summed over the servers."""
    total = {"vllm:prefix_cache_hits_total": 0.0, "vllm:prefix_cache_queries_total": 0.0}
    for address in addresses:
        for name, value in COUNTER.findall(http.get(address + "/metrics").text):
            total[name] += float(value)
    return total


async def phase(url: str, rng: random.Random, args: argparse.Namespace) -> list[float]:
    """The conversations, ``args.clients`` at a time; the time to first token of each turn."""
    prompts = [system_prompt(rng, args.prompt_chars) for _ in range(args.prompts)]
    conversations = [[{"role": "system", "content": rng.choice(prompts)}]
                     for _ in range(args.conversations)]
    ttfts: list[float] = []
    queue = list(range(len(conversations)))
    async with httpx2.AsyncClient(timeout=600) as http:
        async def client() -> None:
            while queue:
                messages = conversations[queue.pop()]
                for turn in range(args.turns):
                    messages.append({"role": "user", "content": f"Step {turn}: "
                                     + " ".join(rng.choices(WORDS, k=12))})
                    sent = time.perf_counter()
                    first = None
                    answer = []
                    async with http.stream("POST", url + "/v1/chat/completions", json={
                            "model": "tiny", "messages": messages, "stream": True,
                            "max_tokens": args.tokens, "ignore_eos": True}) as r:
                        assert r.status_code == 200, await r.aread()
                        async for line in r.aiter_lines():
                            if not line.startswith("data: {"):
                                continue
                            delta = json.loads(line[6:])["choices"][0]["delta"]
                            if delta.get("content") and first is None:
                                first = time.perf_counter() - sent
                            answer.append(delta.get("content") or "")
                    assert first is not None
                    ttfts.append(first)
                    messages.append({"role": "assistant", "content": "".join(answer)})

        async with anyio.create_task_group() as tg:
            for _ in range(args.clients):
                tg.start_soon(client)
    return ttfts


def percentile(values: list[float], p: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(len(ordered) * p))]


async def run(model_dir: Path, args: argparse.Namespace) -> dict[str, dict[str, list[float]]]:
    config = make_config([vllm_model(model_dir)],
                         gateway={"queue_timeout": 600.0, "max_queue_size": 1000},
                         upstream={"timeout": 600.0})
    rng = random.Random(args.seed)
    results: dict[str, dict[str, list[float]]] = {
        name: {"ttft": [], "hits": [], "queries": []} for name in ("prefix", "least_loaded")}
    async with serving(config) as (url, gateway):
        model = gateway.pool.models["tiny"]
        replicas = model.replicas
        print("starting two vLLM replicas ...", file=sys.stderr)
        await eventually(lambda: all(r.state is ModelState.READY for r in replicas),
                         within=1200)
        addresses = [r.address or "" for r in replicas]
        index = model.prefixes
        with httpx2.Client(timeout=30) as http:
            for _ in range(args.rounds):
                for name in ("prefix", "least_loaded"):
                    model.prefixes = index if name == "prefix" else None
                    before = counters(http, addresses)
                    began = time.perf_counter()
                    ttfts = await phase(url, rng, args)
                    after = counters(http, addresses)
                    got = results[name]
                    got["ttft"] += ttfts
                    got["hits"].append(after["vllm:prefix_cache_hits_total"]
                                       - before["vllm:prefix_cache_hits_total"])
                    got["queries"].append(after["vllm:prefix_cache_queries_total"]
                                          - before["vllm:prefix_cache_queries_total"])
                    print(f"{name}: {len(ttfts)} requests in {time.perf_counter() - began:.0f} s,"
                          f" routed so far {model.routed}", file=sys.stderr)
    return results


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--prompts", type=int, default=6, help="system prompts per phase")
    parser.add_argument("--prompt-chars", type=int, default=3000)
    parser.add_argument("--conversations", type=int, default=12, help="per phase")
    parser.add_argument("--turns", type=int, default=4)
    parser.add_argument("--clients", type=int, default=4)
    parser.add_argument("--tokens", type=int, default=16, help="generated per request")
    parser.add_argument("--rounds", type=int, default=1)
    parser.add_argument("--seed", type=int, default=27)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory(prefix="prefix-routing-") as work:
        model_dir = Path(work) / "tiny"
        subprocess.run([str(VLLM_PYTHON), str(ROOT / "scripts" / "make-tiny-model.py"),
                        str(model_dir)], check=True, capture_output=True)
        results = anyio.run(run, model_dir, args)
    print(f"{args.prompts} system prompts of {args.prompt_chars} characters, "
          f"{args.conversations} conversations of {args.turns} turns, {args.clients} clients, "
          f"{args.tokens} tokens each, {args.rounds} round(s); two CPU vLLM replicas")
    for name, got in results.items():
        hits, queries = sum(got["hits"]), sum(got["queries"])
        ttft = got["ttft"]
        print(f"{name:>13}: prefix cache hits {hits:.0f} of {queries:.0f} tokens "
              f"({100 * hits / queries:.1f} %), TTFT p50 {statistics.median(ttft) * 1000:.0f} ms"
              f", p90 {percentile(ttft, 0.9) * 1000:.0f} ms ({len(ttft)} requests)")


if __name__ == "__main__":
    main()
