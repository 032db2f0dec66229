#!/usr/bin/env bash
# Build the container images the tests and deployment need, without any registry:
#   localhost/vllm-gateway-base:bookworm  Debian bookworm (debootstrap) + python3 3.11 + aiohttp, uvloop
#   localhost/vllm-gateway-sim:test       tests/containers/Containerfile.simulator + simulator/
#   localhost/vllm-gateway:latest         ./Containerfile: the gateway, from wheels built here
#   localhost/vllm-gateway-infra:test     deploy/Containerfile.infra: Debian's redis-server and
#                                         nginx-light, for deploy/compose.cluster.yaml
# Each image carries a content-hash label; an image whose label matches is not rebuilt, so a warm
# run takes under a second. Cold: 2-4 min (debootstrap 70-170 s, load-dependent). Run as root after
# scripts/setup-podman.sh and scripts/bootstrap.sh (the gateway's wheels come from .venv's pip).
#
# Env: DEBIAN_MIRROR (default: this machine's apt source for bookworm),
#      SIM_BASE (e.g. python:3.11-slim where a registry is reachable; skips the debootstrap image),
#      IMAGE_BASE (the gateway image's base; default: SIM_BASE),
#      SIMULATOR_DIR (default: simulator; the package copied into the simulator image).
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."

BASE_IMAGE=localhost/vllm-gateway-base:bookworm
SIM_IMAGE=localhost/vllm-gateway-sim:test
GATEWAY_IMAGE=localhost/vllm-gateway:latest
INFRA_IMAGE=localhost/vllm-gateway-infra:test
SIM_BASE="${SIM_BASE:-$BASE_IMAGE}"
IMAGE_BASE="${IMAGE_BASE:-$SIM_BASE}"
SIMULATOR_DIR="${SIMULATOR_DIR:-simulator}"
SUITE=bookworm
PKGS=python3,python3-venv,python3-pip,ca-certificates
# The simulator needs aiohttp >= 3.9 (web.AppKey); Debian 12 ships 3.8.4. pip cannot reach PyPI inside
# `podman build` here (TLS-intercepting egress; the build does not trust its CA), so these are
# installed while assembling the rootfs, with the host's network and CA bundle. Pinned to the
# versions in the project's .venv.
PY_PKGS="aiohttp==3.14.5 uvloop==0.23.0"
LABEL=localhost.vllm-gateway.content-hash  # not "vllm-gateway.*": containers inherit image labels

die() { echo "build-images: ERROR: $*" >&2; exit 1; }
now() { date +%s.%N; }
took() { awk -v m="$1" -v a="$2" -v b="$(now)" 'BEGIN { printf "build-images: %-52s %6.1f s\n", m, b - a }'; }
key_of() { podman image inspect --format "{{index .Labels \"$LABEL\"}}" "$1" 2>/dev/null || true; }
id_of() { podman image inspect --format '{{.Id}}' "$1" 2>/dev/null || true; }

[[ $(id -u) -eq 0 ]] || die "must run as root (rootful Podman, debootstrap)"
for c in podman debootstrap; do command -v "$c" >/dev/null || die "$c missing: run scripts/setup-podman.sh"; done
[[ -f $SIMULATOR_DIR/__init__.py ]] || die "$SIMULATOR_DIR is not a Python package"
[[ -x .venv/bin/python ]] || die ".venv missing: run scripts/bootstrap.sh"

# One build at a time (parallel test workers may all call this script).
mkdir -p /run/lock
exec 9>/run/lock/vllm-gateway-build-images.lock
flock 9

work=$(mktemp -d /var/tmp/vllm-gateway-images.XXXXXX)  # on disk: the rootfs is ~280 MB
trap 'rm -rf "$work"' EXIT
t_all=$(now)

