"""What the cases are built from: namespaces, a 2-host calicnm cluster, containers, and the
qperf servers, all registered on one ``contextlib.ExitStack`` that tears them down."""

from __future__ import annotations

import contextlib
from collections.abc import Sequence
from pathlib import Path

from bench.dataplane.places import Place
from bench.dataplane.qperf import QPERF_PORT
from bench.dataplane.settings import log
from lab.cluster import CalicnmHost, Cluster
from lab.images import DEFAULT_IMAGE
from lab.netns import Netns
from lab.procs import Process

__all__ = ["VXLAN_POOL", "Testbed", "host_place"]

VXLAN_POOL = "172.30.0.0/16"
"""calicnm's encapsulated pool, as in tests/e2e/test_multi_host.py."""


class Testbed:
    """What the cases are built from.  Everything is registered on ``stack``, which tears
    it down in reverse order: qperf servers, then namespaces, then the cluster."""

    def __init__(self, stack: contextlib.ExitStack, workdir: Path) -> None:
        self.stack = stack
        self.workdir = workdir
        self._cluster: Cluster | None = None
        self._cluster_error: Exception | None = None
        self._networks: set[tuple[str, str]] = set()
        self._vxlan_pool = False

    def netns(self) -> Netns:
        """A fresh namespace (lo up), deleted at teardown."""
        return self.stack.enter_context(Netns())

    @property
    def cluster(self) -> Cluster:
        """Three emulated calicnm hosts, started on first use (once; a failure is sticky)."""
        if self._cluster_error is not None:
            raise RuntimeError(f"the cluster did not start: {self._cluster_error}")
        if self._cluster is None:
            log("starting a 3-host cluster (fabric, etcd, 3 x calicnm node + dockerd)")
            cluster = Cluster(
                self.workdir / "cluster",
                3,
                node_settings="product",
                host_env=[{}, {}, {"CALICNM_DATAPATH": "iptables"}],
            )
            self.stack.callback(cluster.close)
            try:
                self._cluster = cluster.start()
            except Exception as exc:
                self._cluster_error = exc
                raise
        return self._cluster

    @property
    def has_cluster(self) -> bool:
        """Whether the cluster was started (and so can be asked about)."""
        return self._cluster is not None

    def hosts(self) -> tuple[CalicnmHost, CalicnmHost]:
        """Hosts A and B, with the product's defaults (the fast path where it loads)."""
        a, b, _ = self.cluster.hosts
        return a, b

    def iptables_host(self) -> CalicnmHost:
        """Host C, whose node runs with ``CALICNM_DATAPATH=iptables``."""
        return self.cluster.hosts[2]

    def calicnm_network(self, host: CalicnmHost, name: str, *args: str) -> None:
        """A calicnm network ``name`` on ``host`` (created once)."""
        if (host.hostname, name) not in self._networks:
            host.create_network(name, *args)
            self._networks.add((host.hostname, name))

    def vxlan_pool(self) -> None:
        """calicnm's VXLAN pool (added once, through host A's CLI)."""
        if not self._vxlan_pool:
            self.hosts()[0].calicnm("pool", "add", VXLAN_POOL, "--vxlan")
            self._vxlan_pool = True

    def container(self, host: CalicnmHost, name: str, network: str) -> tuple[Place, str]:
        """A sleeping busybox container on ``network``: its namespace and address."""
        host.docker("run", "-d", "--net", network, "--name", name, DEFAULT_IMAGE, "sleep", "86400")
        pid = host.docker("inspect", "-f", "{{.State.Pid}}", name)
        return Place.of_pid(pid, f"{host.hostname}/{name}"), host.ip_of(name, network)

    def serve(self, key: str, server: Place, prefix: Sequence[str] = ()) -> None:
        """A qperf server in ``server`` (run under ``prefix``), stopped at teardown."""
        proc = Process(
            server.argv([*prefix, "qperf", "--listen_port", str(QPERF_PORT)]),
            self.workdir / f"qperf-{key}.log",
            name=f"qperf-server[{key}]",
        )
        self.stack.callback(proc.stop)
        proc.start()


def host_place(host: CalicnmHost) -> Place:
    return Place.of(host.netns, host.hostname)
