#!/usr/bin/env bash
# Set up (first run) and run the gateway on ./config.toml: two simulated models, no GPU needed.
# Extra arguments go to `vllm-gateway serve` (e.g. --bind 0.0.0.0:8080 --worker trio).
set -euo pipefail
cd "$(dirname "$0")/.."
scripts/bootstrap.sh
exec .venv/bin/vllm-gateway serve "$@"
