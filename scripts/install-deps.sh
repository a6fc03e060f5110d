#!/bin/sh
# Install the Debian packages calicnm and its tests need, only those missing.
# Safe to run repeatedly; needs root and access to Debian's package mirrors.
set -eu

PACKAGES="docker.io docker-compose etcd-server etcd-client iptables ipset iproute2 bird2 busybox-static util-linux procps qperf ethtool openssl debootstrap systemd-container nftables linux-perf clang llvm libbpf-dev bpftool"

missing=""
for pkg in $PACKAGES; do
    dpkg-query -W -f='${Status}' "$pkg" 2>/dev/null | grep -q "install ok installed" \
        || missing="$missing $pkg"
done
if ! python3 -c 'import ensurepip, venv' 2>/dev/null; then
    missing="$missing python3-venv"
fi

if [ -n "$missing" ]; then
    echo "installing:$missing"
    apt-get update -qq
    # No service starts from package scripts: the tests and 'make run' start
    # what they need themselves.
    DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends $missing >/dev/null
fi

# dockerd resolves a few tools by their legacy names.
command -v etcd >/dev/null || { echo "etcd did not install" >&2; exit 1; }
command -v dockerd >/dev/null || { echo "dockerd did not install" >&2; exit 1; }
