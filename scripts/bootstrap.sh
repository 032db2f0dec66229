#!/usr/bin/env bash
# Create .venv (once) and install the gateway with its test dependencies into it (editable:
# a change to the code needs no new install). Idempotent and quick when nothing changed: the
# install runs again only when pyproject.toml (or the Python) differs from the last install's.
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON="${PYTHON:-python3}"
if [[ ! -x .venv/bin/python ]]; then
    echo "bootstrap: creating .venv and installing the gateway with its test extras (~1 min)" >&2
    "$PYTHON" -m venv .venv
    .venv/bin/python -m pip install --quiet --disable-pip-version-check --upgrade pip
fi
stamp=.venv/.vllm-gateway-installed
want=$({ cat pyproject.toml; .venv/bin/python -VV; } | sha256sum | cut -c1-16)
if [[ $(cat "$stamp" 2>/dev/null) != "$want" || ! -x .venv/bin/vllm-gateway ]]; then
    echo "bootstrap: installing the gateway into .venv (pyproject.toml changed or first run)" >&2
    # setuptools' "Editable installation" notice (information only, shown on every install)
    # says nothing about this project; its other warnings still show.
    PYTHONWARNINGS="ignore:Editable installation:UserWarning" \
        .venv/bin/python -m pip install --quiet --disable-pip-version-check -e '.[test]'
    echo "$want" >"$stamp"
fi
