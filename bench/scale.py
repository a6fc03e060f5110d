#!/usr/bin/env python3
"""Scale benchmark of calicnm on a simulated cluster (``make scale``).

For each topology (full BGP mesh, route reflector) and each cluster size N it starts
:class:`lab.sim_cluster.SimCluster`: N docker-less hosts, each a namespace with a real
``calicnm node run`` (product settings) and BIRD, on one fabric with one etcd.  Endpoints
are made through each host's plugin socket with the calls dockerd makes.  Then, in order:

1. **route** (figure 4): on up to ``route_samples`` hosts, one after the other, the host's
   first endpoint (which claims a new /26 block); the time from CreateEndpoint until every
   other host has a kernel route for that block (read from ``/proc/<pid>/net/route``).
   After three samples time out (30 s each) no more are taken.  The remaining hosts
   get their first endpoint without timing.  Then every host is
   filled up to ``endpoints`` endpoints.
2. **idle** (figure 1): after a settle time, etcd's gRPC messages received per second
   (``grpc_server_msg_received_total``, by method) and each agent's passes per second
   (its status file), over an idle window.
3. **ipset** (figures 2 and 3): ``ipset_samples`` endpoints, one at a time on hosts in
   turn; the time from CreateEndpoint until the address is in the network's tag ipset on
   all N hosts (``ipset test`` in each namespace, hosts still missing it polled in
   parallel), and etcd's bytes sent to clients (``etcd_network_client_grpc_sent_bytes_total``)
   per endpoint created, over the whole phase.
4. **churn** (figures 5 and 6): endpoint creates and deletes at ``churn_rate`` per second
   on random hosts, and a profile rule added or removed (``calicnm profile ... rule``)
   every ``policy_every`` seconds; each node's CPU (utime + stime of the node, its
   children and its BIRD) per change, and at the end each node's RSS.

Every figure is printed and written to ``report.md`` and ``results.json`` (and charts,
with matplotlib) in ``--out`` (default ``bench/results/<UTC time>-scale/``); goals are
marked met or missed with the measured number, never asserted.  Exit status 1 only when
a run could not be measured at all.  Traffic stays on the fabric and its namespaces;
everything started is stopped at the end, also on failure or SIGTERM.

Usage (root, from the repository's root): .venv/bin/python -m bench.scale [--quick]
[--sizes 10,25,50] [--topologies mesh,rr] [--endpoints E] [--churn-rate R] [--out DIR];
``--rewrite DIR`` renders an earlier run's report again from its ``results.json``.
"""

from __future__ import annotations

import argparse
import contextlib
import functools
import ipaddress
import json
import logging
import os
import random
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
import traceback
import uuid
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from bench.report import (
    EN_DASH,
    markdown_table,
    system_info,
    system_info_markdown,
    utc_stamp,
    write_json,
    write_markdown,
)
from calicnm.profiles import tag_ipset
from lab.procs import HarnessError
from lab.sim_cluster import SimCluster, SimHost, Topology, proc_tree_cpu, proc_tree_rss

Json = dict[str, Any]
_log = logging.getLogger("bench.scale")

NETWORK = "scale"
"""The one network (and so profile and tag) every endpoint joins."""
BLOCK_PREFIX = 26
POLL_PAUSE_S = 0.005
CREATE_PARALLEL = 8
CONVERGE_TIMEOUT_S = 30.0
ROUTE_GIVE_UP = 3
"""Route samples timed out after which no more are taken (BGP is not converging)."""
BGP_TIMEOUT_S = 180.0
POLICY_RULE = ("inbound", "allow", "tcp", "to", "ports", "8080")

IDLE_REQUESTS_GOAL = 1.0  # etcd requests/s at idle, all hosts together, keepalives apart
IDLE_PASSES_GOAL = 0.05  # agent passes/s per host at idle (one 30 s resync is 0.033)
FLAT_RATIO = 1.5  # "flat in N": largest N against smallest N
LINEAR_RATIO = 2.0  # "O(N)": per-host bytes at largest N against smallest N
IPSET_P99_GOAL_S = 1.0
ROUTE_P99_GOAL_S = 5.0


