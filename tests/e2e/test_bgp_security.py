"""BGP security on real BIRDs: what a peer may install, TCP MD5, TTL security.

Two calicnm hosts (nodes only, no dockerd: no container is needed) share an etcd on
the fabric; a third namespace on the fabric is an outside BGP router (``lab.bgp_peer``,
a BIRD of the test's own) added as a global peer.  It announces two prefixes outside
every pool and one /26 inside the default pool; the hosts' kernels get the /26 only.
Traffic only goes between these namespaces.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from lab.bgp_peer import BirdPeer, Neighbor, protocol_states
from lab.cluster import CalicnmHost, wait_until
from lab.etcd import FABRIC_ETCD_URL, fabric_etcd
from lab.fabric import Fabric
from lab.netns import Netns
from lab.procs import pids_with_arg, run_command

ROUTER_AS = 65000
HOST_AS = 64511
OUTSIDE = ["10.99.0.0/24", "10.99.1.0/32"]
IN_POOL = "192.168.250.0/26"  # a block-sized prefix of the default pool 192.168.0.0/16
SECRET = "s3cret"


@dataclass
class Lab:
    fabric: Fabric
    hosts: list[CalicnmHost]
    router: BirdPeer

    def host_protocols(self, host: CalicnmHost) -> dict[str, str]:
        got = run_command(
            ["birdc", "-s", str(host.state_dir / "bird.ctl"), "show", "protocols"],
            check=False,
            timeout=10,
        )
        return protocol_states(got.stdout) if got.returncode == 0 else {}

    def session(self, host: CalicnmHost, kind: str, ip: str) -> str:
        return self.host_protocols(host).get(f"{kind}_{ip.replace('.', '_')}", "")

    def to_router(self, host: CalicnmHost) -> str:
        return self.session(host, "Global", self.router.address)

    def mesh_up(self, host: CalicnmHost) -> bool:
        others = [h.address for h in self.hosts if h is not host]
        return all("Established" in self.session(host, "Mesh", ip) for ip in others)

    def configured(self, host: CalicnmHost, text: str) -> bool:
        try:
            return text in (host.state_dir / "bird.conf").read_text()
        except OSError:
            return False


def bird_routes(host: CalicnmHost) -> list[str]:
    return host.netns.run(["ip", "-4", "route", "show", "proto", "bird"]).stdout.splitlines()


def has_route(host: CalicnmHost, prefix: str) -> bool:
    bare = prefix.removesuffix("/32")
    return any(line.split()[0] in (prefix, bare) for line in bird_routes(host))


def never(check: Callable[[], object], seconds: float, what: str) -> None:
    """``check()`` stays falsy for ``seconds`` (polled every 0.5 s)."""
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        got = check()
        assert not got, f"{what} within {seconds}s: {got!r}"
        time.sleep(0.5)


def our_namespaces(names: list[str]) -> list[str]:
    return [n for n in names if Netns(n).exists()]


@pytest.fixture(scope="module")
def lab(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Lab]:
    if os.geteuid() != 0:
        pytest.skip("end-to-end tests need root")
    for tool in ("bird", "birdc", "etcd", "iptables"):
        if shutil.which(tool) is None:
            pytest.fail(f"{tool} is not installed; run 'make test', which installs it")
    workdir: Path = tmp_path_factory.mktemp("bgpsec")
    names: list[str] = []
    with contextlib.ExitStack() as stack:
        fabric = stack.enter_context(Fabric())
        names.append(fabric.netns.name)
        stack.callback(fabric_etcd(fabric, workdir).stop)
        hosts = []
        for i in (1, 2):
            att = fabric.add_host()
            names.append(att.host.name)
            host = CalicnmHost(
                att.host,
                att.address,
                workdir / f"host{i}",
                f"host{i}",
                etcd_endpoints=FABRIC_ETCD_URL,
            )
            stack.callback(host.close)
            host.dockerd.prepare()  # the directory of the plugin socket; dockerd is not started
            host.start_node()
            hosts.append(host)
        att = fabric.add_host()
        names.append(att.host.name)
        router = BirdPeer(
            att.host,
            att.address,
            ROUTER_AS,
            workdir / "router",
            [Neighbor(h.address, HOST_AS) for h in hosts],
            [*OUTSIDE, IN_POOL],
        )
        stack.enter_context(router)
        peer_add = ["bgp", "peer", "add", router.address, "as", str(ROUTER_AS)]
        wait_until(  # retried: the first etcd writes of a fresh etcd can exceed the CLI's 3 s
            lambda: hosts[0].calicnm(*peer_add, check=False).returncode == 0,
            30,
            "the router added as a global peer",
            interval=1,
        )
        yield Lab(fabric, hosts, router)
    # Torn down: no namespace and no process of this module is left.
    assert our_namespaces(names) == []
    assert pids_with_arg(str(workdir)) == []


def test_only_blocks_inside_routed_pools_reach_the_kernel(lab: Lab) -> None:
    for host in lab.hosts:
        wait_until(
            lambda h=host: "Established" in lab.to_router(h), 30, f"{host.hostname} <-> router"
        )
        wait_until(lambda h=host: has_route(h, IN_POOL), 20, f"{IN_POOL} on {host.hostname}")
        routes = bird_routes(host)
        assert any(r.startswith(f"{IN_POOL} via {lab.router.address} ") for r in routes), routes
        for prefix in OUTSIDE:
            assert not has_route(host, prefix), f"{prefix} installed on {host.hostname}"
        assert not [r for r in routes if r.startswith("10.99.")], routes
    # The router did send them: BIRD counted them as filtered on import.
    stats = run_command(
        [
            "birdc",
            "-s",
            str(lab.hosts[0].state_dir / "bird.ctl"),
            "show",
            "protocols",
            "all",
            "Global_" + lab.router.address.replace(".", "_"),
        ],
        timeout=10,
    ).stdout
    import_line = next(line for line in stats.splitlines() if "Import updates:" in line)
    received, _rejected, filtered = (int(x) for x in import_line.split()[2:5])
    assert received >= 3 and filtered >= 2, import_line


def test_password_keeps_a_router_without_it_out(lab: Lab) -> None:
    a, b = lab.hosts
    router = lab.router
    wait_until(lambda: "Established" in lab.to_router(a), 30, "a <-> router before")
    try:
        said = a.calicnm("bgp", "password", SECRET).stdout
        assert SECRET not in said
        assert a.calicnm("bgp", "password").stdout.strip() == "set"
        for host in (a, b):
            wait_until(
                lambda h=host: lab.configured(h, f'password "{SECRET}";'),
                20,
                f"the password in {host.hostname}'s bird.conf",
            )
        wait_until(lambda: "Established" not in lab.to_router(a), 15, "a's router session to drop")
        for host in (a, b):
            wait_until(lambda h=host: lab.mesh_up(h), 30, f"mesh with MD5 on {host.hostname}")
        never(
            lambda: "Established" in lab.to_router(a) and lab.to_router(a),
            15,
            "a router without the password reached Established",
        )
        assert lab.mesh_up(a) and lab.mesh_up(b)
        router.reconfigure(password=SECRET, ttl_security=False)
        for host in (a, b):
            wait_until(
                lambda h=host: "Established" in lab.to_router(h),
                30,
                f"{host.hostname} <-> router with the password",
            )
        wait_until(lambda: has_route(a, IN_POOL), 20, f"{IN_POOL} back on a")
        assert not has_route(a, OUTSIDE[0])
    finally:
        a.calicnm("bgp", "password", "--clear", check=False)
        router.reconfigure(password=None, ttl_security=False)
    assert a.calicnm("bgp", "password").stdout.strip() == "not set"
    for host in (a, b):
        wait_until(lambda h=host: not lab.configured(h, "password"), 20, "the password to go")
        wait_until(lambda h=host: lab.mesh_up(h), 30, f"mesh without MD5 on {host.hostname}")
        wait_until(
            lambda h=host: "Established" in lab.to_router(h), 30, f"{host.hostname} <-> router"
        )


def test_ttl_security_mesh_is_direct_and_only_a_router_with_it_gets_in(lab: Lab) -> None:
    a, b = lab.hosts
    router = lab.router
    wait_until(lambda: "Established" in lab.to_router(a), 30, "a <-> router before")
    try:
        a.calicnm("bgp", "ttl-security", "on")
        assert a.calicnm("bgp", "ttl-security").stdout.strip() == "on"
        for host in (a, b):
            wait_until(
                lambda h=host: lab.configured(h, "  direct;\n  ttl security on;"),
                20,
                f"TTL security in {host.hostname}'s bird.conf",
            )
        wait_until(lambda: "Established" not in lab.to_router(a), 15, "a's router session to drop")
        # Between calicnm hosts, direct sessions with GTSM at both ends come up.
        for host in (a, b):
            wait_until(lambda h=host: lab.mesh_up(h), 30, f"mesh with GTSM on {host.hostname}")
        never(
            lambda: "Established" in lab.to_router(a) and lab.to_router(a),
            10,
            "a router sending TTL 1 reached Established",
        )
        assert lab.mesh_up(a) and lab.mesh_up(b)

        # The order that brings a router in at once: the router first, then the hosts
        # (their reconfiguration restarts their sessions; the other way round a host's
        # session waits out BIRD's error wait time, 60 s or more, after its failures).
        a.calicnm("bgp", "ttl-security", "off")
        for host in (a, b):
            wait_until(
                lambda h=host: "Established" in lab.to_router(h), 30, f"{host.hostname} <-> router"
            )
        router.reconfigure(password=None, ttl_security=True)
        a.calicnm("bgp", "ttl-security", "on")
        for host in (a, b):
            wait_until(
                lambda h=host: lab.configured(h, "ttl security on;"), 20, "TTL security again"
            )
            wait_until(
                lambda h=host: "Established" in lab.to_router(h) and lab.mesh_up(h),
                30,
                f"{host.hostname} <-> router, both with GTSM",
            )
        wait_until(lambda: has_route(a, IN_POOL), 20, f"{IN_POOL} on a")
    finally:
        router.reconfigure(password=None, ttl_security=False)
        a.calicnm("bgp", "ttl-security", "off", check=False)
    for host in (a, b):
        wait_until(lambda h=host: lab.mesh_up(h), 30, f"multihop mesh on {host.hostname}")
        wait_until(
            lambda h=host: "Established" in lab.to_router(h), 30, f"{host.hostname} <-> router"
        )
