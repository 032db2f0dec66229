#!/usr/bin/env bash
# Set up everything the tests need (virtualenv; as root also Podman, its API service and the
# test images), then run the whole suite. Extra arguments go to pytest.
set -euo pipefail
cd "$(dirname "$0")/.."
scripts/bootstrap.sh
if [[ $(id -u) -eq 0 ]]; then
    scripts/setup-podman.sh
    scripts/build-images.sh
else
    echo "test.sh: not root, so no Podman service is started; container tests will skip" >&2
fi
exec .venv/bin/pytest "$@"