@dataclass(frozen=True)
class Params:
    sizes: tuple[int, ...]
    topologies: tuple[Topology, ...]
    endpoints: int
    route_samples: int
    ipset_samples: int
    settle_s: float
    idle_s: float
    churn_s: float
    churn_rate: float
    policy_every: float

    @classmethod
    def make(cls, args: argparse.Namespace) -> Params:
        quick = bool(args.quick)
        sizes = args.sizes or ((5,) if quick else (10, 25, 50))
        topologies: tuple[Topology, ...] = args.topologies or ("mesh", "rr")
        return cls(
            sizes=tuple(sizes),
            topologies=tuple(topologies),
            endpoints=args.endpoints or (2 if quick else 3),
            route_samples=5 if quick else 20,
            ipset_samples=5 if quick else 20,
            settle_s=3.0 if quick else 10.0,
            idle_s=6.0 if quick else 30.0,
            churn_s=8.0 if quick else 30.0,
            churn_rate=args.churn_rate or 2.0,
            policy_every=4.0 if quick else 10.0,
        )


# ---- counters ----------------------------------------------------------------------------------

_METRIC = re.compile(r"^([a-zA-Z_:][a-zA-Z0-9_:]*)(\{[^}]*\})?\s+(\S+)")


def parse_metrics(text: str) -> dict[str, dict[str, float]]:
    """Prometheus text as {metric name: {label text: value}}."""
    found: dict[str, dict[str, float]] = {}
    for line in text.splitlines():
        match = _METRIC.match(line)
        if match is None:
            continue
        try:
            value = float(match[3])
        except ValueError:
            continue
        found.setdefault(match[1], {})[match[2] or ""] = value
    return found


def _label(labels: str, name: str) -> str:
    match = re.search(rf'{name}="([^"]*)"', labels)
    return match[1] if match else ""


@dataclass
class Snapshot:
    """Counters at one moment: etcd's, and each host's agent passes and node CPU."""

    t: float
    received: dict[str, float]
    """gRPC messages etcd received, by method."""
    sent_bytes: float
    passes: list[int | None]
    cpu: list[float]

    @classmethod
    def take(cls, cluster: SimCluster) -> Snapshot:
        metrics = parse_metrics(cluster.etcd_metrics())
        received: dict[str, float] = {}
        for labels, value in metrics.get("grpc_server_msg_received_total", {}).items():
            method = _label(labels, "grpc_method")
            received[method] = received.get(method, 0.0) + value
        sent = sum(metrics.get("etcd_network_client_grpc_sent_bytes_total", {}).values())
        return cls(
            t=time.monotonic(),
            received=received,
            sent_bytes=sent,
            passes=[h.agent_passes() for h in cluster.hosts],
            cpu=[proc_tree_cpu(h.pids()) for h in cluster.hosts],
        )


def deltas(a: Snapshot, b: Snapshot) -> Json:
    span = max(b.t - a.t, 1e-6)
    methods = {m: b.received.get(m, 0.0) - a.received.get(m, 0.0) for m in b.received}
    methods = {m: v for m, v in methods.items() if v}
    keepalive = sum(v for m, v in methods.items() if m == "LeaseKeepAlive")
    passes = [
        (y - x) / span
        for x, y in zip(a.passes, b.passes, strict=True)
        if x is not None and y is not None
    ]
    return {
        "seconds": span,
        "etcd_requests": sum(methods.values()),
        "etcd_requests_per_s": sum(methods.values()) / span,
        "etcd_requests_per_s_without_keepalives": (sum(methods.values()) - keepalive) / span,
        "etcd_requests_by_method": methods,
        "etcd_sent_bytes": b.sent_bytes - a.sent_bytes,
        "passes_per_s_per_host": passes,
        "cpu_s_per_host": [y - x for x, y in zip(a.cpu, b.cpu, strict=True)],
    }


def percentile(values: Sequence[float], q: float) -> float | None:
    """Nearest-rank percentile, or None without values."""
    if not values:
        return None
    ordered = sorted(values)
    rank = max(1, min(len(ordered), round(q / 100 * len(ordered) + 0.5)))
    return ordered[rank - 1]


def summary(values: Sequence[float]) -> Json:
    return {
        "n": len(values),
        "p50": percentile(values, 50),
        "p99": percentile(values, 99),
        "max": max(values) if values else None,
        "mean": sum(values) / len(values) if values else None,
        "values": list(values),
    }


# ---- endpoints ----------------------------------------------------------------------------------


@dataclass
class Endpoint:
    host: int
    id: str
    address: str


