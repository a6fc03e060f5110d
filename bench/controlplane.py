#!/usr/bin/env python3
"""Control-plane benchmark of calicnm, each figure next to a baseline measured in the same run.

1. ``docker run`` to first successful connection, on a calicnm network and on Docker's
   built-in bridge network, on one emulated host (netns + dockerd + calicnm node).  A busybox
   httpd already runs on each network; the timed command is ``docker run --rm --net N busybox
   sh -c 'until wget ...'`` (a bounded loop), from invocation until it exits 0.
   Goal: calicnm <= bridge + 150 ms.
2. IPAM allocations per second through ``Allocator.assign`` against raw compare-and-swap (a
   read plus a revision-compared ``Txn`` put, the floor any CAS allocator pays) on the same
   throwaway loopback etcd; then two "hosts" (two processes) allocating from one pool at once,
   against two processes doing raw CAS at once, with a check that no address was handed out
   twice.  Goal: IPAM >= 0.8 of raw CAS throughput.
3. Policy: ``bench/policy_bench.py`` as a subprocess (``python -m bench.policy_bench``: rule
   change -> kernel, full resync, rule count), its printed figures parsed.

Prints a table and writes ``controlplane.md`` and ``controlplane.json`` into ``--out``
(default ``bench/results/<UTC timestamp>/``).  Never fails on a number: exit status 1 only
when a case could not be measured at all.  Traffic stays between containers of the emulated
host and loopback; everything started here is stopped at the end, also on failure.

Usage (root, from the repository's root): .venv/bin/python -m bench.controlplane [--quick]
[--out DIR]
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import ipaddress
import logging
import multiprocessing
import os
import queue
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import time
import traceback
from collections import Counter
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from bench.report import (
    EN_DASH,
    format_ratio,
    format_spread,
    markdown_table,
    median_spread,
    ratio,
    system_info,
    system_info_markdown,
    utc_stamp,
    write_json,
    write_markdown,
)
from calicnm.ipam import Allocator, PoolRef
from calicnm.model import Pool
from calicnm.store.etcd import EtcdStore, parse_endpoints
from calicnm.store.kv import ABSENT, KV, Store, Txn
from lab.cluster import CalicnmHost, single_host
from lab.etcd import EtcdServer
from lab.images import DEFAULT_IMAGE
from lab.paths import REPO
from lab.procs import run_bounded

DOCKER_GOAL_MS = 150.0
IPAM_GOAL_RATIO = 0.8
POLICY_P99_TARGET_MS = 200.0  # README "Policy performance" targets
RESYNC_TARGET_MS = 2000.0

CLIENT_TRIES = 200
CLIENT_PAUSE_S = 0.02
CLIENT_TIMEOUT_S = 300.0  # worst case of the in-container loop: 200 x (1 s + 20 ms)
BENCH_POOL = ipaddress.IPv4Network("10.64.0.0/16")
WORKER_TIMEOUT_S = 300.0

Json = dict[str, Any]
Row = tuple[str, ...]
_log = logging.getLogger("bench.controlplane")


# ---- settings, statistics, system -------------------------------------------------------------


@dataclass(frozen=True)
class Settings:
    quick: bool
    docker_runs: int
    allocations: int
    ipam_rounds: int
    policy_args: tuple[str, ...]
    policy_timeout_s: float

    @classmethod
    def make(cls, quick: bool) -> Settings:
        if quick:
            policy = ("--endpoints", "100", "--profiles", "10", "--changes", "10")
            return cls(True, 3, 50, 3, policy, 300.0)
        return cls(False, 20, 500, 5, ("--endpoints", "1000", "--profiles", "50"), 1200.0)


def stat(values: Sequence[float]) -> Json | None:
    """Median with spread (and the samples) as JSON, or None when nothing was measured."""
    if not values:
        return None
    med, low, high = median_spread(values)
    return {"median": med, "min": low, "max": high, "n": len(values), "values": list(values)}


def median_of(summary: Json | None) -> float | None:
    return None if summary is None else float(summary["median"])


def _first_line(argv: Sequence[str]) -> str:
    try:
        proc = subprocess.run(list(argv), capture_output=True, text=True, timeout=30, check=False)
    except (OSError, subprocess.TimeoutExpired) as exc:
        return f"unknown ({exc})"
    lines = (proc.stdout or proc.stderr).strip().splitlines()
    return lines[0] if lines else "unknown"


def bench_system_info() -> Json:
    """``report.system_info()`` plus the versions measured here and the load at the start."""
    return {
        **system_info(),
        "dockerd": _first_line(["dockerd", "--version"]),
        "etcd": _first_line(["etcd", "--version"]),
        "iptables": _first_line(["iptables", "--version"]),
        "loadavg_1m_start": round(os.getloadavg()[0], 2),
    }


# ---- 1. docker run to first connection ---------------------------------------------------

# The client prints "<failed tries> <uptime at success>"; /proc/uptime is CLOCK_BOOTTIME,
# shared with the host, so the moment of the first connection can be placed (10 ms grain).
CLIENT_LOOP = (
    "i=0; until busybox timeout 1 wget -q -O /tmp/f {url}; do "
    "i=$((i+1)); [ $i -ge {tries} ] && exit 1; sleep {pause}; done; "
    "echo $i $(cut -d' ' -f1 /proc/uptime)"
)
SERVER = "mkdir -p /www && echo hello > /www/index.html && exec httpd -f -p 80 -h /www"


@dataclass(frozen=True)
class RunSample:
    total_ms: float
    connected_ms: float
    failed_tries: int


def start_server(host: CalicnmHost, network: str) -> str:
    name = f"web-{network}"
    host.docker("run", "-d", "--net", network, "--name", name, DEFAULT_IMAGE, "sh", "-c", SERVER)
    return f"http://{host.ip_of(name, network)}/index.html"


def timed_run(host: CalicnmHost, network: str, url: str) -> RunSample | None:
    """One ``docker run --rm`` client until its first successful fetch; None if it failed."""
    script = CLIENT_LOOP.format(url=url, tries=CLIENT_TRIES, pause=CLIENT_PAUSE_S)
    argv = ("run", "--rm", "--net", network, DEFAULT_IMAGE, "sh", "-c", script)
    boot0 = time.clock_gettime(time.CLOCK_BOOTTIME)
    t0 = time.perf_counter()
    try:
        result = host.dockerd.docker(*argv, check=False, timeout=CLIENT_TIMEOUT_S)
    except subprocess.TimeoutExpired:
        return None
    total = time.perf_counter() - t0
    fields = result.stdout.split()
    if result.returncode != 0 or len(fields) != 2:
        _log.warning("client on %s failed (%s): %s", network, result.returncode, result.stderr)
        return None
    return RunSample(total * 1e3, (float(fields[1]) - boot0) * 1e3, int(fields[0]))


def summarize_runs(samples: list[RunSample], failures: int) -> Json:
    return {
        "total_ms": stat([s.total_ms for s in samples]),
        "connected_ms": stat([s.connected_ms for s in samples]),
        "failed_tries": stat([float(s.failed_tries) for s in samples]),
        "failures": failures,
    }


def measure_docker(host: CalicnmHost, runs: int) -> Json:
    networks = {"calicnm": "cnmbench", "bridge": "brbench"}
    host.create_network(networks["calicnm"])
    host.docker("network", "create", "-d", "bridge", networks["bridge"])
    urls = {kind: start_server(host, net) for kind, net in networks.items()}
    for kind, net in networks.items():  # warm-up, not counted; proves the server answers
        timed_run(host, net, urls[kind])
    samples: dict[str, list[RunSample]] = {kind: [] for kind in networks}
    failures = dict.fromkeys(networks, 0)
    kinds = list(networks)
    for i in range(runs):  # interleaved, alternating order, so drift hits both alike
        for kind in kinds if i % 2 == 0 else kinds[::-1]:
            sample = timed_run(host, networks[kind], urls[kind])
            if sample is None:
                failures[kind] += 1
            else:
                samples[kind].append(sample)
    return {kind: summarize_runs(samples[kind], failures[kind]) for kind in kinds}


def docker_case(settings: Settings, _out: Path) -> Json:
    workdir = Path(tempfile.mkdtemp(prefix="cnmt-bench-"))
    try:
        # The node at its product defaults (INFO logs, 30 s resync), not the tests' settings.
        with single_host(workdir, "bench1", node_settings="product") as host:
            result = measure_docker(host, settings.docker_runs)
    finally:
        shutil.rmtree(workdir, ignore_errors=True)
    calicnm = median_of(result["calicnm"]["total_ms"])
    bridge = median_of(result["bridge"]["total_ms"])
    result["runs"] = settings.docker_runs
    result["diff_ms"] = None if calicnm is None or bridge is None else calicnm - bridge
    result["ratio"] = ratio(calicnm, bridge)
    return result


# ---- 2. IPAM against raw compare-and-swap ------------------------------------------------


@contextlib.contextmanager
def loopback_etcd() -> Iterator[str]:
    """A throwaway single-member etcd on loopback; yields its client URL."""
    with EtcdServer() as etcd:
        yield etcd.url


def reset_store(store: EtcdStore) -> None:
    """Empty calicnm's and this benchmark's keys, then add the benchmark pool."""
    for prefix in ("/calicnm/", "/bench/"):
        for kv in store.list(prefix):
            store.delete(kv.key)
    Allocator(store, "bench-setup").add_pool(Pool(BENCH_POOL))


class CountingStore:
    """``Store`` over another store, counting etcd round trips by kind."""

    def __init__(self, inner: Store) -> None:
        self._inner = inner
        self.calls: Counter[str] = Counter()

    def get(self, key: str) -> KV | None:
        self.calls["get"] += 1
        return self._inner.get(key)

    def list(self, prefix: str) -> list[KV]:
        self.calls["list"] += 1
        return self._inner.list(prefix)

    def put(self, key: str, value: str) -> None:
        self.calls["put"] += 1
        self._inner.put(key, value)

    def delete(self, key: str) -> bool:
        self.calls["delete"] += 1
        return self._inner.delete(key)

    def commit(self, txn: Txn) -> int:
        self.calls["commit"] += 1
        return self._inner.commit(txn)

    def close(self) -> None:
        self._inner.close()


def raw_cas_loop(store: Store, key: str, count: int) -> list[float]:
    """``count`` successful read + compare-on-revision puts; seconds each (with retries)."""
    durations: list[float] = []
    t0 = time.perf_counter()
    for _ in range(count * 100):  # bounded even if another writer kept winning
        kv = store.get(key)
        txn = Txn(compare=[(key, kv.revision if kv else ABSENT)], puts=[(key, str(t0))])
        if store.commit(txn):
            now = time.perf_counter()
            durations.append(now - t0)
            t0 = now
            if len(durations) == count:
                break
    return durations


def ipam_loop(store: Store, host: str, count: int) -> tuple[list[float], list[str]]:
    """``count`` calls of ``Allocator.assign``; seconds each and the addresses handed out."""
    allocator = Allocator(store, host)
    durations: list[float] = []
    addresses: list[str] = []
    for i in range(count):
        t0 = time.perf_counter()
        addresses.append(str(allocator.assign(PoolRef(), f"{host}-{i}")))
        durations.append(time.perf_counter() - t0)
    return durations, addresses


def timed_loop(store: Store, mode: str, host: str, count: int) -> Json:
    t0 = time.monotonic()
    if mode == "ipam":
        durations, addresses = ipam_loop(store, host, count)
    else:
        durations, addresses = raw_cas_loop(store, f"/bench/cas/{host}", count), []
    end = time.monotonic()
    return {"start": t0, "end": end, "durations": durations, "addresses": addresses}


def tenth_rates(durations: list[float]) -> tuple[float, float]:
    """Allocations per second over the first and the last tenth of a round."""
    k = max(1, len(durations) // 10)
    return k / sum(durations[:k]), k / sum(durations[-k:])


def ipam_single(url: str, settings: Settings) -> Json:
    n = settings.allocations
    rates: dict[str, list[float]] = {"raw_cas": [], "ipam": []}
    first, last = [], []
    calls: dict[str, Counter[str]] = {"raw_cas": Counter(), "ipam": Counter()}
    store = EtcdStore(parse_endpoints(url))
    try:
        for r in range(settings.ipam_rounds):
            for mode in ("raw_cas", "ipam") if r % 2 == 0 else ("ipam", "raw_cas"):
                reset_store(store)
                counting = CountingStore(store)
                run = timed_loop(counting, mode, "bench-h1", n)
                rates[mode].append(len(run["durations"]) / (run["end"] - run["start"]))
                calls[mode].update(counting.calls)
                if mode == "ipam":
                    head, tail = tenth_rates(run["durations"])
                    first.append(head)
                    last.append(tail)
    finally:
        store.close()
    ipam, raw = stat(rates["ipam"]), stat(rates["raw_cas"])
    return {
        "allocations": n,
        "rounds": settings.ipam_rounds,
        "ipam_per_s": ipam,
        "raw_cas_per_s": raw,
        "ratio": ratio(median_of(ipam), median_of(raw)),
        "ipam_first_tenth_per_s": stat(first),
        "ipam_last_tenth_per_s": stat(last),
        "etcd_calls_per_allocation": {
            mode: {kind: count / (n * settings.ipam_rounds) for kind, count in c.items()}
            for mode, c in calls.items()
        },
    }


def host_worker(
    url: str, mode: str, host: str, count: int, inbox: Any, start: Any, outbox: Any
) -> None:
    """One "host" process: connect, report ready, wait for the start signal, run the loop."""
    store = EtcdStore(parse_endpoints(url))
    try:
        store.get("/bench/warm")  # open the channel before the clock starts
        inbox.put(host)
        if not start.wait(60):
            raise RuntimeError("no start signal within 60 s")
        outbox.put({"host": host, **timed_loop(store, mode, host, count)})
    except Exception as exc:
        outbox.put({"host": host, "error": repr(exc)})
    finally:
        store.close()


def run_two_hosts(url: str, mode: str, per_host: int) -> list[Json]:
    """Two worker processes, started together; their results (bounded waits throughout)."""
    ctx = multiprocessing.get_context("spawn")
    inbox, outbox, start = ctx.Queue(), ctx.Queue(), ctx.Event()
    hosts = ("bench-h1", "bench-h2")
    procs = [
        ctx.Process(target=host_worker, args=(url, mode, h, per_host, inbox, start, outbox))
        for h in hosts
    ]
    results: list[Json] = []
    try:
        for p in procs:
            p.start()
        with contextlib.suppress(queue.Empty):
            for _ in hosts:
                inbox.get(timeout=120)
        start.set()
        with contextlib.suppress(queue.Empty):
            for _ in hosts:
                results.append(outbox.get(timeout=WORKER_TIMEOUT_S))
    finally:
        start.set()
        for p in procs:
            p.join(timeout=30)
            if p.is_alive():
                p.terminate()
                p.join(timeout=10)
    missing = len(hosts) - len(results)
    return results + [{"error": "worker gave no result"}] * missing


def uniqueness(store: EtcdStore, results: list[Json]) -> Json:
    """Were all addresses handed out once, and does etcd hold exactly that many?"""
    handed = [a for r in results for a in r.get("addresses", [])]
    stored = sum(len(b.allocations) for b in Allocator(store, "bench-check").blocks())
    duplicates = len(handed) - len(set(handed))
    return {"handed_out": len(handed), "stored": stored, "duplicates": duplicates}


def combined_rate(results: list[Json]) -> float | None:
    if any("error" in r for r in results):
        return None
    done = sum(len(r["durations"]) for r in results)
    return float(done / (max(r["end"] for r in results) - min(r["start"] for r in results)))


def ipam_two_hosts(url: str, settings: Settings) -> Json:
    per_host = settings.allocations // 2
    rates: dict[str, list[float]] = {"raw_cas": [], "ipam": []}
    checks: list[Json] = []
    errors: list[str] = []
    store = EtcdStore(parse_endpoints(url))
    try:
        for r in range(settings.ipam_rounds):
            for mode in ("raw_cas", "ipam") if r % 2 == 0 else ("ipam", "raw_cas"):
                reset_store(store)
                results = run_two_hosts(url, mode, per_host)
                errors += [f"{mode}: {x['error']}" for x in results if "error" in x]
                rate = combined_rate(results)
                if rate is not None:
                    rates[mode].append(rate)
                if mode == "ipam":
                    checks.append(uniqueness(store, results))
    finally:
        store.close()
    return summarize_two_hosts(settings, per_host, rates, checks, errors)


def summarize_two_hosts(
    settings: Settings,
    per_host: int,
    rates: dict[str, list[float]],
    checks: list[Json],
    errors: list[str],
) -> Json:
    ipam, raw = stat(rates["ipam"]), stat(rates["raw_cas"])
    duplicates = sum(c["duplicates"] for c in checks)
    consistent = all(c["handed_out"] == c["stored"] for c in checks)
    return {
        "allocations_per_host": per_host,
        "rounds": settings.ipam_rounds,
        "ipam_per_s": ipam,
        "raw_cas_per_s": raw,
        "ratio": ratio(median_of(ipam), median_of(raw)),
        "unique_ok": bool(checks) and duplicates == 0 and consistent and not errors,
        "duplicates": duplicates,
        "checks": checks,
        "errors": errors,
    }


def ipam_case(settings: Settings, _out: Path) -> Json:
    with loopback_etcd() as url:
        return {"single": ipam_single(url, settings), "two_hosts": ipam_two_hosts(url, settings)}


# ---- 3. policy (bench/policy_bench.py) ---------------------------------------------------

NUMBER = r"([0-9]+(?:\.[0-9]+)?)"
POLICY_FIGURES = {
    "endpoints": rf"endpoints {NUMBER}, profiles",
    "profiles": rf"profiles {NUMBER}, iptables",
    "iptables_rules": rf"iptables rules {NUMBER}",
    "ipset_members": rf"ipset members {NUMBER}",
    "resync_cold_ms": rf"full resync: cold {NUMBER} ms",
    "resync_warm_ms": rf"warm median {NUMBER} ms",
    "change_median_ms": rf"rule change -> kernel: median {NUMBER} ms",
    "change_p99_ms": rf"p99 {NUMBER} ms",
    "change_max_ms": rf"max {NUMBER} ms",
    "changes": rf"\(n={NUMBER}\)",
    "baseline_ms": rf"iptables-restore {NUMBER} ms = {NUMBER} ms",
    "ratio": rf"ratio rule-change median / baseline: {NUMBER}x",
}


def parse_policy(output: str) -> Json:
    figures: Json = {}
    for name, pattern in POLICY_FIGURES.items():
        match = re.search(pattern, output)
        figures[name] = float(match.groups()[-1]) if match else None
    return figures


def run_policy_bench(argv: list[str], timeout: float) -> tuple[int | None, str]:
    """Run it; on timeout interrupt it (SIGINT lets it tear down) and only then kill it."""
    returncode, out = run_bounded(argv, timeout, cwd=REPO, stop_signal=signal.SIGINT, grace=60)
    if returncode is None:
        out += f"\n(timed out after {timeout:.0f} s)"
    return returncode, out


def policy_case(settings: Settings, out: Path) -> Json:
    argv = [sys.executable, "-m", "bench.policy_bench", *settings.policy_args]
    returncode, output = run_policy_bench(argv, settings.policy_timeout_s)
    (out / "policy_bench.txt").write_text(output)
    figures = parse_policy(output)
    result: Json = {"args": list(settings.policy_args), "returncode": returncode, **figures}
    if returncode != 0 or figures["change_median_ms"] is None:
        result["error"] = f"policy_bench.py exited {returncode}; see policy_bench.txt"
    return result


# ---- goals and report ----------------------------------------------------------------------


@dataclass(frozen=True)
class Verdict:
    goal: str
    measured: str
    met: bool | None
    margin: str


def _n(value: float | None, fmt: str = ".0f") -> str:
    return EN_DASH if value is None else format(value, fmt)


def _spread(summary: Json | None, digits: int = 0) -> str:
    values = [] if summary is None else summary["values"]
    return format_spread(values, lambda v: f"{v:.{digits}f}")


def docker_verdict(docker: Json) -> Verdict:
    goal = f"docker run on calicnm <= bridge + {DOCKER_GOAL_MS:.0f} ms"
    diff = docker.get("diff_ms")
    if diff is None:
        return Verdict(goal, "not measured", None, docker.get("error", "no samples"))
    measured = f"calicnm - bridge = {diff:+.0f} ms (median, until exit 0)"
    if diff <= DOCKER_GOAL_MS:
        return Verdict(goal, measured, True, f"met, {DOCKER_GOAL_MS - diff:.0f} ms to spare")
    return Verdict(goal, measured, False, f"missed by {diff - DOCKER_GOAL_MS:.0f} ms")


def ipam_verdict(case: Json | None, label: str) -> Verdict:
    goal = f"IPAM >= {IPAM_GOAL_RATIO} x raw CAS throughput ({label})"
    value = None if case is None else case.get("ratio")
    if value is None:
        return Verdict(goal, "not measured", None, "no samples")
    measured = f"{format_ratio(value)} raw CAS"
    if case is not None and "unique_ok" in case:
        measured += "; unique addresses: " + ("yes" if case["unique_ok"] else "NO")
    if value >= IPAM_GOAL_RATIO:
        return Verdict(goal, measured, True, f"met, {value - IPAM_GOAL_RATIO:.2f} above")
    needed = (IPAM_GOAL_RATIO / value - 1) * 100
    margin = f"missed by {IPAM_GOAL_RATIO - value:.2f} (needs {needed:.0f}% more throughput)"
    return Verdict(goal, measured, False, margin)


def target_verdict(goal: str, value: float | None, target: float, scale: str) -> Verdict:
    if value is None:
        return Verdict(goal, "not measured", None, "no figure")
    measured = f"{value:.0f} ms ({scale})"
    if value < target:
        return Verdict(goal, measured, True, f"met, {target - value:.0f} ms to spare")
    return Verdict(goal, measured, False, f"missed by {value - target:.0f} ms")


def verdicts(cases: Json) -> list[Verdict]:
    ipam = cases["ipam"]
    policy = cases["policy"]
    scale = f"{_n(policy.get('endpoints'))} endpoints"
    return [
        docker_verdict(cases["docker"]),
        ipam_verdict(ipam.get("single"), "one host"),
        ipam_verdict(ipam.get("two_hosts"), "two hosts at once"),
        target_verdict(
            f"README target: rule change p99 < {POLICY_P99_TARGET_MS:.0f} ms",
            policy.get("change_p99_ms"),
            POLICY_P99_TARGET_MS,
            scale,
        ),
        target_verdict(
            f"README target: warm full resync < {RESYNC_TARGET_MS / 1000:.0f} s",
            policy.get("resync_warm_ms"),
            RESYNC_TARGET_MS,
            scale,
        ),
    ]


ROW_HEADER = ("case", "calicnm: median [min-max]", "baseline: median [min-max]", "ratio")
GOAL_HEADER = ("goal", "measured", "verdict", "margin")


def docker_rows(docker: Json) -> list[Row]:
    rows: list[Row] = []
    for key, label in (("total_ms", "exit 0 (incl. --rm)"), ("connected_ms", "first fetch")):
        calicnm, bridge = docker.get("calicnm", {}).get(key), docker.get("bridge", {}).get(key)
        rel = ratio(median_of(calicnm), median_of(bridge))
        name = f"docker run to {label}, ms (baseline: bridge)"
        rows.append((name, _spread(calicnm), _spread(bridge), format_ratio(rel)))
    return rows


def ipam_rows(ipam: Json) -> list[Row]:
    rows: list[Row] = []
    for key, label in (("single", "1 host"), ("two_hosts", "2 hosts at once")):
        case = ipam.get(key) or {}
        name = f"IPAM allocations/s, {label} (baseline: raw CAS)"
        mine, raw = case.get("ipam_per_s"), case.get("raw_cas_per_s")
        rows.append((name, _spread(mine), _spread(raw), format_ratio(case.get("ratio"))))
    return rows


def policy_rows(policy: Json) -> list[Row]:
    p99, top = _n(policy.get("change_p99_ms"), ".1f"), _n(policy.get("change_max_ms"), ".1f")
    change = f"{_n(policy.get('change_median_ms'), '.1f')} (p99 {p99}, max {top})"
    resync = f"{_n(policy.get('resync_warm_ms'))} warm, {_n(policy.get('resync_cold_ms'))} cold"
    return [
        (
            "policy rule change -> kernel, ms (baseline: etcd put + iptables-restore)",
            change,
            _n(policy.get("baseline_ms"), ".1f"),
            format_ratio(policy.get("ratio"), 1),
        ),
        ("policy full resync, ms", resync, "", ""),
        ("policy iptables rules programmed", _n(policy.get("iptables_rules")), "", ""),
    ]


def table_rows(cases: Json) -> list[Row]:
    return docker_rows(cases["docker"]) + ipam_rows(cases["ipam"]) + policy_rows(cases["policy"])


def render_plain(header: Sequence[str], rows: Sequence[Sequence[str]]) -> str:
    widths = [max(len(str(r[i])) for r in [header, *rows]) for i in range(len(header))]
    return "\n".join(
        "  ".join(str(cell).ljust(w) for cell, w in zip(row, widths, strict=True))
        for row in [header, *rows]
    )


def verdict_rows(items: list[Verdict]) -> list[Row]:
    word = {True: "MET", False: "MISSED", None: EN_DASH}
    return [(v.goal, v.measured, word[v.met], v.margin) for v in items]


def docker_details(docker: Json) -> list[str]:
    lines = []
    for kind in ("calicnm", "bridge"):
        if kind in docker:
            d = docker[kind]
            lines.append(
                f"- docker run on {kind}: {docker['runs']} runs, {d['failures']} failed; "
                f"median failed fetches before the first success: "
                f"{_n(median_of(d['failed_tries']), '.1f')}"
            )
    return lines


def ipam_details(ipam: Json) -> list[str]:
    lines = []
    single, two = ipam.get("single"), ipam.get("two_hosts")
    if single:
        head = median_of(single["ipam_first_tenth_per_s"])
        tail = median_of(single["ipam_last_tenth_per_s"])
        lines.append(
            f"- IPAM, 1 host: {single['allocations']} allocations x {single['rounds']} rounds; "
            f"allocations/s over the first tenth of a round {_n(head)}, "
            f"over the last tenth {_n(tail)}"
        )
        for mode, per in single["etcd_calls_per_allocation"].items():
            parts = ", ".join(f"{kind} {v:.2f}" for kind, v in sorted(per.items()))
            lines.append(f"  - etcd round trips per allocation, {mode}: {parts}")
    if two:
        result = "no address handed out twice" if two["unique_ok"] else "CHECK FAILED"
        lines.append(
            f"- IPAM, 2 hosts: {two['allocations_per_host']} allocations per host x "
            f"{two['rounds']} rounds; uniqueness check: {result} "
            f"(duplicates {two['duplicates']}, errors {len(two['errors'])})"
        )
    return lines


def detail_lines(cases: Json) -> list[str]:
    lines = docker_details(cases["docker"]) + ipam_details(cases["ipam"])
    lines += [f"- {name}: ERROR {case['error']}" for name, case in cases.items() if "error" in case]
    return lines


METHOD = """\
- docker run: one emulated host (netns + dockerd 20.10 + calicnm node with embedded etcd,
  node at its default INFO logging and 30 s resync). A busybox httpd already runs on each
  network. Timed: `docker run --rm --net N busybox sh -c 'until busybox timeout 1 wget ...;
  do sleep 0.02; done'` (at most 200 tries). "first fetch" places the first successful
  fetch with the container's /proc/uptime (CLOCK_BOOTTIME, 10 ms grain); "exit 0" is until
  the client returns, which with `--rm` includes removing the container. Runs interleave
  calicnm and bridge, alternating order; one warm-up each is not counted.
