"""A real agent whose watch is lost while etcd's history is compacted past it
recovers with a full read, and its kernel converges to what a fresh agent
programs.

Everything runs in one throwaway namespace: an etcd serving two client ports
(the agent's and the writer's), the agent in a process of its own
(``tests/kernel/agent_process.py``), its veths, chains and ipsets.  The outage
is etcd restarted without the agent's port: the agent's stream breaks and
cannot come back, while the writer changes a tag's members, adds one endpoint,
deletes another and compacts etcd's history to the latest revision.  Then etcd
serves the agent's port again.
"""

from __future__ import annotations

import ipaddress
import json
import os
import re
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from calicnm.endpoint import derive_mac, plan_link
from calicnm.model import Endpoint, Network
from calicnm.policy import Profile
from calicnm.store import keys
from lab.netns import Netns
from lab.procs import Process

pytestmark = [pytest.mark.kernel, pytest.mark.etcd]

ROOT = Path(__file__).resolve().parents[2]
AGENT_URL = "http://127.0.0.1:2379"
WRITER_URL = "http://127.0.0.1:22379"
PEER_URL = "http://127.0.0.1:2380"
NET = "a" * 64
AGENT = (sys.executable, "-m", "tests.kernel.agent_process")
EP1, EP2, EP3, EP_REMOTE = "1" * 64, "2" * 64, "4" * 64, "3" * 64


def wait_until(check: Callable[[], Any], timeout: float, what: str) -> Any:
    deadline = time.monotonic() + timeout
    last: Any = None
    while time.monotonic() < deadline:
        last = check()
        if last:
            return last
        time.sleep(0.2)
    raise AssertionError(f"{what}: not true after {timeout}s (last: {last!r})")


class Rig:
    """The namespace, its etcd (restartable on the same data) and the writer."""

    def __init__(self, ns: Netns, workdir: Path) -> None:
        self.ns = ns
        self.workdir = workdir
        self.etcd: Process | None = None
        self.agent: Process | None = None
        self.starts = 0

    def start_etcd(self, serve_agent: bool) -> None:
        clients = f"{AGENT_URL},{WRITER_URL}" if serve_agent else WRITER_URL
        self.starts += 1
        argv = [
            "etcd",
            "--name",
            "k",
            "--data-dir",
            str(self.workdir / "etcd"),
            "--listen-client-urls",
            clients,
            "--advertise-client-urls",
            WRITER_URL,
            "--listen-peer-urls",
            PEER_URL,
            "--initial-advertise-peer-urls",
            PEER_URL,
            "--initial-cluster",
            f"k={PEER_URL}",
        ]
        log = self.workdir / f"etcd-{self.starts}.log"
        self.etcd = self.ns.process(argv, log, name="etcd").start()
        wait_until(
            lambda: self.ctl("endpoint", "health", check=False) is not None, 30, "etcd healthy"
        )

    def stop_etcd(self) -> None:
        if self.etcd is not None:
            self.etcd.stop(timeout=20)
            self.etcd = None

    def ctl(self, *args: str, check: bool = True) -> str | None:
        done = self.ns.run(
            ["etcdctl", "--endpoints", WRITER_URL, *args],
            check=check,
            env={**os.environ, "ETCDCTL_API": "3"},
        )
        return done.stdout if done.returncode == 0 else None

    def put(self, key: str, value: str) -> None:
        self.ctl("put", key, value)

    def revision(self) -> int:
        out = self.ctl("endpoint", "status", "-w", "json")
        assert out is not None
        return int(json.loads(out)[0]["Status"]["header"]["revision"])

    def endpoint(
        self, eid: str, ip: str, host: str = "h1", profiles: tuple[str, ...] | None = None
    ) -> Endpoint:
        plan = plan_link(eid, derive_mac(eid), (ipaddress.IPv4Address(ip),))
        if host == "h1" and not self.link_exists(plan.host_if):
            self.ns.run(
                ["ip", "link", "add", plan.host_if, "type", "veth", "peer", "name", plan.peer_if]
            )
            self.ns.run(["ip", "link", "set", plan.peer_if, "address", plan.mac])
            for name in (plan.host_if, plan.peer_if):
                self.ns.run(["ip", "link", "set", name, "up"])
        ep = Endpoint(
            eid,
            host,
            NET,
            plan.host_if,
            plan.peer_if,
            plan.mac,
            (ipaddress.IPv4Address(ip),),
            profiles=profiles,
        )
        self.put(keys.endpoint(host, eid), ep.to_json())
        return ep

    def link_exists(self, name: str) -> bool:
        return self.ns.run(["ip", "link", "show", name], check=False).returncode == 0

    def start_agent(self) -> None:
        self.agent = self.ns.process(
            [*AGENT, "--etcd", AGENT_URL, "--state", str(self.workdir / "agent")],
            self.workdir / "agent.log",
            cwd=str(ROOT),
            name="agent",
        ).start()

    def figures(self) -> dict[str, Any]:
        path = self.workdir / "agent" / "figures.json"
        if self.agent is not None and not self.agent.is_running():
            raise AssertionError(f"the agent exited:\n{self.agent.log_tail(40)}")
        return json.loads(path.read_text()) if path.exists() else {}

    def members(self, name: str) -> set[str] | None:
        done = self.ns.run(["ipset", "list", name], check=False)
        if done.returncode != 0:
            return None
        return set(done.stdout.split("Members:\n", 1)[1].split())

    def kernel(self) -> dict[str, list[str]]:
        """Chains and sets, without comments, counters and the sets' hash seeds
        (a set made anew gets a new one)."""

        def saved(table: str) -> list[str]:
            out = self.ns.run(["iptables-save", "-t", table]).stdout
            return [re.sub(r"\[\d+:\d+\]", "", ln) for ln in out.splitlines() if ln[:1] != "#"]

        sets = [
            re.sub(r" initval 0x[0-9a-f]+", "", ln)
            for ln in self.ns.run(["ipset", "save"]).stdout.splitlines()
        ]
        return {"filter": saved("filter"), "nat": saved("nat"), "ipsets": sorted(sets)}


