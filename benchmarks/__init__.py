"""Benchmarks of the gateway against direct access, nginx and LiteLLM; see benchmarks/README.md."""
