"""Several emulated hosts sharing one etcd: container routes by BGP (BIRD).

Each host is a network namespace on the fabric with its own dockerd and
calicnm node; the etcd runs in the fabric namespace.  Traffic only goes
between these namespaces and their containers.
"""

from __future__ import annotations

import re
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from calicnm.profiles import RAW_OUTPUT, RAW_PREROUTING
from lab.cluster import CalicnmHost, Cluster, cluster, wait_until
from lab.images import DEFAULT_IMAGE as IMG
from lab.paths import CALICNM
from tests.e2e.helpers import fetch_from, start_web


@pytest.fixture(scope="module")
def three(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Cluster]:
    workdir: Path = tmp_path_factory.mktemp("cluster")
    with cluster(workdir, 3) as c:
        yield c


def serve(host: CalicnmHost, name: str, network: str) -> str:
    return start_web(host, name, network)


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
        rows = wait_until(
            lambda h=host: (
                len([r for r in bgp_rows(h) if r[4] == "Established"]) == 2 and bgp_rows(h)
            ),
            30,
            f"mesh on {host.hostname}",
        )
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


def test_profiles_work_across_hosts(three: Cluster) -> None:
    a, b, _c = three.hosts
    web = a.ip_of("webA", "dataman")
    b.create_network("billing")
    assert fetch_ok(b, "dataman", web), "dataman on B reaches dataman on A"
    assert not fetch_ok(b, "billing", web), "billing on B is denied by dataman's profile on A"
    b.docker("network", "rm", "billing")


def test_a_restart_keeps_routes_and_withdraw_on_exit_withdraws_them(three: Cluster) -> None:
    a, _b, c = three.hosts
    c_web = serve(c, "webC", "dataman")
    block_routes = lambda: [r for r in a.routes() if "proto bird" in r and c.address in r]  # noqa: E731
    wait_until(block_routes, 20, "C's block on A")
    assert wait_until(lambda: fetch_ok(a, "dataman", c_web), 20, "A -> C")
    # A clean stop (a restart, an upgrade) keeps BIRD up: A keeps C's routes,
    # and a client that C's policy already knows keeps reaching C's container.
    a.docker("run", "-d", "--net", "dataman", "--name", "clientA", IMG, "sleep", "1000")
    assert wait_until(lambda: fetch_from(a, "clientA", c_web) == "hello", 20, "client -> C")
    assert c.stop_node() == 0
    time.sleep(3)
    assert block_routes(), "a node stop withdrew its routes"
    assert fetch_from(a, "clientA", c_web) == "hello"
    # Leaving for good (--withdraw-on-exit) withdraws them at once.
    c.extra_env["CALICNM_WITHDRAW_ON_EXIT"] = "true"
    c.start_node()
    assert c.stop_node() == 0
    wait_until(lambda: not block_routes(), 20, "C's routes withdrawn from A")
    assert not fetch_ok(a, "dataman", c_web)
    del c.extra_env["CALICNM_WITHDRAW_ON_EXIT"]
    c.start_node()
    wait_until(block_routes, 30, "C's routes back on A")
    assert wait_until(lambda: fetch_ok(a, "dataman", c_web), 20, "A -> C again")
    c.docker("rm", "-f", "webC")
    a.docker("rm", "-f", "clientA")


def test_route_reflector_topology(three: Cluster, tmp_path: Path) -> None:
    a, b, c = three.hosts
    web = a.ip_of("webA", "dataman")
    att = three.fabric.add_host()
    rr = att.host.process(
        [
            CALICNM,
            "--etcd-endpoints",
            three.etcd_url,
            "route-reflector",
            "run",
            "--ip",
            att.address,
            "--state-dir",
            str(tmp_path / "rr"),
        ],
        tmp_path / "rr.log",
    ).start()
    try:
        a.calicnm("bgp", "node-mesh", "off")
        assert a.calicnm("bgp", "node-mesh").stdout.strip() == "off"
        a.calicnm("bgp", "peer", "add", att.address, "as", "64511")
        for host in (a, b, c):
            rows = wait_until(
                lambda h=host: [r for r in bgp_rows(h) if r[4] == "Established"],
                30,
                f"{host.hostname} peering with the reflector",
            )
            assert [(r[0], r[1]) for r in rows] == [(att.address, "global")]
        assert wait_until(lambda: fetch_ok(c, "dataman", web), 30, "C -> A through the RR")
        assert "Global IPv4 BGP Peer" in a.calicnm("bgp", "peer", "show").stdout
    finally:
        a.calicnm("bgp", "peer", "remove", att.address, check=False)
        a.calicnm("bgp", "node-mesh", "on", check=False)
        rr.stop()
    for host in (a, b, c):
        wait_until(
            lambda h=host: len([r for r in bgp_rows(h) if r[4] == "Established"]) == 2,
            30,
            f"mesh back on {host.hostname}",
        )