@pytest.fixture
def rig(tmp_path: Path) -> Iterator[Rig]:
    if os.geteuid() != 0:
        pytest.skip("kernel tests need root")
    with Netns() as ns:
        rig = Rig(ns, tmp_path)
        try:
            yield rig
        finally:
            if rig.agent is not None:
                rig.agent.stop(timeout=20)
            rig.stop_etcd()
    # Deleting the namespace took its links, chains and sets with it.


def test_a_lost_watch_with_compacted_history_recovers_with_a_full_read(rig: Rig) -> None:
    rig.start_etcd(serve_agent=True)
    rig.put(keys.network(NET), Network(NET, docker_name="dataman").to_json())
    rig.put(keys.profile("dataman"), Profile.default("dataman").to_json())
    rig.put(keys.profile("WEB"), Profile.default("WEB").to_json())
    ep1 = rig.endpoint(EP1, "10.0.0.1")
    rig.endpoint(EP2, "10.0.0.2")
    rig.endpoint(EP_REMOTE, "10.0.1.7", host="h2")
    rig.start_agent()
    wait_until(
        lambda: rig.members("calicnm-t-dataman") == {"10.0.0.1", "10.0.0.2", "10.0.1.7"},
        60,
        "the first pass programmed the tag",
    )
    wait_until(lambda: rig.figures().get("passes"), 30, "the agent reports")
    time.sleep(1.0)  # the agent follows etcd's changes now
    reads_before = rig.figures()["full_reads"]

    # The outage: etcd back at once, but not on the agent's port.
    rig.stop_etcd()
    rig.start_etcd(serve_agent=False)
    rig.endpoint(EP2, "10.0.0.2", profiles=("WEB",))  # leaves tag dataman, joins WEB
    rig.endpoint(EP3, "10.0.0.3")  # added
    rig.ctl("del", keys.endpoint("h1", EP1))  # deleted
    rig.ns.run(["ip", "link", "del", ep1.interface])
    for i in range(5):  # more history for the compaction to drop
        rig.put(keys.config(f"churn-{i}"), str(i))
    rig.ctl("compact", str(rig.revision()))
    time.sleep(1.0)
    assert rig.members("calicnm-t-dataman") == {"10.0.0.1", "10.0.0.2", "10.0.1.7"}

    # Restored: the agent cannot resume from its revision and reads everything.
    rig.stop_etcd()
    rig.start_etcd(serve_agent=True)
    wait_until(
        lambda: (
            rig.members("calicnm-t-dataman") == {"10.0.0.3", "10.0.1.7"}
            and rig.members("calicnm-t-WEB") == {"10.0.0.2"}
        ),
        90,
        "the kernel follows etcd after the outage",
    )
    # The agent writes its figures every 0.1 s: the count may trail the kernel a little.
    wait_until(lambda: rig.figures()["full_reads"] > reads_before, 10, "the full read counted")
    save = "\n".join(rig.kernel()["filter"])
    assert "calicnm-from-11111111111" not in save
    assert "calicnm-from-44444444444" in save

    # Settled, it equals what a fresh agent programs from the same datastore.
    wait_until(lambda: not rig.figures().get("last_error"), 30, "a good pass")
    assert rig.agent is not None
    rig.agent.stop(timeout=20)
    recovered = rig.kernel()
    fresh = rig.ns.run(
        [*AGENT, "--once", "--etcd", AGENT_URL, "--state", str(rig.workdir / "fresh")],
        timeout=120,
        check=False,
        env={**os.environ, "PYTHONPATH": str(ROOT)},
    )
    assert fresh.returncode == 0, fresh.stderr[-2000:]
    assert rig.kernel() == recovered