# The machine's configured Debian mirror for $SUITE: deb822 *.sources first, then one-line lists.
mirror() {
    local f
    for f in /etc/apt/sources.list.d/*.sources; do
        [[ -f $f ]] || continue
        awk -v s="$SUITE" 'BEGIN { RS = "" } {
            u = ""; ok = 0; off = 0; n = split($0, L, "\n")
            for (i = 1; i <= n; i++) {
                if (L[i] ~ /^URIs:/) { split(L[i], w, /[ \t]+/); u = w[2] }
                if (L[i] ~ /^Suites:/ && (L[i] " ") ~ ("[ \t]" s " ")) ok = 1
                if (L[i] ~ /^Enabled:[ \t]*no/) off = 1
            }
            if (ok && !off && u != "") { print u; exit }
        }' "$f"
    done
    { cat /etc/apt/sources.list /etc/apt/sources.list.d/*.list 2>/dev/null || true; } |
        awk -v s="$SUITE" '$1 == "deb" { for (i = 2; i < NF; i++) if ($i ~ /^[a-z+]+:\/\//) { if ($(i + 1) == s) print $i; break } }'
}

# --- a. base image: key = recipe (suite, variant, packages, cleanup). The mirror is not part of it.
t=$(now)
if [[ $SIM_BASE == "$BASE_IMAGE" || $IMAGE_BASE == "$BASE_IMAGE" ]]; then
    key=$(printf '%s\n' "$SUITE" minbase "$PKGS" "$PY_PKGS" "rm-apt-caches v1" | sha256sum | cut -c1-16)
    if [[ $(key_of "$BASE_IMAGE") == "$key" ]]; then
        took "$BASE_IMAGE up to date" "$t"
    else
        url="${DEBIAN_MIRROR:-$(mirror | head -n1 || true)}"
        [[ -n $url ]] || die "no apt source for $SUITE found in /etc/apt; set DEBIAN_MIRROR"
        log=/var/log/vllm-gateway-debootstrap.log
        echo "build-images: debootstrap $SUITE from $url (log: $log)"
        debootstrap --variant=minbase --include="$PKGS" "$SUITE" "$work/rootfs" "$url" \
            >"$log" 2>&1 || { tail -n 30 "$log" >&2; die "debootstrap failed"; }
        took "debootstrap" "$t"
        t=$(now)
        # env -i: keep the host's PIP_* settings (local indexes, constraints) out of the chroot.
        pipenv=(PATH=/usr/local/bin:/usr/bin:/bin HOME=/root)
        if cp /etc/ssl/certs/ca-certificates.crt "$work/rootfs/tmp/host-ca.crt" 2>/dev/null; then
            pipenv+=(PIP_CERT=/tmp/host-ca.crt)  # the host trusts the egress proxy's CA
        fi
        # shellcheck disable=SC2086  # PY_PKGS is a list
        chroot "$work/rootfs" /usr/bin/env -i "${pipenv[@]}" python3 -m pip install --quiet \
            --no-cache-dir --disable-pip-version-check --root-user-action=ignore \
            --break-system-packages $PY_PKGS || die "pip install in rootfs failed"
        rm -f "$work/rootfs/tmp/host-ca.crt"
        took "pip install $PY_PKGS" "$t"
        # Apt caches are useless in the image (~100 MB); derived images run apt-get update anyway.
        rm -rf "$work"/rootfs/var/cache/apt/archives/*.deb "$work"/rootfs/var/lib/apt/lists/*
        t=$(now)
        old=$(id_of "$BASE_IMAGE")
        tar -C "$work/rootfs" -c . |
            podman import --quiet --change "LABEL $LABEL=$key" --change 'CMD ["python3"]' - "$BASE_IMAGE" >/dev/null
        rm -rf "$work/rootfs"
        [[ -z $old ]] || podman rmi "$old" >/dev/null 2>&1 || true  # drop the superseded image if unused
        took "podman import $BASE_IMAGE" "$t"
    fi
fi

# --- b. simulator image: key = the staged build context (Containerfile + simulator/) + base image id.
t=$(now)
ctx="$work/sim-context"
mkdir -p "$ctx"
cp tests/containers/Containerfile.simulator "$ctx/Containerfile"
tar -C "$SIMULATOR_DIR" --exclude=__pycache__ --exclude='*.pyc' -c . | { mkdir -p "$ctx/simulator" && tar -C "$ctx/simulator" -x; }
key=$({ echo "$SIM_BASE $(id_of "$SIM_BASE")"
        cd "$ctx" && find . -type f -print0 | LC_ALL=C sort -z | xargs -0 sha256sum; } | sha256sum | cut -c1-16)
if [[ $(key_of "$SIM_IMAGE") == "$key" ]]; then
    took "$SIM_IMAGE up to date" "$t"
else
    old=$(id_of "$SIM_IMAGE")
    podman build --quiet --build-arg "BASE=$SIM_BASE" --label "$LABEL=$key" -t "$SIM_IMAGE" \
        -f "$ctx/Containerfile" "$ctx" >/dev/null
    [[ -z $old ]] || podman rmi "$old" >/dev/null 2>&1 || true
    took "podman build $SIM_IMAGE" "$t"
fi

# --- c. gateway image. pip cannot reach PyPI inside `podman build` here, so the wheels are built
# on the host into the staged context, pinned to the versions in .venv (the ones the tests ran
# with), and ./Containerfile installs them with --no-index. Key: the project's files, the
# Containerfile, the pins and the base image id; the wheels themselves are built only on a miss.
t=$(now)
ctx="$work/gateway-context"
mkdir -p "$ctx/src"
cp Containerfile "$ctx/Containerfile"
# The top-level packages of pyproject.toml's [tool.setuptools] packages: a new one needs no edit here.
packages=$(.venv/bin/python -c 'import tomllib; print(*{p.split(".")[0]: 0 for p in tomllib.load(open("pyproject.toml", "rb"))["tool"]["setuptools"]["packages"]})')
# shellcheck disable=SC2086  # one word per package
tar -c --exclude=__pycache__ --exclude='*.pyc' pyproject.toml README.md $packages |
    tar -C "$ctx/src" -x
# The runtime dependencies of vllm-gateway with the extras the image has (otel, cluster) in .venv,
# followed through their requirements.
.venv/bin/python - >"$work/pins.txt" <<'PY'
from importlib.metadata import distribution

from packaging.requirements import Requirement
from packaging.utils import canonicalize_name

pins, todo = {}, [("vllm-gateway", frozenset({"", "otel", "cluster"}))]
while todo:
    name, extras = todo.pop()
    dist = distribution(name)
    key = canonicalize_name(dist.metadata["Name"])
    if key in pins and extras <= pins[key][1]:
        continue
    pins[key] = (dist.version, pins.get(key, ("", frozenset()))[1] | extras)
    for req in map(Requirement, dist.requires or []):
        if req.marker is None or any(req.marker.evaluate({"extra": e}) for e in extras):
            todo.append((req.name, frozenset({"", *req.extras})))
pins.pop("vllm-gateway")
print("\n".join(f"{name}=={version}" for name, (version, _) in sorted(pins.items())))
PY
# README.md only feeds the wheel's description: editing it does not rebuild the image.
key=$({ echo "$IMAGE_BASE $(id_of "$IMAGE_BASE")"; cat "$work/pins.txt"
        cd "$ctx" && find . -type f ! -path ./src/README.md -print0 | LC_ALL=C sort -z |
            xargs -0 sha256sum; } | sha256sum | cut -c1-16)
if [[ $(key_of "$GATEWAY_IMAGE") == "$key" ]]; then
    took "$GATEWAY_IMAGE up to date" "$t"
else
    # The project's own wheel is built from the staged copy: nothing is written into the tree.
    .venv/bin/python -m pip wheel --quiet --disable-pip-version-check --wheel-dir "$ctx/wheels" \
        --constraint "$work/pins.txt" "$ctx/src[otel,cluster]" 2>"$work/pip.log" ||
        { tail -n 30 "$work/pip.log" >&2; die "pip wheel of the gateway failed"; }
    rm -rf "$ctx/src"
    took "pip wheel (host) for $GATEWAY_IMAGE" "$t"
    t=$(now)
    old=$(id_of "$GATEWAY_IMAGE")
    # docker format: the OCI format drops the HEALTHCHECK. --layers=false: no image of the
    # build stage is left behind (the key already decides when to build).
    podman build --quiet --layers=false --format docker --build-arg "BASE=$IMAGE_BASE" \
        --label "$LABEL=$key" -t "$GATEWAY_IMAGE" -f "$ctx/Containerfile" "$ctx" >/dev/null
    [[ -z $old ]] || podman rmi "$old" >/dev/null 2>&1 || true
    took "podman build $GATEWAY_IMAGE" "$t"
fi
# --- d. redis and nginx for the compose cluster. apt reaches the Debian mirror over plain http
# with the host's network (it is the image's own apt source, as debootstrap wrote it). Key: the
# Containerfile and the base image id.
t=$(now)
key=$({ echo "$SIM_BASE $(id_of "$SIM_BASE")"; sha256sum <deploy/Containerfile.infra; } |
      sha256sum | cut -c1-16)
if [[ $(key_of "$INFRA_IMAGE") == "$key" ]]; then
    took "$INFRA_IMAGE up to date" "$t"
else
    old=$(id_of "$INFRA_IMAGE")
    podman build --quiet --network host --build-arg "BASE=$SIM_BASE" --label "$LABEL=$key" \
        -t "$INFRA_IMAGE" -f deploy/Containerfile.infra deploy >/dev/null 2>"$work/infra.log" ||
        { tail -n 30 "$work/infra.log" >&2; die "podman build of $INFRA_IMAGE failed"; }
    [[ -z $old ]] || podman rmi "$old" >/dev/null 2>&1 || true
    took "podman build $INFRA_IMAGE" "$t"
fi
took "total" "$t_all"
