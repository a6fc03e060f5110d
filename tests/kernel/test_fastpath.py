"""The same-host fast path against the real kernel: the tc program built from
``calicnm/bpf/fastpath.bpf.c``, loaded, pinned and attached by ``host.fastpath``.

Two "containers" (namespaces) hang off veths that ``HostPlumbing`` wires exactly as the
plugin does, in the test's own namespace standing in for the host, whose FORWARD policy
is DROP: whatever gets through while the fast path is off, iptables let through.
"""

from __future__ import annotations

import ipaddress
import shutil
import subprocess
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest

from calicnm.endpoint import plan_link
from calicnm.host.fastpath import FastPath, unavailable
from calicnm.host.netlink import HostPlumbing, ensure_gateway_route
from calicnm.profiles import FastPathEntry
from lab.netns import Netns

pytestmark = pytest.mark.kernel

ENDS = (
    ("a" * 64, "ee:00:00:00:00:0a", "10.66.0.1"),
    ("b" * 64, "ee:00:00:00:00:0b", "10.66.0.2"),
)


def sh(*argv: str, check: bool = True) -> subprocess.CompletedProcess[str]:
    return subprocess.run(argv, check=check, capture_output=True, text=True, timeout=30)


@pytest.fixture
def pins() -> Iterator[Path]:
    problem = unavailable()
    if problem:
        pytest.fail(f"the fast path cannot run: {problem}")
    where = Path("/sys/fs/bpf") / f"calicnm-test-{uuid.uuid4().hex[:8]}"
    yield where
    shutil.rmtree(where, ignore_errors=True)


@pytest.fixture
def ends(netns: str) -> Iterator[list[tuple[Netns, str, str, str]]]:
    """[(namespace, host interface, container MAC, address)] for the two ends."""
    plumbing = HostPlumbing()
    made: list[tuple[Netns, str, str, str]] = []
    sh("sysctl", "-q", "-w", "net.ipv4.ip_forward=1")
    ensure_gateway_route()
    sh("iptables", "-w", "-P", "FORWARD", "DROP")
    try:
        for eid, mac, ip in ENDS:
            plan = plan_link(eid, mac, (ipaddress.IPv4Address(ip),))
            plumbing.create(plan)
            assert plumbing.ensure_routes(plan.host_if, (ip,), mac)
            end = Netns().create()
            made.append((end, plan.host_if, mac, ip))
            sh("ip", "link", "set", plan.peer_if, "netns", end.name)
            for cmd in (
                ["ip", "link", "set", plan.peer_if, "name", "eth0"],
                ["ip", "addr", "add", f"{ip}/32", "dev", "eth0"],
                ["ip", "link", "set", "eth0", "up"],
                ["ip", "route", "add", "169.254.1.1", "dev", "eth0", "scope", "link"],
                ["ip", "route", "add", "default", "via", "169.254.1.1", "dev", "eth0"],
            ):
                end.run(cmd)
        yield made
    finally:
        for end, *_ in made:
            end.delete()


def ping(src: Netns, address: str) -> bool:
    proc = src.run(["busybox", "ping", "-c", "2", "-W", "1", address], check=False, timeout=20)
    return proc.returncode == 0


def plan_of(ends: list[tuple[Netns, str, str, str]], group: int = 1) -> dict[str, FastPathEntry]:
    return {ip: FastPathEntry(iface, mac, group) for _end, iface, mac, ip in ends}


def test_open_pairs_go_straight_across_and_nothing_else_does(netns, ends, pins):
    (a, a_if, _, a_ip), (b, b_if, _, b_ip) = ends
    fast = FastPath(HostPlumbing(), pins)
    # With an empty plan the program is attached but passes everything to the
    # stack, where FORWARD's DROP decides.
    fast.apply({}, full=True)
    assert "name calicnm_fast " in sh("tc", "filter", "show", "dev", a_if, "ingress").stdout
    assert not ping(a, b_ip)

    plan = plan_of(ends)
    fast.withdraw(plan)
    assert fast.apply(plan, full=False) == 2
    assert ping(a, b_ip) and ping(b, a_ip)
    redirected, _passed = fast.stats()
    assert redirected >= 8, "echo requests and replies both ways went straight across"
    # The receiver sees a routed hop (TTL down by one) from its gateway's MAC.
    out = a.run(["busybox", "ping", "-c", "1", "-W", "1", b_ip]).stdout
    assert "ttl=63" in out

    # Different groups: not open to each other, so back to iptables (and its DROP).
    split = {b_ip: FastPathEntry(b_if, plan[b_ip].mac, 2), a_ip: plan[a_ip]}
    fast.withdraw(split)
    fast.apply(split, full=False)
    assert not ping(a, b_ip)

    # An address claimed by the wrong interface is never trusted as a source.
    liar = {a_ip: FastPathEntry(b_if, plan[a_ip].mac, 1), b_ip: plan[b_ip]}
    fast.withdraw(liar)
    fast.apply(liar, full=True)
    before = fast.stats()[0]
    assert not ping(a, b_ip)
    assert fast.stats()[0] == before


def test_a_restart_reuses_the_pins_and_a_full_apply_repairs_the_kernel(netns, ends, pins):
    (a, a_if, _, _), (_b, _, _, b_ip) = ends
    plan = plan_of(ends)
    first = FastPath(HostPlumbing(), pins)
    first.apply(plan, full=True)
    programs = sorted(p.name for p in pins.iterdir())

    again = FastPath(HostPlumbing(), pins)  # a restarted node, same object
    assert again.apply(plan, full=True) == 0, "map kept, nothing to write"
    assert sorted(p.name for p in pins.iterdir()) == programs
    assert ping(a, b_ip)

    # Drift: an outside tc command removes the filter; a full apply puts it back.
    sh("tc", "filter", "del", "dev", a_if, "ingress")
    again.apply(plan, full=True)
    assert "name calicnm_fast " in sh("tc", "filter", "show", "dev", a_if, "ingress").stdout

    again.remove()
    assert not pins.exists()
    assert "name calicnm_fast " not in sh("tc", "filter", "show", "dev", a_if, "ingress").stdout
    assert not ping(a, b_ip), "iptables decides again"