@dataclass
class Load:
    """The network, its pool, and every endpoint the run made (by host index)."""

    cluster: SimCluster
    network_id: str
    pool_id: str
    made: list[Endpoint] = field(default_factory=list)
    removable: list[Endpoint] = field(default_factory=list)
    lock: threading.Lock = field(default_factory=threading.Lock)
    failures: list[str] = field(default_factory=list)

    def address(self, host: int) -> str:
        return self.cluster.hosts[host].plugin.request_address(self.pool_id)

    def create(self, host: int, address: str, removable: bool) -> Endpoint:
        """CreateEndpoint then Join on host index ``host`` for ``address``."""
        plugin = self.cluster.hosts[host].plugin
        endpoint = Endpoint(host, uuid.uuid4().hex * 2, address)
        plugin.create_endpoint(self.network_id, endpoint.id, address)
        with self.lock:
            self.made.append(endpoint)
        plugin.join(self.network_id, endpoint.id)
        if removable:
            with self.lock:
                self.removable.append(endpoint)
        return endpoint

    def add(self, host: int, removable: bool = False) -> Endpoint:
        return self.create(host, self.address(host), removable)

    def remove(self, endpoint: Endpoint) -> None:
        plugin = self.cluster.hosts[endpoint.host].plugin
        plugin.remove_endpoint(self.pool_id, self.network_id, endpoint.id, endpoint.address)
        with self.lock:
            self.made.remove(endpoint)


def _route_table(pid: int) -> set[tuple[int, int]]:
    """(destination, mask) of the main table's IPv4 routes in ``pid``'s namespace."""
    try:
        lines = Path(f"/proc/{pid}/net/route").read_text().splitlines()[1:]
    except OSError:
        return set()
    routes = set()
    for line in lines:
        fields = line.split()
        if len(fields) >= 8:
            routes.add((int(fields[1], 16), int(fields[7], 16)))
    return routes


def _proc_key(network: ipaddress.IPv4Network) -> tuple[int, int]:
    """How /proc/net/route spells a destination and mask (host byte order, little-endian)."""
    dest = int.from_bytes(network.network_address.packed, "little")
    mask = int.from_bytes(network.netmask.packed, "little")
    return dest, mask


def _has_route(key: tuple[int, int], host: SimHost) -> bool:
    return host.node is not None and key in _route_table(host.node.pid)


def wait_everywhere(
    hosts: list[SimHost], t0: float, check: Callable[[SimHost], bool]
) -> list[float] | None:
    """Poll ``check(host)`` for the hosts still missing, round after round (a check is
    a file read or one line to an ``ipset -`` probe: a round of 50 hosts takes a few
    ms), until every host passes; each host's time is when its first passing check
    returned, from ``t0``.  None after :data:`CONVERGE_TIMEOUT_S`."""
    seen: dict[int, float] = {}
    deadline = t0 + CONVERGE_TIMEOUT_S
    while time.monotonic() < deadline:
        for i, host in enumerate(hosts):
            if i not in seen and check(host):
                seen[i] = time.monotonic() - t0
        if len(seen) == len(hosts):
            return [seen[i] for i in range(len(hosts))]
        time.sleep(POLL_PAUSE_S)
    return None


def route_phase(load: Load, params: Params, pool: ThreadPoolExecutor) -> Json:
    """Figure 4, then every host's first endpoint and the rest up to ``params.endpoints``."""
    hosts = load.cluster.hosts
    samples: list[float] = []
    timeouts = 0
    measured = min(params.route_samples, len(hosts))
    each: list[float] = []
    for index in range(measured):
        address = load.address(index)
        block = ipaddress.IPv4Network(f"{address}/{BLOCK_PREFIX}", strict=False)
        key = _proc_key(block)
        others = [h for i, h in enumerate(hosts) if i != index]
        t0 = time.monotonic()
        error = _try(functools.partial(load.create, index, address, False))
        if error:
            load.failures.append(error)
            continue
        times = wait_everywhere(others, t0, functools.partial(_has_route, key))
        if times is None:
            timeouts += 1
            if timeouts >= ROUTE_GIVE_UP:
                _log.warning("%d route samples timed out: no more are taken", timeouts)
                break
        elif times:
            samples.append(max(times))
            each.extend(times)
    rest = [i for i in range(len(hosts)) if not any(e.host == i for e in load.made)]
    rest += [i for i in range(len(hosts)) for _ in range(params.endpoints - 1)]
    for error in pool.map(lambda i: _try(lambda: load.add(i)), rest):
        if error:
            load.failures.append(error)
    return {**summary(samples), "timeouts": timeouts, "each_host": summary(each)}


def _try(action: Any) -> str | None:
    try:
        action()
    except Exception as exc:  # a failed call is counted, the run goes on
        return f"{type(exc).__name__}: {exc}"
    return None


