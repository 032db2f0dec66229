#!/usr/bin/env bash
# Install and configure Podman, then start its Docker-compatible API service, for the container
# and deployment tests. Idempotent; run as root. Used by scripts/test.sh (and so by .ci/run).
# Background: docs/podman-in-ci.md.
#
# What it changes on this machine, each only when it is not so already:
#   - installs with apt-get what is missing of: podman netavark aardvark-dns runc iptables
#     busybox-static debootstrap curl;
#   - writes its own drop-in, /etc/containers/containers.conf.d/50-vllm-gateway.conf (runtime,
#     cgroup manager, events logger, network backend, ulimits; see below). It does not edit
#     /etc/containers/containers.conf: keys there that the drop-in sets are overridden by it;
#   - starts a root `podman system service` on $PODMAN_SOCK (default /run/podman/podman.sock),
#     pid in $PODMAN_SOCK.pid, log in $PODMAN_SERVICE_LOG (default /var/log/podman-service.log),
#     left running: `--stop` stops it (scripts/test.sh does, when it was started for its run).
# To undo all of it: `scripts/setup-podman.sh --stop`, remove the drop-in, apt-get remove the
# packages it installed (it prints them).
#
#   sudo scripts/setup-podman.sh          # prints the API URL on its last line
#   sudo scripts/setup-podman.sh --stop   # stops the service it started on that socket
#   PODMAN_SOCK=/tmp/p.sock scripts/setup-podman.sh
set -euo pipefail

SOCK="${PODMAN_SOCK:-/run/podman/podman.sock}"
LOG="${PODMAN_SERVICE_LOG:-/var/log/podman-service.log}"
PIDFILE="$SOCK.pid"
CONF=/etc/containers/containers.conf.d/50-vllm-gateway.conf
# Earlier versions of this script wrote the main file; it is theirs when it starts with $MARK.
OLD_CONF=/etc/containers/containers.conf
MARK="# Written by scripts/setup-podman.sh"

die() { echo "setup-podman: ERROR: $*" >&2; exit 1; }
[[ $(id -u) -eq 0 ]] || die "must run as root (rootful Podman; writes /etc/containers)"

# --stop: the service this script started on $SOCK, and only that one.
if [[ ${1:-} == --stop ]]; then
    pid=$(cat "$PIDFILE" 2>/dev/null || true)
    if [[ -n $pid ]] && tr '\0' ' ' <"/proc/$pid/cmdline" 2>/dev/null | grep -q "system service"; then
        kill "$pid"
        for _ in $(seq 1 50); do kill -0 "$pid" 2>/dev/null || break; sleep 0.1; done
        echo "setup-podman: stopped podman system service (pid $pid) on $SOCK"
    else
        echo "setup-podman: no service started by this script runs on $SOCK"
    fi
    rm -f "$PIDFILE"
    exit 0
fi
[[ $# -eq 0 ]] || die "unknown argument $1 (only --stop)"

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
    echo "setup-podman: installing ${missing[*]} (apt-get)"
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
$MARK
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
if [[ -f $OLD_CONF && $(head -n1 "$OLD_CONF") == "$MARK" ]]; then
    # The main file as an earlier version of this script wrote it: it becomes the drop-in
    # (as it is, if it says the same: no restart).
    mkdir -p "$(dirname "$CONF")"
    mv "$OLD_CONF" "$CONF"
    echo "setup-podman: moved $OLD_CONF (written by an earlier version of this script) to $CONF"
fi
if [[ ! -f $CONF || "$(cat "$CONF")" != "$want" ]]; then
    mkdir -p "$(dirname "$CONF")"
    printf '%s\n' "$want" >"$CONF"
    echo "setup-podman: wrote $CONF"
    conf_changed=1
fi
# Storage: the defaults (overlay under /var/lib/containers/storage, native diff on ext4) work
# here, so no storage.conf is written.

# --- API service
# /_ping answers in ~10 ms; /version takes ~0.6 s on Podman 4.3.
answers() { curl -fsS --max-time 2 --unix-socket "$SOCK" http://d/_ping >/dev/null 2>&1; }

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

[[ ! -f $PIDFILE ]] ||
    echo "setup-podman: stop it with: ${PODMAN_SOCK:+PODMAN_SOCK=$SOCK }scripts/setup-podman.sh --stop"
echo "setup-podman: API $(curl -fsS --unix-socket "$SOCK" http://d/version | python3 -c 'import json,sys; v=json.load(sys.stdin); print(v["Components"][0]["Name"], v["Version"], "api", v["ApiVersion"])' 2>/dev/null || echo up)"
echo "unix://$SOCK"
