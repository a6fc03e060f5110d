#!/bin/sh
# Build calicnm's managed (v2) Docker plugin directory, ready for
# `docker plugin create`.
#
#   scripts/build-plugin.sh [DIR]       (default build/plugin)
#
# DIR/config.json is plugin.json; DIR/rootfs is the file system of the node
# image (scripts/build-image.sh builds it if the daemon lacks it), exported
# from a container that never runs.  Then, as README says:
#   docker plugin create calicnm/calicnm DIR
#   docker plugin set calicnm/calicnm ETCD_ENDPOINTS=http://10.0.0.1:2379
#   docker plugin enable calicnm/calicnm
#
# DOCKER (default "docker") is the client command; IMAGE (default
# calicnm/node:latest) the node image.
set -eu

dir=${1:-build/plugin}
docker=${DOCKER:-docker}
image=${IMAGE:-calicnm/node:latest}
here=$(cd "$(dirname "$0")/.." && pwd)

if ! $docker image inspect "$image" >/dev/null 2>&1; then
    sh "$here/scripts/build-image.sh" "$image"
fi
rm -rf "$dir"
mkdir -p "$dir/rootfs"
container=$($docker create "$image")
trap '$docker rm -f "$container" >/dev/null 2>&1 || true' EXIT INT TERM
$docker export "$container" | tar -C "$dir/rootfs" -x
cp "$here/plugin.json" "$dir/config.json"
echo "plugin directory: $dir (docker plugin create calicnm/calicnm $dir)"
