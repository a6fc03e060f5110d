#!/bin/sh
# Entry point of calicnm's managed (v2) plugin; see plugin.json and README,
# "The managed plugin".  Docker runs it in the host's network namespace but in
# a mount namespace of its own whose /proc/sys is read-only, and with a /run of
# its own.  Before the node starts, this puts the host's /proc/sys (mounted at
# /host/proc) over /proc/sys, so the node can set per-interface sysctls, and
# points /run/xtables.lock at the host's, so iptables calls by the node and by
# dockerd never interleave.  Both changes live only in the plugin's mount
# namespace.  tini is PID 1: it forwards Docker's SIGTERM to the node and
# reaps whatever is orphaned.
set -eu
mount --bind /host/proc/sys /proc/sys
ln -sf /host/run/xtables.lock /run/xtables.lock
exec tini -s -- calicnm node run "$@"
