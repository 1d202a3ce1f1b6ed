#!/usr/bin/env bash
# A container engine for the compose test, on a Debian 12 host without Docker and without a reachable
# registry: podman + runc + cgroupfs (settings in a containers.conf of our own, via CONTAINERS_CONF: the
# host's /etc/containers stays untouched), the Docker API from `podman system service` on a private socket,
# Debian's docker-compose 1.29 on that socket, and debian:bookworm-slim made locally with debootstrap from
# the host's own Debian mirror when it cannot be pulled (cached: made once, reused by later runs).
#
#   tests/compose/engine.sh packages         the apt packages only (docker-compose for `config`)
#   tests/compose/engine.sh prepare          packages, containers.conf, the base image; prints CONTAINERS_CONF=...
#   tests/compose/engine.sh serve SOCKET     runs the Docker API service on SOCKET (foreground)
#
# ISHGW_CONTAINER_CACHE (default /var/tmp/ishgw-containers) holds containers.conf and the base image tarball.
set -euo pipefail
# shellcheck source=scripts/lib/functions.sh
source "$(dirname "$0")/../../scripts/lib/functions.sh"

CACHE="${ISHGW_CONTAINER_CACHE:-/var/tmp/ishgw-containers}"
CONF="$CACHE/containers.conf"
BASE_TAR="$CACHE/debian-bookworm-minbase.tar"
BASE_IMAGE="docker.io/library/debian:bookworm-slim"
# --no-install-recommends matters: docker-compose would otherwise pull docker.io and containerd.
ENGINE_PACKAGES=(podman runc conmon netavark aardvark-dns iptables catatonit slirp4netns uidmap fuse-overlayfs
    debootstrap docker-compose)

write_conf() {
    mkdir -p "$CACHE"
    # runc: crun refuses cgroup v1 "hybrid" hosts; no default ulimits: podman's nofile 1048576 can exceed the
    # hard limit (EPERM at start); events to a file: there is no journald in a test container; netavark even
    # where an old CNI configuration lies in /etc/cni/net.d (its plugins are not installed).
    cat >"$CONF.tmp" <<'CONF'
[containers]
default_ulimits = []

[engine]
runtime = "runc"
cgroup_manager = "cgroupfs"
events_logger = "file"

[network]
network_backend = "netavark"
CONF
    mv -f "$CONF.tmp" "$CONF"
}

debian_mirror() {
    local mirror
    mirror="$(awk '/^URIs:/ {print $2; exit}' /etc/apt/sources.list.d/debian.sources 2>/dev/null || true)"
    [ -n "$mirror" ] || mirror="$(grep -hs '^deb ' /etc/apt/sources.list /etc/apt/sources.list.d/*.list \
        | grep -v security | grep -o 'https\?://[^ ]*' | head -n 1 || true)"
    [ -n "$mirror" ] || die "no Debian mirror found in /etc/apt"
    echo "$mirror"
}

# base_image: the image exists, or is imported from the cached tarball, or the tarball is made first.
base_image() {
    local mirror rootfs tarball
    podman image exists "$BASE_IMAGE" && return 0
    if podman pull -q "$BASE_IMAGE" >/dev/null 2>&1; then return 0; fi
    if [ ! -s "$BASE_TAR" ]; then
        mirror="$(debian_mirror)"
        rootfs="$(mktemp -d "$CACHE/rootfs.XXXXXX")"
        log "no registry: making $BASE_IMAGE with debootstrap from $mirror (once; cached in $BASE_TAR)"
        debootstrap --variant=minbase bookworm "$rootfs" "$mirror" >"$CACHE/debootstrap.log" 2>&1 \
            || { rm -rf "$rootfs"; die "debootstrap failed: see $CACHE/debootstrap.log"; }
        echo "deb $mirror bookworm main" >"$rootfs/etc/apt/sources.list"
        rm -rf "$rootfs"/var/cache/apt/archives/*.deb "$rootfs"/var/lib/apt/lists/*
        tarball="$(mktemp "$BASE_TAR.XXXXXX")"
        tar -C "$rootfs" -cf "$tarball" .
        rm -rf "$rootfs"
        mv -f "$tarball" "$BASE_TAR"
    fi
    podman import -q -c 'CMD ["/bin/bash"]' "$BASE_TAR" "$BASE_IMAGE" >/dev/null
}

case "${1:-}" in
    packages) ensure_apt_packages "${ENGINE_PACKAGES[@]}" ;;
    prepare)
        ensure_apt_packages "${ENGINE_PACKAGES[@]}"
        write_conf
        export CONTAINERS_CONF="$CONF"
        base_image
        echo "CONTAINERS_CONF=$CONF"
        ;;
    serve)
        [ -n "${2:-}" ] || die "usage: engine.sh serve SOCKET"
        export CONTAINERS_CONF="$CONF"
        exec podman system service --time=0 "unix://$2"
        ;;
    *) die "usage: engine.sh packages | prepare | serve SOCKET" ;;
esac
