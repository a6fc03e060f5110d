"""Ambiguous commits: etcd applies a write, and its reply never arrives.

One host whose node reaches the datacenter etcd only through
``lab.etcd_proxy`` (in the fabric namespace, in front of the fabric etcd).
While 50 ``docker run --rm`` run, ``PARALLEL`` at a time, the proxy loses
the reply of every ``DROP_EVERY``-th write (Txn, Put, DeleteRange) after
etcd answered it, cutting that client's whole connection each time (the
node's or its plugin's): the write is applied, the client only sees the
connection break, and every other call in flight on it (watches too) breaks
as well.  Most such commits are settled by the etcd client's retry, which
reads history; so every ``BLACKOUT_EVERY``-th loss is followed by a
blackout (no new connection for 7 s, then 12 s next time): longer than the
client's 5 s deadline, so the outcome stays unknown to IPAM (which re-reads
the block once etcd is back) or, after the longer one, to Docker too (the
call fails, and what it left is the ownership collector's to find).

Docker runs may fail meanwhile (they are counted, not judged).  What must
hold once the proxy is quiet again and the node's ownership collector has
had time (pending addresses are freed after 15 s with the test settings):
- the allocations in etcd are exactly the live endpoints' addresses plus
  the network's reservations (a resident container and one
  ``--aux-address``), each held once, under the right handle;
- no endpoint record but the resident's, no ``cali`` link or /32 route but
  the resident's, no ``tmp`` link;
- ``calicnm ipam check --json`` finds nothing;
- the node and its plugin stayed up, and the network still works.
The truth is read from etcd directly (in the fabric namespace), not
through the proxy.

A CreateEndpoint slowed by lost replies can last longer than the
collector's grace (5 s with the test settings); its in-flight marker keeps
the collector away from it, and ``collector_races`` proves no endpoint was
taken apart mid-call.
"""

from __future__ import annotations

import base64
import contextlib
import ipaddress
import json
import os
import re
import subprocess
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from lab.cluster import CalicnmHost, wait_until
from lab.etcd import FABRIC_ETCD_URL, fabric_etcd
from lab.etcd_proxy import DropPolicy, ProxyProcess
from lab.fabric import FABRIC_ADDRESS, Fabric
from lab.images import DEFAULT_IMAGE
from lab.netns import Netns

NET = "amb"
SUBNET = "192.168.77.0/24"
AUX = "192.168.77.5"
RUNS = 50
PARALLEL = 8
DROP_EVERY = 8
BLACKOUTS = (7.0, 12.0)
BLACKOUT_EVERY = 16
MIN_DROPS = 5
PROXY_PORT = 23790
RESIDENT = "resident"
SETTLE_TIMEOUT = 150.0
"""Bound on the state settling after the load: pending max age (15 s) plus the
collector's grace (5 s) and interval (2 s), many times over for a loaded box."""


@dataclass
class Run:
    seconds: float
    ok: bool
    error: str


def run_one(host: CalicnmHost, index: int) -> Run:
    began = time.monotonic()
    try:
        res = host.docker_run("run", "--rm", "--net", NET, DEFAULT_IMAGE, "true", timeout=150)
        ok, error = res.returncode == 0, res.stderr.strip()
    except subprocess.TimeoutExpired:
        ok, error = False, "docker run timed out"
    return Run(time.monotonic() - began, ok, "" if ok else f"run {index}: {error}")


