#!/usr/bin/env bash
# Set up what the tests need, check the import contract, run the whole suite, and stop what was
# started for it. Extra arguments go to pytest.
#
# As any user it creates .venv (scripts/bootstrap.sh) and .venv-vllm, the CPU build of vLLM for
# tests/vllm (scripts/setup-vllm.sh: ~3.4 GB, ~2.5 min once). As root it also changes the machine,
# each step only where it is not done already:
#   - apt-get installs what is missing of nginx-light, wrk (scripts/setup-system.sh) and podman,
#     netavark, aardvark-dns, runc, iptables, busybox-static, debootstrap, curl
#     (scripts/setup-podman.sh);
#   - writes /etc/containers/containers.conf.d/50-vllm-gateway.conf, Podman's settings for this
#     kind of machine (containers.conf itself is not touched);
#   - starts a root Podman API service on /run/podman/podman.sock, and stops it when the suite
#     ends if this run started it (one that was running already is left running);
#   - builds four images, ~400 MB under /var/lib/containers (scripts/build-images.sh; remove
#     them with `podman rmi`). They stay, so that the next run takes a second.
# None of that: `scripts/bootstrap.sh && .venv/bin/pytest`; the container and deployment tests
# then skip, each saying what it lacks.
set -euo pipefail
cd "$(dirname "$0")/.."
scripts/bootstrap.sh
# The real-vLLM tier's venv (once, ~2.5 min); without it tests/vllm skips (in CI: fails).
scripts/setup-vllm.sh || echo "test.sh: scripts/setup-vllm.sh failed: tests/vllm cannot run" >&2
if [[ $(id -u) -eq 0 ]]; then
    echo "test.sh: as root: installing what is missing, writing Podman's drop-in, starting its" \
         "API service (stopped at the end if started now) and building the test images" \
         "(see the top of scripts/test.sh; none of it: scripts/bootstrap.sh && .venv/bin/pytest)" >&2
    sock="${PODMAN_SOCK:-/run/podman/podman.sock}"
    export VLLM_GATEWAY_TEST_ENGINE="${VLLM_GATEWAY_TEST_ENGINE:-unix://$sock}"
    pidfile="$sock.pid"
    before=$(cat "$pidfile" 2>/dev/null || true)
    scripts/setup-system.sh
    scripts/setup-podman.sh
    if [[ $(cat "$pidfile" 2>/dev/null || true) != "$before" ]]; then
        trap 'scripts/setup-podman.sh --stop' EXIT
    fi
    scripts/build-images.sh
else
    echo "test.sh: not root, so nothing is installed and no Podman service is started;" \
         "container and deployment tests skip where their tool is missing" >&2
fi
# The import contract ([tool.importlinter] in pyproject.toml): imports point one way.
.venv/bin/lint-imports
.venv/bin/pytest "$@"