def test_node_bgp_peer_and_default_as(three: Cluster) -> None:
    a = three.hosts[0]
    a.calicnm("node", "bgp", "peer", "add", "198.18.0.250", "as", "65001")
    assert "198.18.0.250 as 65001" in a.calicnm("node", "show").stdout
    rows = wait_until(
        lambda: [r for r in bgp_rows(a) if r[0] == "198.18.0.250"],
        20,
        "the node-specific peer in status",
    )
    assert rows[0][1] == "node specific"
    a.calicnm("node", "bgp", "peer", "remove", "198.18.0.250")
    assert a.calicnm("bgp", "default-node-as").stdout.strip() == "64511"
    bad = a.calicnm("bgp", "default-node-as", "0", check=False)
    assert bad.returncode == 1 and "outside" in bad.stderr


def test_vxlan_pool_carries_traffic_without_bgp_routes(three: Cluster) -> None:
    a, b, _c = three.hosts
    a.calicnm("pool", "add", "172.30.0.0/16", "--vxlan")
    try:
        for host in (a, b):
            host.create_network("vx", "--subnet", "172.30.0.0/16")
        a.docker(
            "run",
            "-d",
            "--net",
            "vx",
            "--name",
            "bigA",
            IMG,
            "sh",
            "-c",
            "busybox dd if=/dev/zero of=/www/big bs=1024 count=1024 2>/dev/null && "
            "exec httpd -f -v -p 80 -h /www",
        )
        ip = a.ip_of("bigA", "vx")
        assert "mtu 1450" in a.docker("exec", "bigA", "ip", "link", "show", "eth0")
        route = wait_until(
            lambda: [r for r in b.routes() if "dev vxlan.calicnm" in r], 20, "A's vxlan block on B"
        )
        assert route[0].startswith("172.30.") and f"via {a.address}" in route[0]
        assert not [r for r in b.routes() if r.startswith("172.30.") and "proto bird" in r]
        # A 1 MB download across the tunnel (MTU leaves room for the header).
        got = b.docker_run(
            "run",
            "--rm",
            "--net",
            "vx",
            IMG,
            "sh",
            "-c",
            f"busybox timeout 20 wget -q -O /tmp/f http://{ip}/big && busybox wc -c < /tmp/f",
        )
        assert got.stdout.strip() == "1048576", got.stderr
        log = a.dockerd.docker("logs", "bigA").stderr
        assert "[::ffff:172.30." in log, "the receiver saw a container address, not NAT"
        # The outer packets were not tracked: both hosts' NOTRACK rules counted them.
        for host in (a, b):
            for chain in (RAW_PREROUTING, RAW_OUTPUT):
                listing = host.netns.run(
                    ["iptables", "-w", "-t", "raw", "-L", chain, "-n", "-v", "-x"]
                ).stdout
                counts = [int(line.split()[0]) for line in listing.splitlines() if "CT" in line]
                assert counts and counts[0] > 0, (host.hostname, chain, listing)
    finally:
        a.docker("rm", "-f", "bigA", check=False)
        for host in (a, b):
            host.docker("network", "rm", "vx", check=False)
        a.calicnm("pool", "remove", "172.30.0.0/16", check=False)
    wait_until(lambda: not b.links("vxlan.calicnm"), 20, "the VXLAN device to go")


