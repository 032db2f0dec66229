#!/usr/bin/env bash
# Install the system tools that the deployment tests (tests/deploy) run for real: nginx; the
# browser of the dashboard's tests; and the redis-server of the [cluster] tests.
# Podman comes from scripts/setup-podman.sh, podman-compose from the test extras (bootstrap.sh).
# Idempotent; run as root. A warm run makes no network calls.
set -euo pipefail

die() { echo "setup-system: ERROR: $*" >&2; exit 1; }
[[ $(id -u) -eq 0 ]] || die "must run as root (apt-get)"

missing=()
command -v nginx >/dev/null 2>&1 || [[ -x /usr/sbin/nginx ]] || missing+=(nginx-light)
# wrk: the load generator of benchmarks/ (its smoke test runs in the suite).
command -v wrk >/dev/null 2>&1 || missing+=(wrk)
# chromium and its chromedriver: the dashboard's browser tests (tests/dashboard).
[[ -x /usr/bin/chromium ]] || missing+=(chromium)
[[ -x /usr/bin/chromedriver ]] || missing+=(chromium-driver)
# redis-server: the shared accounting's tests ([cluster]) start their own, on a unix socket.
command -v redis-server >/dev/null 2>&1 || missing+=(redis-server)
if ((${#missing[@]})); then
    echo "setup-system: installing ${missing[*]}"
    # The packages would start the distribution's nginx on port 80 and a redis-server; the tests
    # start their own.
    if [[ ! -e /usr/sbin/policy-rc.d ]]; then
        printf '#!/bin/sh\nexit 101\n' >/usr/sbin/policy-rc.d
        chmod +x /usr/sbin/policy-rc.d
        trap 'rm -f /usr/sbin/policy-rc.d' EXIT
    fi
    export DEBIAN_FRONTEND=noninteractive
    apt-get update -qq
    apt-get install -y -qq "${missing[@]}" >/dev/null
fi
