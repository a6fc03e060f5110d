"""A host's liveness as operators see it (``calicnm status``, ``calicnm node
show``): alive while its node runs, dead at once after a clean stop, dead
within the lease's TTL after ``kill -9``, alive again after a restart."""

from __future__ import annotations

import json
import signal
from pathlib import Path

from lab.cluster import CalicnmHost, cluster, wait_until

TTL = "3"
"""The node's liveness TTL in the part of the test that kills it."""


def alive(host: CalicnmHost) -> bool:
    rows = json.loads(host.calicnm("node", "show", "--json").stdout)
    (row,) = [r for r in rows if r["name"] == host.hostname]
    return bool(row["alive"])


def status_hosts(host: CalicnmHost) -> dict[str, object]:
    out = host.calicnm("status", "--json", check=False).stdout
    hosts: dict[str, object] = json.loads(out)["hosts"]
    return hosts


def test_liveness_follows_the_node(tmp_path: Path) -> None:
    with cluster(tmp_path, 1) as c:
        host = c.hosts[0]
        assert alive(host)
        assert status_hosts(host) == {"registered": 1, "alive": ["host1"], "dead": []}
        text = host.calicnm("status", check=False).stdout
        assert "hosts: 1 registered, 1 alive" in text
        table = host.calicnm("node", "show").stdout
        assert "Alive" in table and "yes" in table

        # A clean stop revokes the lease: dead at once, no TTL to wait.
        assert host.stop_node() == 0
        assert not alive(host)
        assert status_hosts(host)["dead"] == ["host1"]
        assert "NOT alive: host1" in host.calicnm("status", check=False).stdout

        # A short TTL, then kill -9: the record outlives the node by the TTL at most.
        host.extra_env["CALICNM_LIVENESS_TTL"] = TTL
        host.start_node()
        wait_until(lambda: alive(host), 30, "alive after a start")
        host.stop_node(sig=signal.SIGKILL)
        wait_until(lambda: not alive(host), 30, f"dead within the {TTL}s TTL after kill -9")

        # Restarted: alive again (a new lease; the old one is gone).
        host.start_node()
        wait_until(lambda: alive(host), 30, "alive after a restart")
        assert status_hosts(host) == {"registered": 1, "alive": ["host1"], "dead": []}
        assert host.stop_node() == 0
        assert not alive(host)
