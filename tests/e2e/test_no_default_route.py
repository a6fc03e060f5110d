"""A host without a default route: containers still reach their gateway
``169.254.1.1`` and each other.  Proxy ARP alone answers only for addresses the host
can route elsewhere; the node makes the gateways the host's own addresses
(``local 169.254.1.0/24 dev lo``), so the host answers ARP for them regardless."""

from __future__ import annotations

from pathlib import Path

from lab.cluster import CalicnmHost
from lab.fabric import Fabric
from lab.images import DEFAULT_IMAGE as IMG


def test_containers_reach_each_other_on_a_host_without_a_default_route(tmp_path: Path) -> None:
    with Fabric() as fabric:
        att = fabric.add_host()
        att.host.run(["ip", "route", "del", "default"])
        assert att.host.run(["ip", "route", "show", "default"]).stdout.strip() == ""
        with CalicnmHost(att.host, att.address, tmp_path, "host1") as host:
            assert (
                "local 169.254.1.0/24 dev lo"
                in host.netns.run(["ip", "route", "show", "table", "local"]).stdout
            )
            host.create_network("net")
            host.docker("run", "-d", "--name", "peer", "--net", "net", IMG, "sleep", "600")
            b_ip = host.ip_of("peer", "net")
            out = host.docker(
                "run",
                "--rm",
                "--net",
                "net",
                IMG,
                "sh",
                "-c",
                f"ping -c 2 -W 3 {b_ip} >/dev/null && ip neigh show 169.254.1.1",
            )
            assert "169.254.1.1" in out and ("REACHABLE" in out or "STALE" in out), out
