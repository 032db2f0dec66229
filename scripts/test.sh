#!/usr/bin/env bash
# Set up everything the tests need (virtualenv; as root also nginx, Podman, its API service and
# the images), then run the whole suite. Extra arguments go to pytest.
set -euo pipefail
cd "$(dirname "$0")/.."
scripts/bootstrap.sh
# The real-vLLM tier's venv (once, ~2.5 min); without it tests/vllm skips (in CI: fails).
scripts/setup-vllm.sh || echo "test.sh: scripts/setup-vllm.sh failed: tests/vllm cannot run" >&2
if [[ $(id -u) -eq 0 ]]; then
    scripts/setup-system.sh
    scripts/setup-podman.sh
    scripts/build-images.sh
else
    echo "test.sh: not root, so nothing is installed and no Podman service is started;" \
         "container and deployment tests skip where their tool is missing" >&2
fi
exec .venv/bin/pytest "$@"
