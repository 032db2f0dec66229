"""A simulated vLLM server for the tests, the benchmarks and the demo configuration.

A test and demo tool, not part of the gateway: it imports nothing of it (the import contract in
pyproject.toml says so), and it depends only on the standard library and aiohttp, so that it
runs in a minimal container image. ``python -m simulator --port 8000 --model NAME`` runs it;
:mod:`simulator.server` owns the OpenAI-compatible endpoints, the pacing and the fault
switches, :mod:`simulator.sleep` vLLM's sleep mode.
"""
