#!/bin/sh
# Build the calicnm node image without an image registry, and without any
# network access from inside the build.
#
#   scripts/build-image.sh [TAG]        (default calicnm/node:latest)
#
# 1. The base image calicnm/node-base:bookworm: if the daemon lacks it, a
#    minimal Debian 12 root filesystem with the node's runtime packages
#    (python3, iproute2, iptables, ipset, bird2, etcd-server) is made with
#    debootstrap on this host and loaded with `docker import`.  The tarball is
#    kept in $CALICNM_BASE_CACHE (default
#    /var/cache/calicnm/node-base-bookworm.tar), so later builds skip
#    debootstrap; delete it to pick up Debian updates.
# 2. calicnm and its Python dependencies as wheels in build/wheels, made by
#    pip on this host with this host's package index settings.
# 3. `docker build`, which only copies the wheels into a virtualenv.
#
# DOCKER (default "docker") is the client command, e.g. "docker -H unix:///x".
# Needs root (debootstrap), Debian's mirror and a Python package index.
set -eu

tag=${1:-calicnm/node:latest}
docker=${DOCKER:-docker}
base=calicnm/node-base:bookworm
cache=${CALICNM_BASE_CACHE:-/var/cache/calicnm/node-base-bookworm.tar}
mirror=${DEBIAN_MIRROR:-http://deb.debian.org/debian}
python=${PYTHON:-python3}
here=$(cd "$(dirname "$0")/.." && pwd)
packages=python3,python3-venv,iproute2,iptables,ipset,bird2,etcd-server,ca-certificates,kmod,tini

if ! $docker image inspect "$base" >/dev/null 2>&1; then
    if [ ! -s "$cache" ]; then
        command -v debootstrap >/dev/null || {
            apt-get update -qq
            DEBIAN_FRONTEND=noninteractive apt-get install -y -qq debootstrap >/dev/null
        }
        work=$(mktemp -d)
        trap 'rm -rf "$work"' EXIT INT TERM
        echo "debootstrap: building the $base root filesystem"
        if ! debootstrap --variant=minbase --include="$packages" bookworm "$work/rootfs" \
                "$mirror" >"$work/debootstrap.log" 2>&1; then
            tail -20 "$work/debootstrap.log" >&2
            exit 1
        fi
        # No BIRD config of Debian's: the node writes its own.  No apt lists.
        rm -rf "$work/rootfs/var/lib/apt/lists/"* "$work/rootfs/var/cache/apt/archives/"*.deb \
            "$work/rootfs/etc/bird/bird.conf"
        mkdir -p "$(dirname "$cache")"
        tar -C "$work/rootfs" -c . >"$cache.tmp"
        mv "$cache.tmp" "$cache"
        rm -rf "$work"
        trap - EXIT INT TERM
    fi
    $docker import -c 'CMD ["bash"]' "$cache" "$base" >/dev/null
    echo "imported $base from $cache"
fi

rm -rf "$here/build/wheels"
$python -m pip wheel -q --disable-pip-version-check --wheel-dir "$here/build/wheels" "$here"
$docker build --network none -t "$tag" "$here"