def ipset_phase(load: Load, params: Params) -> tuple[Json, Json]:
    """Figure 3 (and the snapshot pair for figure 2) over ``params.ipset_samples`` creates."""
    cluster = load.cluster
    hosts = cluster.hosts
    ipset = tag_ipset(NETWORK)
    samples: list[float] = []
    timeouts = 0
    before = Snapshot.take(cluster)
    created = 0
    each: list[float] = []
    for k in range(params.ipset_samples):
        times, error = _ipset_sample(load, (k * 7) % len(hosts), ipset)
        if error:
            load.failures.append(error)
            continue
        created += 1
        if times is None:
            timeouts += 1
        else:
            samples.append(max(times))
            each.extend(times)
    after = Snapshot.take(cluster)
    traffic = deltas(before, after)
    traffic["endpoints_created"] = created
    return {**summary(samples), "timeouts": timeouts, "each_host": summary(each)}, traffic


def _ipset_sample(load: Load, index: int, ipset: str) -> tuple[list[float] | None, str | None]:
    """One endpoint on host ``index``, polled for in ``ipset`` on every host from just
    before its CreateEndpoint: (each host's time or None on timeout, the call's error)."""
    hosts = load.cluster.hosts
    address = load.address(index)
    t0 = time.monotonic()
    outcome: dict[str, list[float] | None] = {}

    def poll() -> None:
        outcome["times"] = wait_everywhere(hosts, t0, functools.partial(_member_of, ipset, address))

    poller = threading.Thread(target=poll)
    poller.start()
    error = _try(lambda: load.create(index, address, removable=True))
    poller.join(CONVERGE_TIMEOUT_S + 15)
    return outcome.get("times"), error


def _member_of(ipset: str, address: str, host: SimHost) -> bool:
    return host.in_ipset(ipset, address)


def churn_phase(load: Load, params: Params) -> Json:
    """Creates and deletes at ``churn_rate``/s and a policy edit every ``policy_every`` s."""
    cluster = load.cluster
    rng = random.Random(len(cluster.hosts))
    counts = {"creates": 0, "deletes": 0, "policy": 0, "failed": 0}
    before = Snapshot.take(cluster)
    start = time.monotonic()
    end = start + params.churn_s
    next_policy = start + params.policy_every / 2
    rule_on = False
    step = 0
    while True:
        now = time.monotonic()
        if now >= end:
            break
        if now >= next_policy:
            verb = "remove" if rule_on else "add"
            done = cluster.cli("profile", NETWORK, "rule", verb, *POLICY_RULE, check=False)
            counts["policy" if done.returncode == 0 else "failed"] += 1
            rule_on = not rule_on
            next_policy += params.policy_every
        with load.lock:
            victims = list(load.removable)
        if step % 2 and victims:
            victim = rng.choice(victims)
            with load.lock:
                load.removable.remove(victim)
            error = _try(functools.partial(load.remove, victim))
            counts["deletes" if error is None else "failed"] += 1
        else:
            error = _try(lambda: load.add(rng.randrange(len(cluster.hosts)), removable=True))
            counts["creates" if error is None else "failed"] += 1
        if error:
            load.failures.append(error)
        step += 1
        pause = start + step / params.churn_rate - time.monotonic()
        if pause > 0:
            time.sleep(min(pause, max(0.0, end - time.monotonic())))
    after = Snapshot.take(cluster)
    traffic = deltas(before, after)
    changes = counts["creates"] + counts["deletes"] + counts["policy"]
    cpu_ms = [1000 * c / changes for c in traffic["cpu_s_per_host"]] if changes else []
    rss = [proc_tree_rss(h.pids()) / 2**20 for h in cluster.hosts]
    return {
        **counts,
        "changes": changes,
        "traffic": traffic,
        "cpu_ms_per_change_per_host": summary(cpu_ms),
        "etcd_bytes_per_change": traffic["etcd_sent_bytes"] / changes if changes else None,
        "rss_mib_per_host": summary(rss),
    }


