"""Two hosts on a 3-member etcd cluster; while one host runs 20 ``docker run
--rm`` at a time, the member the hosts use is stopped (SIGTERM), restarted,
and then the member they moved to is killed (SIGKILL) and restarted.

The etcd runs in the fabric namespace (members at 198.18.0.1, client ports
2379/2479/2579), as a datacenter cluster; ETCD_ENDPOINTS lists all three.
What must hold: the nodes (and their agents) stay up and healthy; a
``docker run`` fails only if it overlapped an outage; the BGP session
between the hosts never drops; and when the runs are over, no address is
left allocated.
"""

from __future__ import annotations

import json
import re
import statistics
import subprocess
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path

from calicnm.errors import CalicnmError
from calicnm.routing.bgp import parse_protocols
from calicnm.routing.bird import Bird
from lab.cluster import CalicnmHost, wait_until
from lab.etcd import EtcdCluster, fabric_etcd_cluster
from lab.fabric import FABRIC_ADDRESS, Fabric
from lab.images import DEFAULT_IMAGE
from tests.e2e.helpers import assert_nothing_left

NET = "fo"
PARALLEL = 20
WINDOW_LIMIT = 15.0
"""A ``docker run`` may fail only if it overlapped [incident, incident + this]
(the plugin's etcd timeout is 5 s; measured windows are printed)."""
BAD_LOG = re.compile(r"closed channel|Channel closed|agent thread ended|unexpectedly", re.I)


@dataclass
class Run:
    start: float
    end: float
    ok: bool
    error: str = ""


@dataclass
class Load:
    """``PARALLEL`` threads each running ``docker run --rm`` in a loop."""

    host: CalicnmHost
    stop: threading.Event = field(default_factory=threading.Event)
    runs: list[Run] = field(default_factory=list)
    threads: list[threading.Thread] = field(default_factory=list)

    def _loop(self) -> None:
        while not self.stop.is_set():
            start = time.monotonic()
            try:
                res = self.host.docker_run(
                    "run", "--rm", "--net", NET, DEFAULT_IMAGE, "true", timeout=90
                )
                ok, error = res.returncode == 0, res.stderr.strip()
            except subprocess.TimeoutExpired:
                ok, error = False, "docker run timed out"
            self.runs.append(Run(start, time.monotonic(), ok, "" if ok else error))

    def start(self) -> None:
        for i in range(PARALLEL):
            t = threading.Thread(target=self._loop, name=f"docker-run-{i}", daemon=True)
            t.start()
            self.threads.append(t)

    def finish(self) -> None:
        self.stop.set()
        for t in self.threads:
            t.join(timeout=120)
        assert not any(t.is_alive() for t in self.threads), "a docker run hung"


@dataclass
class BgpWatch:
    """Samples each host's BGP sessions (BIRD's own view, no etcd involved)."""

    hosts: list[CalicnmHost]
    stop: threading.Event = field(default_factory=threading.Event)
    down: list[str] = field(default_factory=list)
    samples: int = 0
    thread: threading.Thread | None = None

    def sessions(self, host: CalicnmHost) -> list[dict[str, str]]:
        try:
            return parse_protocols(Bird(str(host.state_dir)).protocols())
        except CalicnmError:
            return []

    def _loop(self) -> None:
        while not self.stop.wait(1.0):
            for host in self.hosts:
                rows = self.sessions(host)
                self.samples += 1
                if not rows or any(r["info"] != "Established" for r in rows):
                    self.down.append(f"{time.monotonic():.1f} {host.hostname}: {rows}")

    def start(self) -> None:
        self.thread = threading.Thread(target=self._loop, name="bgp-watch", daemon=True)
        self.thread.start()

    def finish(self) -> None:
        self.stop.set()
        if self.thread is not None:
            self.thread.join(timeout=30)


