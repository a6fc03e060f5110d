"""Docker's undo calls that never come: dockerd killed with -9, a simulated
reboot, and a dockerd that restarts while the node is down.

In each, every container's namespace dies with its veth, but the endpoint
records and addresses stay in etcd.  Whatever Docker does not clean up
itself, the node's ownership collector must, within one reconcile period
(plus its grace) of dockerd answering again; and ``--restart always``
containers come back reachable at their addresses.  While dockerd is down,
nothing Docker must judge is removed.
"""

from __future__ import annotations

import json
import signal
import time
from pathlib import Path

from lab.cluster import CalicnmHost, single_host, wait_until
from lab.images import DEFAULT_IMAGE as IMG
from tests.e2e.helpers import http_ok, start_web

POOL = "10.77.0.0/24"
WEB_IP = "10.77.0.10"
SLEEP = ("sleep", "3600")
SETTLE = 30.0
"""Bound on one reconcile period (2 s) plus the grace (5 s), with room for
Docker's own restart of its containers on a loaded machine."""


def check(host: CalicnmHost) -> dict[str, object]:
    result = host.calicnm("ipam", "check", "--json", check=False)
    report: dict[str, object] = json.loads(result.stdout)
    return report


def owned(host: CalicnmHost) -> tuple[set[str], set[str]]:
    """(addresses of endpoint records, allocated addresses) in etcd."""
    named: set[str] = set()
    allocated: set[str] = set()
    for key, value in host.etcd_keys().items():
        if "/endpoints/" in key:
            named |= {ip.split("/")[0] for ip in json.loads(value)["ipv4_nets"]}
        if "/ipam/v4/blocks/" in key:
            block = json.loads(value)
            base = int.from_bytes(bytes(map(int, block["cidr"].split("/")[0].split("."))), "big")
            for ordinal in block["allocations"]:
                n = base + int(ordinal)
                allocated.add(".".join(str((n >> s) & 255) for s in (24, 16, 8, 0)))
    return named, allocated


def running_addresses(host: CalicnmHost, network: str) -> set[str]:
    names = host.docker("ps", "--format", "{{.Names}}").split()
    return {host.ip_of(name, network) for name in names}


def start_workload(host: CalicnmHost) -> None:
    host.calicnm("pool", "add", POOL)
    host.create_network("net", "--subnet", POOL)
    start_web(host, "web", "net", "--restart", "always", "--ip", WEB_IP)
    host.docker("run", "-d", "--name", "worker", "--restart", "always", "--net", "net", IMG, *SLEEP)
    host.docker("run", "-d", "--name", "once", "--net", "net", IMG, *SLEEP)


def assert_settled(host: CalicnmHost) -> None:
    """Within ``SETTLE`` s: the restart-always containers run, the web one at
    its address and reachable, and etcd holds exactly what runs."""

    def settled() -> bool:
        up = set(host.docker("ps", "--format", "{{.Names}}").split())
        if up != {"web", "worker"}:
            return False
        named, allocated = owned(host)
        return named == allocated == running_addresses(host, "net") and check(host)["ok"] is True

    wait_until(settled, SETTLE, "the containers back and nothing orphaned")
    assert host.ip_of("web", "net") == WEB_IP
    assert wait_until(lambda: http_ok(host, "net", WEB_IP), 30, "the web container reachable")
    assert len(host.links("cali")) == 2


def test_dockerd_killed_while_containers_run(tmp_path: Path) -> None:
    with single_host(tmp_path) as host:
        start_workload(host)
        host.dockerd.stop_daemon(sig=signal.SIGKILL)  # its containers die with it
        # Each veth goes when its container's namespace is freed, a moment after the
        # container's processes are killed.
        wait_until(lambda: host.links("cali") == [], 30, "the killed containers' veths gone")
        host.dockerd.start_daemon()
        assert_settled(host)


def test_a_reboot_keeps_records_while_dockerd_is_down_then_collects(tmp_path: Path) -> None:
    with single_host(tmp_path) as host:
        start_workload(host)
        before, _ = owned(host)
        host.stop_node(sig=signal.SIGKILL)
        host.dockerd.stop_daemon(sig=signal.SIGKILL)
        # The host comes back: the node first (as its unit orders it), and
        # dockerd only after more than a minute.
        host.start_node()
        deadline = time.monotonic() + 65
        while time.monotonic() < deadline:
            report = check(host)
            kinds = {f["kind"] for f in report["findings"]}  # type: ignore[attr-defined]
            assert kinds <= {"waiting-for-docker"}, report
            assert owned(host)[0] == before  # nothing Docker must judge is removed
            time.sleep(5)
        host.dockerd.start_daemon()
        assert_settled(host)


def test_undo_calls_lost_while_the_node_is_down_are_collected(tmp_path: Path) -> None:
    """dockerd restarts while the node is down: its clean-up calls fail and
    it forgets them; the collector finds what they would have removed."""
    with single_host(tmp_path) as host:
        start_workload(host)
        host.stop_node(sig=signal.SIGKILL)
        host.dockerd.stop_daemon(sig=signal.SIGKILL)
        host.dockerd.start_daemon(timeout=120)
        host.start_node()
        wait_until(
            lambda: owned(host) == (set(), set()) and check(host)["ok"] is True,
            SETTLE,
            "the collector to remove every record and address the lost calls left",
        )
        log = (host.workdir / "node.log").read_text()
        assert log.count("stale endpoint record removed") == 3
        # Containers the plugin was missing for are started again by hand.
        host.docker("start", "web", "worker")
        assert_settled(host)