def etcd_direct(fabric: Fabric, prefix: str = "/calicnm/v1/") -> dict[str, str]:
    """Every key under ``prefix``, read from the fabric etcd itself (not the proxy)."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("ETCD")}
    env["ETCDCTL_API"] = "3"
    argv = ["etcdctl", "--endpoints", FABRIC_ETCD_URL, "get", "--prefix", prefix, "-w", "json"]
    out = fabric.netns.run(argv, env=env, timeout=30).stdout
    return {
        base64.b64decode(kv["key"]).decode(): base64.b64decode(kv.get("value", "")).decode()
        for kv in json.loads(out).get("kvs", [])
    }


def etcd_healthy(netns: Netns) -> bool:
    env = {k: v for k, v in os.environ.items() if not k.startswith("ETCD")}
    env["ETCDCTL_API"] = "3"
    argv = ["etcdctl", "--endpoints", FABRIC_ETCD_URL, "--dial-timeout", "1s"]
    res = netns.run([*argv, "endpoint", "health"], check=False, env=env, timeout=15)
    return res.returncode == 0


def allocations(stored: dict[str, str]) -> list[tuple[str, str, str]]:
    """(address, handle, kind) of every allocation in every block."""
    found = []
    for key, value in stored.items():
        if "/ipam/v4/blocks/" not in key:
            continue
        block = json.loads(value)
        base = ipaddress.ip_network(block["cidr"]).network_address
        for ordinal, alloc in block["allocations"].items():
            found.append((str(base + int(ordinal)), alloc["handle"], alloc["kind"]))
    return sorted(found)


def ipam_check(host: CalicnmHost) -> dict[str, Any]:
    res = host.calicnm("ipam", "check", "--json", check=False)
    try:
        report: dict[str, Any] = json.loads(res.stdout)
    except ValueError:
        return {"ok": False, "output": (res.stdout + res.stderr)[-500:]}
    return report


def node_log_tail(host: CalicnmHost, n: int) -> str:
    """The node log's last ``n`` lines, without pyroute2's netlink dumps."""
    lines = (host.workdir / "node.log").read_text(errors="replace").splitlines()
    return "\n".join([line for line in lines if "pyroute2" not in line][-n:])


def remove_network(host: CalicnmHost) -> bool:
    """``docker network rm NET``, tried for up to 10 s."""
    for _ in range(10):
        if host.docker_run("network", "rm", NET).returncode == 0:
            return True
        time.sleep(1)
    return False


def collector_races(log: str) -> list[str]:
    """Endpoints the ownership collector took apart while their CreateEndpoint was still
    running: its veth removed as an orphan before the call ended, or its record removed
    as stale between a successful CreateEndpoint and the Join (which then finds none).
    Must be none: a call in flight is marked, and the collector skips it."""
    lines = log.splitlines()
    ended: dict[str, int] = {}
    for i, line in enumerate(lines):
        if (
            got := re.search(r"call=NetworkDriver\.CreateEndpoint \S+ endpoint=(\w+)", line)
        ) is not None:
            ended[got.group(1)] = i
    raced = []
    for i, line in enumerate(lines):
        if (got := re.search(r"orphan veth removed if=cali(\w+)", line)) is not None:
            raced += [ep for ep, end in ended.items() if ep.startswith(got.group(1)) and end > i]
    created = re.findall(r"call=NetworkDriver\.CreateEndpoint \S+ endpoint=(\w+) status=200", log)
    refused = re.findall(r"call=NetworkDriver\.Join \S+ endpoint=(\w+) status=404", log)
    return sorted(set(raced) | (set(created) & set(refused)))


def test_ambiguous_commits_leave_no_leak(tmp_path: Path) -> None:
    began = time.monotonic()
    with contextlib.ExitStack() as stack:
        fabric = stack.enter_context(Fabric())
        etcd = fabric_etcd(fabric, tmp_path)
        stack.callback(etcd.stop)
        wait_until(lambda: etcd_healthy(fabric.netns), 60, "the fabric etcd")
        proxy = stack.enter_context(
            ProxyProcess(
                f"{FABRIC_ADDRESS}:2379",
                f"{FABRIC_ADDRESS}:{PROXY_PORT}",
                tmp_path / "proxy",
                netns=fabric.netns,
            )
        )
        att = fabric.add_host()
        host = stack.enter_context(
            CalicnmHost(att.host, att.address, tmp_path / "amb1", "amb1", etcd_endpoints=proxy.url)
        )
        host.create_network(NET, "--subnet", SUBNET, "--aux-address", f"router={AUX}")
        stack.callback(host.docker_run, "network", "rm", NET)
        stack.callback(host.docker_run, "rm", "-f", RESIDENT)
        host.docker("run", "-d", "--net", NET, "--name", RESIDENT, DEFAULT_IMAGE, "sleep", "900")
        network_id = host.docker("network", "inspect", "-f", "{{.Id}}", NET)
        resident_ip = host.ip_of(RESIDENT, NET)
        resident_ep = host.docker(
            "inspect",
            "-f",
            f'{{{{(index .NetworkSettings.Networks "{NET}").EndpointID}}}}',
            RESIDENT,
        )
        expected = sorted(
            [(resident_ip, resident_ep, "endpoint"), (AUX, f"aux:{network_id}", "aux")]
        )
        wait_until(
            lambda: allocations(etcd_direct(fabric)) == expected, 30, "the resident's allocation"
        )
        before = proxy.stats() or {}
        print(
            f"\nsetup took {time.monotonic() - began:.1f}s; proxy so far: {before.get('requests')}"
        )

        # The load, with every DROP_EVERY-th write's reply lost.
        proxy.set_policy(
            DropPolicy(every=DROP_EVERY, blackouts=BLACKOUTS, blackout_every=BLACKOUT_EVERY)
        )
        load_began = time.monotonic()
        try:
            with ThreadPoolExecutor(PARALLEL, thread_name_prefix="docker-run") as pool:
                runs = list(pool.map(lambda i: run_one(host, i), range(RUNS)))
        finally:
            proxy.set_policy(DropPolicy())
        load_took = time.monotonic() - load_began
        stats = proxy.stats() or {}
        failed = [r for r in runs if not r.ok]
        print(
            f"{RUNS} docker runs in {load_took:.1f}s, {len(failed)} failed; slowest "
            f"{max(r.seconds for r in runs):.1f}s; proxy: {stats.get('chosen')} writes, "
            f"{stats.get('dropped')} replies lost, {stats.get('collateral')} other calls cut, "
            f"{stats.get('blackouts')} blackouts ({stats.get('blackout_refused')} refused), "
            f"{stats.get('connections')} connections, {stats.get('blind_connections')} blind"
        )
        for r in failed:
            print(f"  failed after {r.seconds:.1f}s: {r.error[:300]}")
        assert stats.get("dropped", 0) >= MIN_DROPS, stats
        assert len(runs) - len(failed) >= RUNS // 5, "hardly any run got through"
        assert stats.get("blind_connections") == 0, stats
        assert host.node is not None and host.node.is_running(), node_log_tail(host, 40)
        assert host.answering(), "the plugin stopped answering"

        # Containers whose run failed may be left (created, never started): remove them.
        names = host.docker("ps", "-a", "--format", "{{.Names}}").split()
        leftovers = [n for n in names if n != RESIDENT]
        if leftovers:
            print(f"removing {len(leftovers)} container(s) failed runs left: {leftovers}")
            host.docker("rm", "-f", *leftovers, timeout=180)
        wait_until(
            lambda: host.docker("network", "inspect", "-f", "{{len .Containers}}", NET) == "1",
            60,
            "Docker to finish tearing down the runs' endpoints",
        )

        # Then the state settles to: live endpoints plus reservations, nothing else.
        settle_began = time.monotonic()
        assert host.node is not None
        resident_link = host.docker("exec", RESIDENT, "cat", "/sys/class/net/eth0/iflink")
        last: dict[str, Any] = {}

        def settled() -> bool:
            stored = etcd_direct(fabric)
            last["allocations"] = held = allocations(stored)
            last["endpoints"] = records = [k for k in stored if "/endpoints/" in k]
            last["links"] = links = host.links("cali", "tmp")
            if held != expected or len(records) != 1 or len(links) != 1:
                return False
            last["check"] = report = ipam_check(host)
            return bool(report.get("ok"))

        try:
            wait_until(settled, SETTLE_TIMEOUT, "allocations = live endpoints + reservations")
        except AssertionError:
            print(f"last state: {json.dumps(last, indent=1)}")
            print(node_log_tail(host, 60))
            raise
        print(
            f"settled {time.monotonic() - settle_began:.1f}s after Docker's teardown, "
            f"{time.monotonic() - load_began - load_took:.1f}s after the load"
        )

        stored = etcd_direct(fabric)
        held = allocations(stored)
        handles = [h for _ip, h, _k in held]
        assert len(handles) == len(set(handles)), f"a handle holds two addresses: {held}"
        assert not [h for h in handles if h.startswith("docker-pending")], held
        (record,) = [k for k in stored if "/endpoints/" in k]
        assert record.endswith(resident_ep), record
        assert resident_ip in stored[record], stored[record]
        (link,) = host.links("cali", "tmp")
        shown = host.netns.run(["ip", "-o", "link", "show", "dev", link]).stdout
        assert shown.split(":")[0].strip() == resident_link.strip(), (
            f"the one cali link left is not the resident's: {shown}"
        )
        cali_routes = [r for r in host.routes() if " dev cali" in r]
        assert len(cali_routes) == 1, cali_routes
        assert cali_routes[0].startswith(f"{resident_ip} dev {link} "), cali_routes
        report = last["check"]
        assert report["counts"]["endpoints"] == 1, report

        # The node and its plugin lived through it, and the network still works.
        assert host.node.is_running(), node_log_tail(host, 40)
        assert host.answering()
        after = run_one(host, RUNS)
        assert after.ok, after.error
        log = (host.workdir / "node.log").read_text()
        recognised = len(re.findall(r"answer was lost had been applied", log))
        unknown = len(re.findall(r"commit outcome unknown", log))
        ipam_level = len(re.findall(r"a commit whose reply was lost was applied", log))
        repaired = len(
            re.findall(
                r"address released ip=\S+ handle=\S+ \(|stale endpoint record removed|"
                r"orphan veth removed",
                log,
            )
        )
        tracebacks = log.count("Traceback")
        print(
            f"node log: {recognised} lost commits recognised as applied by the etcd client, "
            f"{unknown} left unknown to IPAM and {ipam_level} of them then found applied; "
            f"{repaired} repairs by the ownership collector; {tracebacks} tracebacks"
        )
        assert recognised > 0, "no lost commit was recognised as applied"
        assert collector_races(log) == [], "the collector took apart endpoints mid-call"

        # Last, the network goes, and its reservation with it.
        host.docker("rm", "-f", RESIDENT)
        if remove_network(host):
            wait_until(
                lambda: (
                    not [k for k in etcd_direct(fabric) if "/endpoints/" in k or "/networks/" in k]
                    and allocations(etcd_direct(fabric)) == []
                    and host.links("cali", "tmp") == []
                ),
                60,
                "nothing left once the network is gone",
            )
        else:  # seen on Docker 20.10 after parallel runs, with or without lost replies
            print(f"NOTE: Docker kept an endpoint on {NET}; the network stays")
        print(f"test took {time.monotonic() - began:.1f}s")
