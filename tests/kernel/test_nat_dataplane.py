"""nat-outgoing against real iptables (nat table), real ipsets and a real etcd.

The ``netns`` fixture's namespace is the host; the traffic test adds a
"container" and an "outside" namespace of its own, joined to it by veths.
"""

from __future__ import annotations

import contextlib
import ipaddress
import json
import os
import subprocess
import time
import uuid
from collections.abc import Callable, Iterator

import pytest

from calicnm.host.ipsets import Ipsets
from calicnm.host.iptables import Iptables
from calicnm.host.markers import Markers
from calicnm.host.netlink import HostPlumbing
from calicnm.host.policy_applier import PolicyApplier
from calicnm.model import Pool
from calicnm.node.agent import Agent
from calicnm.store import keys
from lab.paths import VENV_BIN

pytestmark = [pytest.mark.kernel, pytest.mark.etcd]

JUMP = "-A POSTROUTING -j calicnm-POSTROUTING"
MASQ = [
    "-A calicnm-POSTROUTING -d 169.254.0.0/16 -j RETURN",
    "-A calicnm-POSTROUTING -d 127.0.0.0/8 -j RETURN",
    "-A calicnm-POSTROUTING -m set --match-set calicnm-masq-pools src "
    "-m set ! --match-set calicnm-all-pools dst -j MASQUERADE",
]


def sh(*argv: str, check: bool = True) -> str:
    return subprocess.run(argv, check=check, capture_output=True, text=True).stdout


def nat(*chain: str) -> list[str]:
    return sh("iptables", "-w", "-t", "nat", "-S", *chain).splitlines()


def ipset(name: str) -> tuple[str, set[str]]:
    """(type, members) of a set."""
    out = sh("ipset", "list", name)
    kind = out.split("Type: ", 1)[1].split()[0]
    return kind, set(out.split("Members:\n", 1)[1].split())


def our_sets() -> set[str]:
    return {n for n in sh("ipset", "list", "-n").split() if n.startswith("calicnm-")}


def put_pool(store, cidr: str, nat_outgoing: bool = False) -> None:
    pool = Pool(ipaddress.IPv4Network(cidr), nat_outgoing=nat_outgoing)
    store.put(keys.pool(pool.cidr), pool.to_json())


def new_agent(store, tmp_path) -> Agent:
    dataplane = PolicyApplier(Iptables(), Ipsets())
    markers = Markers(str(tmp_path / "programmed"))
    return Agent(store, "h1", dataplane, HostPlumbing(), markers)


@pytest.fixture
def rig(etcd_store, netns, tmp_path):
    # etcd_store first: its connection is made from the host namespace.
    put_pool(etcd_store, "10.65.0.0/16", nat_outgoing=True)
    put_pool(etcd_store, "10.66.0.0/16")
    return etcd_store, new_agent(etcd_store, tmp_path)


def test_programmed_incrementally_and_removed_when_no_pool_has_nat(rig):
    store, agent = rig
    agent.reconcile(full=True)
    assert nat("POSTROUTING")[1:] == [JUMP]
    assert nat("calicnm-POSTROUTING")[1:] == MASQ
    assert ipset("calicnm-all-pools") == ("hash:net", {"10.65.0.0/16", "10.66.0.0/16"})
    assert ipset("calicnm-masq-pools") == ("hash:net", {"10.65.0.0/16"})

    put_pool(store, "10.67.0.0/16", nat_outgoing=True)
    agent.reconcile()
    assert ipset("calicnm-masq-pools")[1] == {"10.65.0.0/16", "10.67.0.0/16"}
    assert len(ipset("calicnm-all-pools")[1]) == 3

    # Both nat pools lose nat-outgoing: jump, chain and then the sets go.
    put_pool(store, "10.65.0.0/16")
    put_pool(store, "10.67.0.0/16")
    agent.reconcile()
    assert "calicnm" not in sh("iptables-save", "-t", "nat")
    assert our_sets() == set()
    assert sh("iptables", "-w", "-S", "FORWARD").count("-j calicnm-FORWARD") == 1

    # And back, incrementally: the jump is inserted with the chain.
    put_pool(store, "10.66.0.0/16", nat_outgoing=True)
    agent.reconcile()
    assert nat("POSTROUTING")[1:] == [JUMP]
    assert ipset("calicnm-masq-pools")[1] == {"10.66.0.0/16"}