def run_one(n: int, topology: Topology, params: Params, workdir: Path) -> Json:
    """One cluster of ``n`` hosts: every phase, its figures as JSON."""
    result: Json = {"n": n, "topology": topology, "endpoints_per_host": params.endpoints}
    t_start = time.monotonic()
    with SimCluster(workdir, n, topology) as cluster:
        result["start_s"] = time.monotonic() - t_start
        result["started"] = cluster.inventory()
        result["bgp_established"] = cluster.wait_bgp(BGP_TIMEOUT_S)
        result["bgp_s"] = time.monotonic() - t_start - result["start_s"]
        network_id = uuid.uuid4().hex * 2
        pool_id = cluster.hosts[0].plugin.create_network(network_id)
        cluster.name_network(network_id, NETWORK)
        load = Load(cluster, network_id, pool_id)
        with ThreadPoolExecutor(CREATE_PARALLEL) as pool:
            _log.info("N=%d %s: route convergence", n, topology)
            result["route"] = route_phase(load, params, pool)
            time.sleep(params.settle_s)
            _log.info("N=%d %s: idle window %.0f s", n, topology, params.idle_s)
            before = Snapshot.take(cluster)
            time.sleep(params.idle_s)
            idle = deltas(before, Snapshot.take(cluster))
            passes = idle["passes_per_s_per_host"]
            idle["passes_per_s_per_host_max"] = max(passes, default=None)
            idle["passes_per_s_per_host_mean"] = sum(passes) / len(passes) if passes else None
            idle["cpu_percent_per_host_mean"] = (
                100 * sum(idle["cpu_s_per_host"]) / len(idle["cpu_s_per_host"]) / idle["seconds"]
            )
            result["idle"] = idle
            _log.info("N=%d %s: ipset convergence", n, topology)
            result["ipset"], create = ipset_phase(load, params)
        created = create["endpoints_created"]
        # The idle traffic (periodic reads) goes on meanwhile: taken off at the idle rate.
        background = idle["etcd_sent_bytes"] / idle["seconds"] * create["seconds"]
        create["background_bytes"] = background
        create["bytes_per_endpoint_raw"] = create["etcd_sent_bytes"] / created if created else None
        create["bytes_per_endpoint"] = (
            (create["etcd_sent_bytes"] - background) / created if created else None
        )
        create["bytes_per_endpoint_per_host"] = (
            create["bytes_per_endpoint"] / n if created else None
        )
        result["create"] = create
        _log.info("N=%d %s: churn %.0f s", n, topology, params.churn_s)
        result["churn"] = churn_phase(load, params)
        result["started"]["processes"] += cluster.inventory()["processes"]
        result["endpoints_at_end"] = len(load.made)
        result["failures"] = load.failures[:20]
        result["failure_count"] = len(load.failures)
    result["total_s"] = time.monotonic() - t_start
    return result


# ---- report --------------------------------------------------------------------------------------


def _f(value: float | None, fmt: str = ".2f") -> str:
    return EN_DASH if value is None else format(value, fmt)


def change_cpu_ms(run: Json) -> float | None:
    """Mean agent CPU per change per host with the idle CPU (at the idle window's rate)
    taken off: the churn window's changes are few at large N, and a node's idle CPU
    (periodic reads, BIRD) would otherwise be counted as theirs."""
    idle, churn = run["idle"], run["churn"]
    if not churn["changes"]:
        return None
    traffic = churn["traffic"]
    net = [
        c - i / idle["seconds"] * traffic["seconds"]
        for c, i in zip(traffic["cpu_s_per_host"], idle["cpu_s_per_host"], strict=True)
    ]
    return 1000 * sum(net) / len(net) / churn["changes"] if net else None


def figure_rows(runs: list[Json]) -> list[tuple[str, ...]]:
    rows = []
    for r in runs:
        if "error" in r:
            rows.append((r["topology"], str(r["n"]), *[EN_DASH] * 10))
            continue
        idle, create, churn = r["idle"], r["create"], r["churn"]
        rows.append(
            (
                r["topology"],
                str(r["n"]),
                _f(idle["etcd_requests_per_s_without_keepalives"]),
                _f(idle["etcd_requests_per_s"]),
                _f(idle["passes_per_s_per_host_mean"], ".3f"),
                _f(create["bytes_per_endpoint"], ".0f"),
                _f(create["bytes_per_endpoint_per_host"], ".0f"),
                f"{_f(r['ipset']['p50'])} / {_f(r['ipset']['p99'])}",
                f"{_f(r['route']['p50'])} / {_f(r['route']['p99'])}",
                _f(change_cpu_ms(r), ".1f"),
                _f(churn["rss_mib_per_host"]["mean"], ".0f"),
                _f(idle["cpu_percent_per_host_mean"], ".2f"),
            )
        )
    return rows


FIGURE_HEADER = (
    "topology",
    "N",
    "etcd req/s idle (no keepalives)",
    "etcd req/s idle (all)",
    "agent passes/s/host idle (mean)",
    "etcd bytes sent / endpoint created (idle traffic taken off)",
    "... per host",
    "ipset all hosts p50 / p99 s",
    "route all hosts p50 / p99 s",
    "agent CPU ms / change / host (idle CPU taken off)",
    "node RSS MiB / host",
    "idle CPU % / host",
)


