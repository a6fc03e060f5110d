"""Several emulated hosts sharing one etcd: container routes by BGP (BIRD).

Each host is a network namespace on the fabric with its own dockerd and
calicnm node; the etcd runs in the fabric namespace.  Traffic only goes
between these namespaces and their containers.
"""

from __future__ import annotations

import re
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.cluster import CalicnmHost, Cluster, cluster, wait_until
from tests.harness import DEFAULT_IMAGE as IMG


@pytest.fixture(scope="module")
def three(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Cluster]:
    workdir: Path = tmp_path_factory.mktemp("cluster")
    with cluster(workdir, 3) as c:
        yield c


def serve(host: CalicnmHost, name: str, network: str) -> str:
    host.docker("run", "-d", "--net", network, "--name", name, IMG, "sh", "-c",
                "echo hello > /www/index.html && exec httpd -f -v -p 80 -h /www")
    return host.ip_of(name, network)


def fetch_ok(host: CalicnmHost, network: str, ip: str) -> bool:
    return host.fetch(network, f"http://{ip}/index.html").stdout.strip() == "hello"


def bgp_rows(host: CalicnmHost) -> list[list[str]]:
    out = host.calicnm("status", check=False).stdout
    rows = []
    for line in out.splitlines():
        cells = [c.strip() for c in line.strip("|").split("|")]
        if len(cells) == 5 and re.match(r"\d+\.\d+\.\d+\.\d+", cells[0]):
            rows.append(cells)
    return rows


def test_mesh_routes_blocks_between_hosts(three: Cluster) -> None:
    a, b, c = three.hosts
    for host in (a, b, c):
        host.create_network("dataman")
    web = serve(a, "webA", "dataman")
    # Sessions to both other hosts are Established, typed as mesh peers.
    for host in (a, b, c):
        rows = wait_until(lambda h=host: len([r for r in bgp_rows(h) if r[4] == "Established"])
                          == 2 and bgp_rows(h), 30, f"mesh on {host.hostname}")
        assert {r[1] for r in rows} == {"node-to-node mesh"}
    # B reaches A's container; the receiver sees B's container address (no NAT).
    assert wait_until(lambda: fetch_ok(b, "dataman", web), 20, "B -> A over BGP routes")
    log = a.dockerd.docker("logs", "webA").stderr
    assert re.search(r"\[::ffff:(\d+\.\d+\.\d+\.\d+)\]", log)
    client_ip = re.search(r"\[::ffff:(\d+\.\d+\.\d+\.\d+)\]", log).group(1)
    assert client_ip not in (a.address, b.address), "the server saw the container, not a host"
    # A's block is one route on B, via A's address, learnt from BIRD: no /32s.
    block = next(line for line in b.routes() if "proto bird" in line and a.address in line)
    assert re.match(r"\d+\.\d+\.\d+\.\d+/26 via " + re.escape(a.address), block)
    assert not [r for r in b.routes() if r.startswith(web + " ")]
    # On A the block is a local blackhole; the container's /32 is more specific.
    assert any(r.startswith("blackhole ") and "proto bird" in r for r in a.routes())


def test_node_show_lists_hosts_with_as(three: Cluster) -> None:
    out = three.hosts[0].calicnm("node", "show").stdout
    for host in three.hosts:
        assert host.hostname in out and host.address in out
    assert "64511 (inherited)" in out