def test_full_resync_repairs_drift_and_spares_foreign_rules(rig, tmp_path):
    store, agent = rig
    sh("iptables", "-w", "-t", "nat", "-N", "DOCKER")
    sh("iptables", "-w", "-t", "nat", "-A", "POSTROUTING", "-o", "eth9", "-j", "MASQUERADE")
    sh("ipset", "create", "foreign", "hash:ip")
    agent.reconcile(full=True)
    assert nat("POSTROUTING")[1:] == [JUMP, "-A POSTROUTING -o eth9 -j MASQUERADE"]

    sh("iptables", "-w", "-t", "nat", "-D", "POSTROUTING", "-j", "calicnm-POSTROUTING")
    sh("iptables", "-w", "-t", "nat", "-A", "POSTROUTING", "-j", "calicnm-POSTROUTING")
    sh("iptables", "-w", "-t", "nat", "-A", "POSTROUTING", "-j", "calicnm-POSTROUTING")
    sh("iptables", "-w", "-t", "nat", "-F", "calicnm-POSTROUTING")
    sh("iptables", "-w", "-t", "nat", "-N", "calicnm-stale")
    sh("ipset", "flush", "calicnm-masq-pools")
    agent.reconcile()  # incremental: trusts what it programmed
    assert nat("calicnm-POSTROUTING")[1:] == []
    agent.reconcile(full=True)
    assert nat("POSTROUTING")[1:].count(JUMP) == 1
    assert nat("calicnm-POSTROUTING")[1:] == MASQ
    assert ipset("calicnm-masq-pools")[1] == {"10.65.0.0/16"}
    assert "calicnm-stale" not in sh("iptables-save", "-t", "nat")
    assert "-A POSTROUTING -o eth9 -j MASQUERADE" in nat("POSTROUTING")
    assert "-N DOCKER" in nat()

    # A restarted agent converges to the same tables, without duplicates.
    strip = lambda text: [ln for ln in text.splitlines() if not ln.startswith("#")]  # noqa: E731
    before = strip(sh("iptables-save", "-t", "nat"))
    fresh = new_agent(store, tmp_path)
    fresh.reconcile(full=True)
    fresh.reconcile(full=True)
    assert strip(sh("iptables-save", "-t", "nat")) == before

    # A restarted agent also removes what an earlier run left behind.
    put_pool(store, "10.65.0.0/16")
    new_agent(store, tmp_path).reconcile(full=True)
    assert "calicnm" not in sh("iptables-save", "-t", "nat")
    assert nat("POSTROUTING")[1:] == ["-A POSTROUTING -o eth9 -j MASQUERADE"]
    assert our_sets() == set()
    assert "foreign" in sh("ipset", "list", "-n").split()


@pytest.fixture
def namespaces() -> Iterator[Callable[[], str]]:
    made: list[str] = []

    def make() -> str:
        made.append("cnmt" + uuid.uuid4().hex[:8])
        sh("ip", "netns", "add", made[-1])
        return made[-1]

    yield make
    for name in made:
        sh("ip", "netns", "del", name, check=False)


def test_real_traffic_is_masqueraded_only_outside_every_pool(rig, namespaces, tmp_path):
    """container 10.65.0.5 --hc-- host --ho-- outside 203.0.113.2 and 10.66.0.2."""
    _store, agent = rig
    agent.reconcile(full=True)
    container, outside = namespaces(), namespaces()
    sh("sysctl", "-qw", "net.ipv4.ip_forward=1")  # the fixture's namespace only
    for host_if, ns, host_addrs, addrs, gateway in (
        ("hc", container, ["10.65.0.1/24"], ["10.65.0.5/24"], "10.65.0.1"),
        ("ho", outside, ["203.0.113.1/24", "10.66.0.1/24"], ["203.0.113.2/24", "10.66.0.2/24"],
         "10.66.0.1"),
    ):  # fmt: skip
        sh("ip", "link", "add", host_if, "type", "veth", "peer", "name", "eth0", "netns", ns)
        for addr in host_addrs:
            sh("ip", "addr", "add", addr, "dev", host_if)
        sh("ip", "link", "set", host_if, "up")
        for addr in addrs:
            sh("ip", "-n", ns, "addr", "add", addr, "dev", "eth0")
        sh("ip", "-n", ns, "link", "set", "eth0", "up")
        sh("ip", "-n", ns, "route", "add", "default", "via", gateway)
    www = tmp_path / "www"
    www.mkdir()
    (www / "index.html").write_text("hello\n")
    log = tmp_path / "httpd.log"
    with open(log, "w") as err:
        httpd = subprocess.Popen(
            ["ip", "netns", "exec", outside, "busybox", "httpd", "-f", "-v", "-p", "80", "-h", www],
            stderr=err,
        )
    try:
        for target in ("203.0.113.2", "10.66.0.2"):
            url = f"http://{target}/"
            get = ["ip", "netns", "exec", container, "busybox", "wget", "-qO-", url]
            for _ in range(20):  # (busybox 1.35's wget -T segfaults: time it out here)
                with contextlib.suppress(subprocess.TimeoutExpired):
                    if subprocess.run(get, capture_output=True, text=True, timeout=3).stdout:
                        break
                time.sleep(0.1)
            else:
                pytest.fail(f"no answer from {url}")
    finally:
        httpd.terminate()
        httpd.wait(timeout=10)
    clients = [line for line in log.read_text().splitlines() if "response:" in line]
    assert len(clients) == 2, clients
    assert "203.0.113.1" in clients[0]  # left the pools: the host's address
    assert "10.65.0.5" in clients[1]  # pool to pool: never masqueraded


def test_cli_pool_add_nat_outgoing(etcd_store, etcd_server):
    env = {k: v for k, v in os.environ.items() if not k.startswith(("ETCD", "CALICNM"))}
    env.update(ETCD_ENDPOINTS=etcd_server.url, CALICNM_HOSTNAME="cli-host")

    def run(*args: str) -> str:
        argv = [os.path.join(VENV_BIN, "calicnm"), *args]
        done = subprocess.run(argv, capture_output=True, text=True, env=env, timeout=60)
        assert done.returncode == 0, done.stderr
        return done.stdout

    run("pool", "add", "10.70.0.0/24", "--nat-outgoing")
    run("pool", "add", "10.71.0.0/24")
    shown = {p["cidr"]: p["nat_outgoing"] for p in json.loads(run("pool", "show", "--json"))}
    assert shown == {"10.70.0.0/24": True, "10.71.0.0/24": False}
    rows = [[c.strip() for c in ln.split("|")[1:3]] for ln in run("pool", "show").splitlines()]
    assert ["10.70.0.0/24", "nat-outgoing"] in rows and ["10.71.0.0/24", ""] in rows
