"""An idle cluster writes nothing to etcd.

Every etcd revision is an event for every host's agent, so writes at idle cost
hosts x hosts.  Once containers run and the nodes have settled, three hosts left alone
for longer than every node's periodic work (host record check, ownership sweep, agent
resync, cluster-network sync) must leave etcd's revision where it was.  On failure the
message names the keys that changed.
"""

from __future__ import annotations

import base64
import json
import time
from pathlib import Path

from lab.cluster import CalicnmHost, Cluster
from tests.e2e.helpers import etcdctl, start_web

IDLE_SECONDS = 25
"""Longer than twice the longest periodic task here (the host record check, 10 s)."""


def revision(host: CalicnmHost) -> int:
    out = etcdctl(host, "endpoint", "status", "-w", "json").stdout
    return int(json.loads(out)[0]["Status"]["header"]["revision"])


def changed_since(host: CalicnmHost, rev: int) -> list[str]:
    out = etcdctl(host, "get", "--prefix", "/", "-w", "json").stdout
    return sorted(
        base64.b64decode(kv["key"]).decode()
        for kv in json.loads(out).get("kvs", [])
        if int(kv["mod_revision"]) > rev
    )


def test_an_idle_cluster_makes_no_etcd_revision(tmp_path: Path) -> None:
    with Cluster(tmp_path, 3) as cluster:
        host1, host2, _host3 = cluster.hosts
        host1.calicnm("network", "create", "idle")
        host1.calicnm("network", "create", "idle2", "--subnet", "192.168.210.0/24")
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline and not all(
            "idle" in h.docker("network", "ls", "--format", "{{.Name}}").split()
            for h in cluster.hosts
        ):
            time.sleep(0.5)
        start_web(host1, "w1", "idle")
        start_web(host2, "w2", "idle")
        time.sleep(12)  # every node's periodic work has run once since the last change

        before = revision(host1)
        time.sleep(IDLE_SECONDS)
        after = revision(host1)
        assert after == before, (
            f"{after - before} revision(s) at idle: {changed_since(host1, before)}"
        )