def etcd_traffic(etcd: EtcdCluster, hosts: list[CalicnmHost]) -> dict[tuple[str, str], int]:
    """Bytes received so far on each of the hosts' TCP connections to an etcd
    member, by (local address, member index), from the kernel's socket table."""
    ports = [url.rsplit(":", 1)[1] for url in etcd.urls]
    traffic: dict[tuple[str, str], int] = {}
    for host in hosts:
        out = host.netns.run(["ss", "-Htni", "state", "established"]).stdout
        conn: tuple[str, str] | None = None
        for line in out.splitlines():
            fields = line.split()
            if not line.startswith((" ", "\t")) and len(fields) >= 4:
                local, peer = fields[2], fields[3]
                addr, _, port = peer.rpartition(":")
                addr = addr.strip("[]").removeprefix("::ffff:")  # gRPC's sockets are dual-stack
                member = ports.index(port) if port in ports else -1
                ok = addr == FABRIC_ADDRESS and member >= 0
                conn = (f"{host.hostname} {local}", str(member)) if ok else None
            elif conn is not None:
                got = re.search(r"bytes_received:(\d+)", line)
                traffic[conn] = int(got.group(1)) if got else 0
    return traffic


def member_in_use(etcd: EtcdCluster, hosts: list[CalicnmHost]) -> int:
    """The member the hosts talk to most in one second.  (gRPC keeps, and may
    reconnect, idle channels to other members: connections alone do not tell.)"""
    before = etcd_traffic(etcd, hosts)
    time.sleep(1)
    after = etcd_traffic(etcd, hosts)
    sums = [0] * etcd.n
    for conn, received in after.items():
        sums[int(conn[1])] += received - before.get(conn, 0)
    assert max(sums) > 0, f"no traffic to any etcd member: {after}"
    return sums.index(max(sums))


def remove_network(host: CalicnmHost) -> bool:
    """``docker network rm NET``, tried for up to 10 s."""
    for _ in range(10):
        if host.docker_run("network", "rm", NET).returncode == 0:
            return True
        time.sleep(1)
    return False


def in_use(host: CalicnmHost) -> int:
    rows = json.loads(host.calicnm("ipam", "show", "--json").stdout)
    return sum(int(r["in_use"]) for r in rows)


