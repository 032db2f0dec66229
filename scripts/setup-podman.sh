#!/usr/bin/env bash
# Install and configure Podman, then start its Docker-compatible API service.
# Idempotent; run as root. Used by .ci/run and by developers.
# Recipe and background: /work/shared/docs/podman-in-ci.md
#
#   sudo scripts/setup-podman.sh          # prints the API URL on its last line
#   PODMAN_SOCK=/tmp/p.sock scripts/setup-podman.sh
set -euo pipefail

SOCK="${PODMAN_SOCK:-/run/podman/podman.sock}"
LOG="${PODMAN_SERVICE_LOG:-/var/log/podman-service.log}"
CONF=/etc/containers/containers.conf

die() { echo "setup-podman: ERROR: $*" >&2; exit 1; }
[[ $(id -u) -eq 0 ]] || die "must run as root (rootful Podman; writes /etc/containers)"

# --- packages: only touch apt when something is missing (a warm run makes no network calls).
# Naming runc keeps apt from choosing crun for podman's "crun | runc"; netavark and iptables make
# published ports work (iptables is only a Suggests). Recommends stay on, as in the recipe
# (catatonit for HostConfig.Init, aardvark-dns). debootstrap: scripts/build-images.sh. curl: probes.
missing=()
need() { command -v "$1" >/dev/null 2>&1 || missing+=("${@:2}"); }
need podman podman netavark aardvark-dns
need runc runc
need iptables iptables
need busybox busybox-static
need debootstrap debootstrap
need curl curl
if ((${#missing[@]})); then
    echo "setup-podman: installing ${missing[*]}"
    export DEBIAN_FRONTEND=noninteractive
    apt-get update -qq
    apt-get install -y -qq "${missing[@]}" >/dev/null
fi

# --- containers.conf
# runc: crun fails here ("cgroups in hybrid mode not supported").
# cgroupfs / file events: there is no systemd and no journald. netavark: a fresh install also
#   pulls in CNI plugins; pin the backend podman picked here.
# ulimits: Podman's rootful defaults (nofile=1048576, nproc=4194304) exceed what this sandbox
#   allows ("error setting rlimit type 6/7: operation not permitted"), so use this machine's hard
#   limits. Seen here: nproc above kernel.pid_max (32768) is also refused although `ulimit -Hu`
#   says 96364, hence the pid_max cap. Not 1024: vLLM raises RLIMIT_NOFILE and needs many fds.
cap() { local v=$1 c; for c in "${@:2}"; do [[ $v == unlimited || $v -gt $c ]] && v=$c; done; echo "$v"; }
nofile=$(cap "$(ulimit -Hn)" 1048576)
nproc=$(cap "$(ulimit -Hu)" "$(cat /proc/sys/kernel/pid_max)" 1048576)
want=$(cat <<EOF
# Written by scripts/setup-podman.sh
[containers]
default_ulimits = ["nofile=${nofile}:${nofile}", "nproc=${nproc}:${nproc}"]

[engine]
runtime = "runc"
cgroup_manager = "cgroupfs"
events_logger = "file"

[network]
network_backend = "netavark"
EOF
)
conf_changed=0
if [[ ! -f $CONF || "$(cat "$CONF")" != "$want" ]]; then
    mkdir -p "$(dirname "$CONF")"
    printf '%s\n' "$want" >"$CONF"
    conf_changed=1
fi
# Storage: the defaults (overlay under /var/lib/containers/storage, native diff on ext4) work
# here, so no storage.conf is written.

# --- API service
# /_ping answers in ~10 ms; /version takes ~0.6 s on Podman 4.3.
answers() { curl -fsS --max-time 2 --unix-socket "$SOCK" http://d/_ping >/dev/null 2>&1; }

PIDFILE="$SOCK.pid"

# The service reads containers.conf only at start: restart the one we started if it changed.
if ((conf_changed)) && answers; then
    if old=$(cat "$PIDFILE" 2>/dev/null) && kill "$old" 2>/dev/null; then
        echo "setup-podman: $CONF changed; restarting the service (pid $old)"
        for _ in $(seq 1 50); do kill -0 "$old" 2>/dev/null || break; sleep 0.1; done
    else
        echo "setup-podman: WARNING: $CONF changed; restart the service on $SOCK to apply it" >&2
    fi
fi
if ! answers; then
    mkdir -p "$(dirname "$SOCK")" "$(dirname "$LOG")"
    rm -f "$SOCK"  # stale socket from a dead service
    # setsid + nohup: own session, survives this script and its terminal; --time=0: never idle out.
    setsid nohup podman system service --time=0 "unix://$SOCK" </dev/null >>"$LOG" 2>&1 &
    pid=$!
    echo "$pid" >"$PIDFILE"
    for _ in $(seq 1 150); do  # bounded: 30 s
        answers && break
        kill -0 "$pid" 2>/dev/null || { tail -n 20 "$LOG" >&2; die "podman system service exited (log: $LOG)"; }
        sleep 0.2
    done
    answers || { tail -n 20 "$LOG" >&2; die "API on $SOCK did not answer within 30 s (log: $LOG)"; }
    echo "setup-podman: started podman system service (pid $pid, log $LOG)"
fi

echo "setup-podman: API $(curl -fsS --unix-socket "$SOCK" http://d/version | python3 -c 'import json,sys; v=json.load(sys.stdin); print(v["Components"][0]["Name"], v["Version"], "api", v["ApiVersion"])' 2>/dev/null || echo up)"
echo "unix://$SOCK"