def _ok(met: bool | None) -> str:
    return EN_DASH if met is None else ("met" if met else "missed")


def _ends(runs: list[Json], topology: str) -> tuple[Json | None, Json | None]:
    mine = sorted(
        (r for r in runs if r["topology"] == topology and "error" not in r), key=lambda r: r["n"]
    )
    return (mine[0], mine[-1]) if mine else (None, None)


def verdicts(runs: list[Json]) -> list[tuple[str, str, str, str]]:
    """(goal, topology, measured, met/missed) for every goal and topology."""
    rows: list[tuple[str, str, str, str]] = []
    for topology in sorted({r["topology"] for r in runs}):
        small, large = _ends(runs, topology)
        if small is None or large is None:
            rows.append(("every goal", topology, "not measured", _ok(None)))
            continue
        span = f"N={small['n']}{EN_DASH}{large['n']}"
        several = small["n"] != large["n"]  # a trend needs two sizes
        ok_runs = [r for r in runs if r["topology"] == topology and "error" not in r]
        req = [r["idle"]["etcd_requests_per_s_without_keepalives"] for r in ok_runs]
        rows.append(
            (
                f"etcd requests/s at idle about 0 (<= {IDLE_REQUESTS_GOAL} without keepalives)",
                topology,
                ", ".join(f"{v:.2f}" for v in req),
                _ok(max(req) <= IDLE_REQUESTS_GOAL),
            )
        )
        passes = [r["idle"]["passes_per_s_per_host_mean"] or 0.0 for r in ok_runs]
        rows.append(
            (
                f"agent passes/s per host at idle about 0 (<= {IDLE_PASSES_GOAL})",
                topology,
                ", ".join(f"{v:.3f}" for v in passes),
                _ok(max(passes) <= IDLE_PASSES_GOAL),
            )
        )
        a = small["create"]["bytes_per_endpoint_per_host"]
        b = large["create"]["bytes_per_endpoint_per_host"]
        linear = None if a is None or b is None or a <= 0 or not several else b / a <= LINEAR_RATIO
        rows.append(
            (
                f"etcd bytes per endpoint created O(N): per-host share at largest/smallest N "
                f"<= {LINEAR_RATIO}",
                topology,
                f"{_f(a, '.0f')} B -> {_f(b, '.0f')} B per host ({span})",
                _ok(linear),
            )
        )
        for key, goal, label in (
            ("ipset", IPSET_P99_GOAL_S, "address in the tag ipset on all hosts"),
            ("route", ROUTE_P99_GOAL_S, "new block routed on all other hosts"),
        ):
            p99 = large[key]["p99"]
            timeouts = large[key]["timeouts"]
            met = (
                (p99 <= goal and timeouts == 0)
                if p99 is not None
                else (False if timeouts else None)
            )
            rows.append(
                (
                    f"{label}: p99 <= {goal:g} s at N={large['n']}",
                    topology,
                    f"p99 {_f(p99)} s, {timeouts} timed out",
                    _ok(met),
                )
            )
        ca, cb = change_cpu_ms(small), change_cpu_ms(large)
        flat = None if ca is None or cb is None or ca <= 0 or not several else cb / ca <= FLAT_RATIO
        rows.append(
            (
                f"agent CPU per endpoint change per host flat in N (ratio <= {FLAT_RATIO})",
                topology,
                f"{_f(ca, '.1f')} ms -> {_f(cb, '.1f')} ms ({span})",
                _ok(flat),
            )
        )
        rows.append(
            (
                "node RSS per host (reported)",
                topology,
                ", ".join(
                    f"{_f(r['churn']['rss_mib_per_host']['mean'], '.0f')} MiB" for r in ok_runs
                ),
                "reported",
            )
        )
    return rows


def convergence_lines(runs: list[Json]) -> list[str]:
    """Each host's own time next to the all-hosts time, and the CPU floor: every agent of
    the simulation shares this machine's cores, so a change reaches the last of N hosts
    no sooner than N x (agent CPU per change) / cores."""
    cores = os.cpu_count() or 1
    lines = []
    for r in runs:
        if "error" in r:
            continue
        cpu = change_cpu_ms(r)
        floor = None if cpu is None else r["n"] * cpu / 1000 / cores
        parts = []
        for key in ("ipset", "route"):
            mine = r[key].get("each_host", {})
            parts.append(
                f"{key}: all hosts p50 {_f(r[key]['p50'])} / p99 {_f(r[key]['p99'])} s, "
                f"each host p50 {_f(mine.get('p50'))} / p99 {_f(mine.get('p99'))} s"
            )
        lines.append(
            f"- {r['topology']} N={r['n']}: {'; '.join(parts)}; CPU floor for all N hosts "
            f"{_f(floor)} s ({cores} cores)"
        )
    return lines