def test_etcd_failover_under_docker_load(tmp_path: Path) -> None:
    began = time.monotonic()
    with Fabric() as fabric, fabric_etcd_cluster(fabric, tmp_path) as etcd:
        hosts: list[CalicnmHost] = []
        try:
            for name in ("fo1", "fo2"):
                att = fabric.add_host()
                host = CalicnmHost(
                    att.host, att.address, tmp_path / name, name, etcd_endpoints=etcd.endpoints
                )
                hosts.append(host)
                host.start()
                host.create_network(NET)
            a = hosts[0]
            bgp = BgpWatch(hosts)
            wait_until(
                lambda: all(
                    (rows := bgp.sessions(h)) and rows[0]["info"] == "Established" for h in hosts
                ),
                60,
                "the BGP session between the hosts",
            )
            since = {h.hostname: bgp.sessions(h)[0]["since"] for h in hosts}
            baseline = in_use(a)
            assert baseline == 0, "a network without containers holds addresses"
            print(f"\nsetup took {time.monotonic() - began:.1f}s; {baseline} address(es) in use")

            load = Load(a)
            incidents: list[tuple[str, float]] = []
            bgp.start()
            load.start()
            try:
                wait_until(lambda: len(load.runs) >= 2 * PARALLEL, 90, "the first runs")
                first = member_in_use(etcd, hosts)
                incidents.append((f"SIGTERM member {first}", time.monotonic()))
                etcd.stop_member(first)
                time.sleep(10)
                incidents.append((f"restart member {first}", time.monotonic()))
                etcd.start_member(first)
                time.sleep(4)
                second = member_in_use(etcd, hosts)
                assert second != first, "the hosts still use the member that was stopped"
                incidents.append((f"SIGKILL member {second}", time.monotonic()))
                etcd.kill(second)
                time.sleep(10)
                incidents.append((f"restart member {second}", time.monotonic()))
                etcd.start_member(second)
                time.sleep(4)
            finally:
                load.finish()
                bgp.finish()

            # Docker saw failures only around an outage.
            runs = load.runs
            failed = [r for r in runs if not r.ok]
            calm = sorted(r.end - r.start for r in runs if r.end < incidents[0][1])
            print(
                f"{len(runs)} docker runs, {len(failed)} failed; before the first incident "
                f"a run took {statistics.median(calm):.1f}s (median), {calm[-1]:.1f}s at most"
            )
            outside = []
            for r in failed:
                near = [
                    (name, t) for name, t in incidents if r.start <= t + WINDOW_LIMIT and r.end >= t
                ]
                where = ", ".join(f"{name} +{r.end - t:.1f}s" for name, t in near) or "no outage"
                print(f"  failed run {r.end - r.start:.1f}s ({where}): {r.error[:200]}")
                if not near:
                    outside.append(r)
            for name, t in incidents:
                mine = [r for r in failed if r.start <= t + WINDOW_LIMIT and r.end >= t]
                later = [r for r in runs if r.start > t + 1 and r.ok]
                window = max((r.end for r in mine), default=t) - t
                slowest = max((r.end - r.start for r in runs if t <= r.end <= t + 10), default=0)
                print(
                    f"{name}: {len(mine)} failed runs, window {window:.1f}s, "
                    f"slowest run ending in the next 10s {slowest:.1f}s"
                )
                assert later, f"no docker run succeeded after {name}"
            assert not outside, f"{len(outside)} runs failed outside any outage window"

            # The nodes and their agents lived through it.
            for host in hosts:
                assert host.node is not None and host.node.is_running(), host.node
                wait_until(
                    lambda h=host: h.calicnm("status", check=False).returncode == 0,
                    30,
                    f"{host.hostname} healthy",
                )
                log = (host.workdir / "node.log").read_text().splitlines()
                bad = [line for line in log if BAD_LOG.search(line)]
                assert not bad, bad[:5]
                moves = [line for line in log if "; using http" in line]
                print(f"{host.hostname}: {len(moves)} failovers logged (node and plugin)")
            # BIRD's sessions never dropped (same "since" as before the load).
            assert not bgp.down, bgp.down[:5]
            assert bgp.samples > 0
            for host in hosts:
                rows = bgp.sessions(host)
                assert rows and rows[0]["info"] == "Established", rows
                assert rows[0]["since"] == since[host.hostname], "the BGP session restarted"

            # No leak: every --rm container is gone, and so is its address.  (Docker
            # finishes a container's network teardown after `docker run --rm` returns.)
            assert a.docker("ps", "-aq") == ""
            wait_until(
                lambda: a.docker("network", "inspect", "-f", "{{len .Containers}}", NET) == "0",
                30,
                "Docker to finish tearing down the containers' endpoints",
            )
            wait_until(lambda: in_use(a) == baseline, 30, "addresses back to the baseline")
            assert a.links("cali", "tmp") == []
            assert [r for r in a.routes() if " dev cali" in r] == []
            stored = a.etcd_keys()
            assert [k for k in stored if "/endpoints/" in k] == []
            for key, value in stored.items():
                if "/ipam/v4/blocks/" in key:
                    assert json.loads(value)["allocations"] == {}, key
            # Then the network goes.  Docker itself sometimes keeps counting an
            # endpoint after 20 parallel `run --rm`s ("has active endpoints"; seen
            # with the embedded etcd and no failover too, while every
            # DeleteEndpoint had been answered 200): tolerated, with a note.
            removed = [remove_network(h) for h in hosts]
            if all(removed):
                assert_nothing_left(a)
            else:
                print(f"NOTE: Docker kept an endpoint on {NET}: removed={removed}")
            print(f"test took {time.monotonic() - began:.1f}s")
        finally:
            for host in reversed(hosts):
                host.close()