- IPAM: one throwaway etcd on loopback. Raw CAS = `EtcdStore.get` + `EtcdStore.commit(Txn(
  compare=[(key, revision)], puts=[(key, value)]))` on one key, the floor any CAS allocator
  pays; IPAM = `Allocator.assign(PoolRef(), handle)` from a fresh /16 pool with /26 blocks.
  Both run through the same `EtcdStore`. Rounds alternate the order. Two hosts: two
  processes, different host names, started together; baseline is two processes doing raw CAS
  at once, each on its own key (as each calicnm host works in its own blocks). Rates are
  allocations / wall time from the first start to the last finish.
- Policy: `bench/policy_bench.py` as a subprocess; figures parsed from its output
  (`policy_bench.txt`). Its baseline is one etcd put + one one-rule `iptables-restore`.
- Spread is min-max over the runs or rounds (policy: p99 and max over its changes).
"""


def write_reports(out: Path, meta: Json, cases: Json, goals: list[Verdict]) -> None:
    write_json(
        out / "controlplane.json",
        {"meta": meta, "cases": cases, "goals": [dataclasses.asdict(g) for g in goals]},
    )
    mode = "quick" if meta["quick"] else "full"
    sections = [
        ("Run", f"{meta['started']} ({mode}), {meta['duration_s']:.0f} s in all."),
        ("Results", markdown_table(ROW_HEADER, table_rows(cases))),
        ("Goals", markdown_table(GOAL_HEADER, verdict_rows(goals))),
        ("Details", "\n".join(detail_lines(cases))),
        ("System", system_info_markdown(meta["system"])),
        ("Method", METHOD),
    ]
    write_markdown(out / "controlplane.md", sections, title="calicnm control-plane benchmark")


# ---- main ----------------------------------------------------------------------------------

CASES: tuple[tuple[str, Callable[[Settings, Path], Json]], ...] = (
    ("ipam", ipam_case),
    ("docker", docker_case),
    ("policy", policy_case),
)


def run_case(
    name: str, fn: Callable[[Settings, Path], Json], settings: Settings, out: Path
) -> Json:
    print(f"== {name} ...", flush=True)
    t0 = time.perf_counter()
    try:
        result = fn(settings, out)
    except Exception as exc:
        traceback.print_exc()
        result = {"error": f"{type(exc).__name__}: {exc}"[:2000]}
    result["duration_s"] = time.perf_counter() - t0
    print(f"   {name} took {result['duration_s']:.0f} s", flush=True)
    return result


def default_out() -> Path:
    return REPO / "bench" / "results" / utc_stamp()


def _terminate(signum: int, _frame: object) -> None:
    raise SystemExit(128 + signum)  # unwinds through every finally: all is stopped


def main(argv: Sequence[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--quick", action="store_true", help="few samples, small policy setup")
    ap.add_argument("--out", type=Path, default=None, help="report directory")
    args = ap.parse_args(argv)
    if os.geteuid() != 0 or shutil.which("etcd") is None or shutil.which("dockerd") is None:
        print("needs root, etcd and dockerd (run 'make test' once)", file=sys.stderr)
        return 2
    logging.basicConfig(level=logging.WARNING, format="%(name)s: %(message)s")
    signal.signal(signal.SIGTERM, _terminate)
    out: Path = args.out or default_out()
    out.mkdir(parents=True, exist_ok=True)
    settings = Settings.make(args.quick)
    started = datetime.now(UTC).isoformat(timespec="seconds")
    system = bench_system_info()
    t0 = time.perf_counter()
    cases = {name: run_case(name, fn, settings, out) for name, fn in CASES}
    system["loadavg_1m_end"] = round(os.getloadavg()[0], 2)
    meta = {
        "started": started,
        "quick": settings.quick,
        "duration_s": time.perf_counter() - t0,
        "system": system,
        "settings": dataclasses.asdict(settings),
    }
    goals = verdicts(cases)
    write_reports(out, meta, cases, goals)
    print()
    print(render_plain(ROW_HEADER, table_rows(cases)))
    print()
    print(render_plain(GOAL_HEADER, verdict_rows(goals)))
    print(f"\nreport: {out}/controlplane.md ({meta['duration_s']:.0f} s)")
    return 1 if any("error" in c for c in cases.values()) else 0


if __name__ == "__main__":
    sys.exit(main())