def test_nat_outgoing_masquerades_only_outside_every_pool(three: Cluster, tmp_path: Path) -> None:
    a = three.hosts[0]
    outside = three.fabric.add_host()
    www = tmp_path / "www"
    www.mkdir()
    (www / "index.html").write_text("hello\n")
    server = outside.host.process(
        ["busybox", "httpd", "-f", "-v", "-p", "80", "-h", str(www)], tmp_path / "outside.log"
    ).start()
    a.calicnm("pool", "add", "172.31.0.0/16", "--nat-outgoing")
    try:
        a.create_network("natnet", "--subnet", "172.31.0.0/16")
        a.docker("run", "-d", "--net", "natnet", "--name", "natc", IMG, "sleep", "1000")
        nat_ip = a.ip_of("natc", "natnet")
        got = a.docker_run(
            "exec",
            "natc",
            "sh",
            "-c",
            f"busybox timeout 5 wget -q -O /tmp/f http://{outside.address}/ && cat /tmp/f",
        )
        assert got.stdout.strip() == "hello", got.stderr
        seen = (tmp_path / "outside.log").read_text()
        assert f"[::ffff:{a.address}]" in seen and nat_ip not in seen
        # To another pool (dataman's, on this host): not masqueraded.
        a.docker("network", "connect", "dataman", "natc")
        web = a.ip_of("webA", "dataman")
        a.calicnm(
            "profile", "dataman", "rule", "add", "inbound", "allow", "from", "cidr", "172.31.0.0/16"
        )
        try:
            ok = wait_until(
                lambda: (
                    a.docker_run(
                        "exec",
                        "natc",
                        "sh",
                        "-c",
                        f"busybox timeout 3 wget -q -O /tmp/g http://{web}/index.html"
                        " && cat /tmp/g",
                    ).stdout.strip()
                    == "hello"
                ),
                10,
                "natc -> webA",
            )
            assert ok
        finally:
            a.calicnm(
                "profile",
                "dataman",
                "rule",
                "remove",
                "inbound",
                "allow",
                "from",
                "cidr",
                "172.31.0.0/16",
                check=False,
            )
        log = a.dockerd.docker("logs", "webA").stderr
        assert "[::ffff:172.31." in log or "[::ffff:192.168." in log
        assert f"[::ffff:{a.address}]" not in log
    finally:
        a.docker("rm", "-f", "natc", check=False)
        a.docker("network", "rm", "natnet", check=False)
        a.calicnm("pool", "remove", "172.31.0.0/16", check=False)
        server.stop()


def test_ipip_is_refused_clearly_on_this_kernel(three: Cluster) -> None:
    a, b, _c = three.hosts
    refused = a.calicnm("pool", "add", "10.77.0.0/16", "--ipip", check=False)
    assert refused.returncode == 1
    assert "no IPIP support" in refused.stderr and "--vxlan" in refused.stderr
    # A pool another machine added anyway: the node reports it, and keeps serving.
    from calicnm.model import IPv4Network, Pool

    pool = Pool(IPv4Network("10.77.0.0/16"), ipip=True)
    b.netns.run(
        [
            "etcdctl",
            "--endpoints",
            three.etcd_url,
            "put",
            "/calicnm/v1/ipam/v4/pools/10.77.0.0-16",
            pool.to_json(),
        ],
        env={**__import__("os").environ, "ETCDCTL_API": "3"},
    )
    try:
        status = wait_until(
            lambda: "PROBLEM" in (out := b.calicnm("status", check=False).stdout) and out,
            20,
            "the IPIP problem in status",
        )
        assert "10.77.0.0/16 use ipip, which this kernel does not have" in status
    finally:
        b.calicnm("pool", "remove", "10.77.0.0/16")
    wait_until(
        lambda: "PROBLEM" not in b.calicnm("status", check=False).stdout, 20, "the problem to clear"
    )


def test_node_remove_cleans_a_dead_host(three: Cluster) -> None:
    a, _b, c = three.hosts
    c.docker("rm", "-f", *c.docker("ps", "-aq").split(), check=False)
    assert c.stop_node() == 0
    keys = a.etcd_keys()
    claim = f"/calicnm/v1/host-addresses/{c.address}"
    assert "/calicnm/v1/hosts/host3/meta" in keys and keys[claim] == "host3"
    assert "/calicnm/v1/liveness/host3" not in keys  # a clean stop revoked it
    removed = a.calicnm("--hostname", "host3", "node", "remove")
    assert "Node configuration removed: host host3" in removed.stdout
    keys = a.etcd_keys()
    assert not [k for k in keys if "/host3/" in k]
    assert claim not in keys
    assert "host3" not in a.calicnm("node", "show").stdout
    missing = a.calicnm("--hostname", "host3", "node", "remove", check=False)
    assert missing.returncode == 1 and "not registered" in missing.stderr