def _methods(counts: dict[str, float], per: float, unit: str) -> str:
    if not counts or per <= 0:
        return EN_DASH
    return ", ".join(f"{m} {v / per:.2f}" for m, v in sorted(counts.items())) + f" {unit}"


def method_lines(runs: list[Json]) -> list[str]:
    """Where etcd's requests came from: gRPC messages received by method, per run."""
    lines = []
    for r in runs:
        if "error" in r:
            continue
        idle, create, churn = r["idle"], r["create"], r["churn"]
        idle_rate = _methods(idle["etcd_requests_by_method"], idle["seconds"], "per s")
        per_endpoint = _methods(
            create["etcd_requests_by_method"], create["endpoints_created"], "per endpoint"
        )
        per_change = _methods(
            churn["traffic"]["etcd_requests_by_method"], churn["changes"], "per change"
        )
        lines.append(
            f"- {r['topology']} N={r['n']}: idle {idle_rate}; creating {per_endpoint}; "
            f"churn {per_change} ({churn['creates']} creates, {churn['deletes']} deletes, "
            f"{churn['policy']} rule edits)"
        )
    return lines


def charts(runs: list[Json], out: Path) -> list[str]:
    """cost-vs-n.png and convergence.png; [] without matplotlib."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return []
    ok = [r for r in runs if "error" not in r]
    topologies = sorted({r["topology"] for r in ok})
    panels: tuple[tuple[str, Callable[[Json], float | None]], ...] = (
        (
            "etcd requests/s at idle (no keepalives)",
            lambda r: r["idle"]["etcd_requests_per_s_without_keepalives"],
        ),
        ("agent passes/s per host at idle", lambda r: r["idle"]["passes_per_s_per_host_mean"]),
        ("etcd bytes sent per endpoint created", lambda r: r["create"]["bytes_per_endpoint"]),
        (
            "agent CPU ms per change per host",
            change_cpu_ms,
        ),
        ("node RSS MiB per host", lambda r: r["churn"]["rss_mib_per_host"]["mean"]),
        ("idle CPU % per host", lambda r: r["idle"]["cpu_percent_per_host_mean"]),
    )
    fig, axes = plt.subplots(2, 3, figsize=(15, 8))
    for ax, (title, get) in zip(axes.flat, panels, strict=True):
        for topology in topologies:
            mine = sorted((r for r in ok if r["topology"] == topology), key=lambda r: r["n"])
            points = [(r["n"], get(r)) for r in mine if get(r) is not None]
            ax.plot([p[0] for p in points], [p[1] for p in points], marker="o", label=topology)
        ax.set_title(title, fontsize=10)
        ax.set_xlabel("hosts (N)")
        ax.set_ylim(bottom=0)
        ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(out / "cost-vs-n.png", dpi=110)
    plt.close(fig)
    fig, axes = plt.subplots(1, 2, figsize=(13, 5))
    for ax, (key, goal, title) in zip(
        axes,
        (
            ("ipset", IPSET_P99_GOAL_S, "CreateEndpoint -> address in tag ipset on all hosts"),
            ("route", ROUTE_P99_GOAL_S, "first endpoint in a block -> route on all other hosts"),
        ),
        strict=True,
    ):
        for r in ok:
            values = sorted(r[key]["values"])
            if values:
                ys = [(i + 1) / len(values) for i in range(len(values))]
                ax.step(values, ys, where="post", label=f"{r['topology']} N={r['n']}")
        ax.axvline(goal, color="grey", linestyle="--", lw=1)
        ax.set_title(title, fontsize=10)
        ax.set_xlabel("seconds")
        ax.set_ylabel("fraction of samples")
        ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(out / "convergence.png", dpi=110)
    plt.close(fig)
    return ["cost-vs-n.png", "convergence.png"]


def write_report(out: Path, params: Params, runs: list[Json]) -> None:
    images = charts(runs, out)
    goals = verdicts(runs)
    write_json(
        out / "results.json", {"params": asdict(params), "system": system_info(), "runs": runs}
    )
    sections = [
        ("Machine", system_info_markdown(system_info())),
        (
            "Settings",
            f"sizes {list(params.sizes)}, topologies {list(params.topologies)}, "
            f"{params.endpoints} endpoints per host, churn {params.churn_rate}/s for "
            f"{params.churn_s:.0f} s with a rule edit every {params.policy_every:.0f} s, idle "
            f"window {params.idle_s:.0f} s, {params.route_samples} route samples and "
            f"{params.ipset_samples} ipset samples per run; node product settings, no dockerd.",
        ),
        ("Figures", markdown_table(FIGURE_HEADER, figure_rows(runs))),
        ("Goals", markdown_table(("goal", "topology", "measured", "verdict"), goals)),
        (
            "Runs",
            "\n".join(
                f"- {r['topology']} N={r['n']}: "
                + (
                    f"error: {r['error']}"
                    if "error" in r
                    else f"start {r['start_s']:.0f} s "
                    f"({r['started'].get('node_restarts_at_start', 0)} nodes started again), "
                    f"BGP up after {r['bgp_s']:.0f} s "
                    f"({'all' if r['bgp_established'] else 'NOT all'} sessions), "
                    f"{r['churn']['changes']} changes in churn, {r['failure_count']} failed calls, "
                    f"total {r['total_s']:.0f} s"
                )
                for r in runs
            ),
        ),
    ]
    sections.append(("Convergence in detail", "\n".join(convergence_lines(runs))))
    sections.append(("etcd requests by method", "\n".join(method_lines(runs))))
    if images:
        sections.append(("Charts", "\n\n".join(f"![{i}]({i})" for i in images)))
    write_markdown(out / "report.md", sections, title="calicnm scale benchmark (simulated cluster)")


# ---- main -------------------------------------------------------------------------------------


def _terminate(signum: int, _frame: object) -> None:
    """SIGTERM unwinds like an exception, so every cluster is torn down."""
    raise SystemExit(128 + signum)


def _ints(text: str) -> tuple[int, ...]:
    return tuple(int(x) for x in text.split(",") if x)


def _topologies(text: str) -> tuple[Topology, ...]:
    chosen = tuple(t for t in text.split(",") if t)
    for t in chosen:
        if t not in ("mesh", "rr"):
            raise argparse.ArgumentTypeError(f"unknown topology {t!r} (mesh, rr)")
    return chosen  # type: ignore[return-value]


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="bench.scale", description=__doc__.split("\n")[1])
    parser.add_argument("--quick", action="store_true", help="N=5, short windows")
    parser.add_argument("--sizes", type=_ints, help="comma-separated N (default 10,25,50)")
    parser.add_argument("--topologies", type=_topologies, help="mesh,rr (default both)")
    parser.add_argument("--endpoints", type=int, help="endpoints per host")
    parser.add_argument("--churn-rate", type=float, help="endpoint changes per second")
    parser.add_argument("--out", help="report directory")
    parser.add_argument(
        "--rewrite", metavar="DIR", help="only render DIR's report and charts from its results.json"
    )
    args = parser.parse_args(argv)
    if args.rewrite:
        saved = json.loads((Path(args.rewrite) / "results.json").read_text())
        write_report(Path(args.rewrite), Params(**saved["params"]), saved["runs"])
        return 0
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s")
    signal.signal(signal.SIGTERM, _terminate)
    params = Params.make(args)
    out = Path(args.out or f"bench/results/{utc_stamp()}-scale")
    out.mkdir(parents=True, exist_ok=True)
    runs: list[Json] = []
    for topology in params.topologies:
        for n in params.sizes:
            # A short path: BIRD's control socket lives in each host's state directory,
            # and a unix socket path must fit in 107 bytes (a long --out would not).
            workdir = Path(tempfile.mkdtemp(prefix=f"cnms-{topology}{n}-"))
            try:
                runs.append(run_one(n, topology, params, workdir))
                shutil.rmtree(workdir, ignore_errors=True)  # etcd's data and node logs
            except (HarnessError, OSError, subprocess.SubprocessError, AssertionError) as exc:
                _log.error("N=%d %s failed: %s", n, topology, exc)
                runs.append(
                    {
                        "n": n,
                        "topology": topology,
                        "error": f"{type(exc).__name__}: {exc}",
                        "trace": traceback.format_exc()[-3000:],
                    }
                )
            write_report(out, params, runs)
    with contextlib.suppress(OSError):
        (out / "work").rmdir()  # empty unless a run failed (its logs are kept)
    print(markdown_table(FIGURE_HEADER, figure_rows(runs)))
    print(markdown_table(("goal", "topology", "measured", "verdict"), verdicts(runs)))
    print(f"report: {out / 'report.md'}")
    return 0 if any("error" not in r for r in runs) else 1


if __name__ == "__main__":
    sys.exit(main())
