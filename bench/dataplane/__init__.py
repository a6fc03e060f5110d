"""Data-plane benchmark: qperf TCP bandwidth and latency of container networks.

Reruns the article's qperf comparison of container networks on this machine.  Everything
measured is built here and torn down at the end (even on failure): emulated hosts are
network namespaces on a fabric bridge (:mod:`lab`), each with the real calicnm
node and its own dockerd where a case involves them.  Traffic only flows between these
namespaces and containers.

Cases (one qperf server per case, the client in the other end's namespace):

- baselines: loopback, a bare veth pair, host to host over the emulated underlay;
- a hand-built copy of calicnm's same-host path (routing, proxy ARP, no iptables);
- calicnm: same host, across hosts routed (BGP), across hosts encapsulated (VXLAN pool);
- peers: Docker's bridge network, a VXLAN overlay built like Docker overlay/flannel, macvlan.

Measurements: ``qperf tcp_bw tcp_lat`` at 64 KiB messages, several repetitions taken
round-robin over the cases (so slow drift of the machine spreads over all cases instead of
biasing one), reported as median [min-max] and as a ratio to host-to-host from the same
run; then one message-size sweep (1 B .. 64 KiB, doubling) per case for the charts.
qperf's ``tcp_lat`` is one-way latency (half the round trip).  By default qperf's client
and server are pinned to one CPU (``--pin``): on a VM a wake-up across CPUs costs tens of
microseconds, far more than the differences between the paths; the report records it.

Usage (root, from the repository's root): .venv/bin/python -m bench.dataplane [--quick]
[--out DIR] [--reps N]
Writes DIR/dataplane.md, dataplane.json, bandwidth.png and latency.png (charts need the
``bench`` extra: ``pip install -e '.[bench]'``).  Exit status 1 means some case produced
no numbers (its error is in the report); a figure never fails the run.

Modules: :mod:`.settings` (how long and how often, progress log), :mod:`.places` (where
commands run, veth plumbing), :mod:`.testbed` (namespaces, the 2-host cluster, containers,
qperf servers), :mod:`.cases` (how each path under test is built), :mod:`.qperf` (running
and parsing qperf), :mod:`.measure` (the run: set-up, repetitions, sweeps), :mod:`.inventory`
(MTUs, offloads, sysctls, versions), :mod:`.units`, :mod:`.goals` (the goal table and its
verdicts), :mod:`.charts` and :mod:`.writeup` (dataplane.md and dataplane.json, with the
shared helpers of :mod:`bench.report`); ``__main__`` runs it all.
"""
