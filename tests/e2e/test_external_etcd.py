"""A node that uses an existing etcd cluster (ETCD_ENDPOINTS) instead of its own.

The etcd runs in the fabric namespace at 198.18.0.1, as a datacenter etcd
would run on its own machine; the host reaches it over the underlay.  The
first endpoint listed is dead, so the node must fail over to the second.
"""

from __future__ import annotations

from pathlib import Path

from lab.cluster import CalicnmHost, wait_until
from lab.etcd import fabric_etcd
from lab.fabric import FABRIC_ADDRESS, Fabric
from lab.images import DEFAULT_IMAGE
from tests.e2e.helpers import assert_nothing_left


def test_node_with_etcd_endpoints(tmp_path: Path) -> None:
    with Fabric() as fabric:
        url = f"http://{FABRIC_ADDRESS}:2379"
        etcd = fabric_etcd(fabric, tmp_path)
        try:
            att = fabric.add_host()
            host = CalicnmHost(
                att.host,
                att.address,
                tmp_path / "h",
                "ext1",
                etcd_endpoints=f"http://{FABRIC_ADDRESS}:2999,{url}",
            )
            try:
                host.start()
                assert not (host.state_dir / "etcd").exists(), "no embedded etcd was started"
                # Plain http to an etcd off the host: the node says what that risks.
                log = (host.workdir / "node.log").read_text()
                assert f"etcd endpoint {url} is not on this host and not TLS" in log
                host.create_network(
                    "ext", "--subnet", "192.168.50.0/26", "--gateway", "192.168.50.1"
                )
                # --gateway: the address is held, never given to a container.
                info = host.calicnm("ipam", "info", "192.168.50.1").stdout
                assert "Assigned: gateway" in info
                host.docker(
                    "run", "-d", "--net", "ext", "--name", "c1", DEFAULT_IMAGE, "sleep", "1000"
                )
                assert host.ip_of("c1", "ext") not in ("192.168.50.0", "192.168.50.1")
                keys = host.etcd_keys()
                assert "/calicnm/v1/hosts/ext1/meta" in keys
                assert f'"ip":"{att.address}"' in keys["/calicnm/v1/hosts/ext1/meta"]
                wait_until(
                    lambda: "ext" in host.calicnm("endpoint", "show").stdout, 15, "network name"
                )
                host.docker("rm", "-f", "c1")
                host.docker("network", "rm", "ext")
                assert "is free" in host.calicnm("ipam", "info", "192.168.50.1").stdout
                assert_nothing_left(host)
            finally:
                host.close()
        finally:
            etcd.stop()
