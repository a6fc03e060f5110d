"""What one change costs the agent's calculation, against the size of the cluster.

In-process and pure (no kernel, no etcd): a cluster of ``total`` endpoints
spread over many hosts and profiles, of which this host has ``local``, is
loaded into an ``AgentIndex``.  Then, for a series of single changes (an
endpoint created on another host, one moved between tags, one deleted, a
profile's rules edited), the time to bring the desired kernel state up to
date is measured two ways, in the same run:

- incremental: ``AgentIndex.apply`` of the one changed key, then the
  compile with the kept ``CompileCache`` (what the agent does now);
- full: decode every record (``read_snapshot``), compute every tag's
  members from scratch and compile with no cache (what it did before).

The kernel writes that follow are the same in both (the applier writes only
what differs) and are measured on real hosts by ``bench.scale``.  Prints a
table, and writes ``agent_cost.md`` and ``agent_cost.json`` into ``--out``;
never fails on a number.

Usage: .venv/bin/python -m bench.agent_cost [--quick] [--out DIR]
"""

from __future__ import annotations

import argparse
import ipaddress
import statistics
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from bench.report import markdown_table, utc_stamp, write_json, write_markdown
from calicnm.agent_index import AgentIndex
from calicnm.endpoint import derive_mac, plan_link
from calicnm.model import Endpoint, Network, effective_profiles
from calicnm.policy import Profile, Rule
from calicnm.profiles import (
    CompileCache,
    CompiledPolicy,
    LocalEndpoint,
    compile_policy,
    tag_members,
)
from calicnm.store import keys
from calicnm.store.kv import KV
from calicnm.store.records import Snapshot, agent_record, snapshot_of

HOST = "host0"
PROFILES = 100
NETWORK = "f" * 64


def endpoint_kv(n: int, host: str, profile: int) -> KV:
    eid = f"{n:064x}"
    ip = ipaddress.IPv4Address(0x0A000000 + n + 1)
    plan = plan_link(eid, derive_mac(eid), (ip,))
    endpoint = Endpoint(
        eid, host, NETWORK, plan.host_if, plan.peer_if, plan.mac, (ip,), profiles=(f"p{profile}",)
    )
    return KV(keys.endpoint(host, eid), endpoint.to_json(), 1)


def profile_kv(i: int, rules: int = 3) -> KV:
    """Profile ``p<i>``: tag ``t<i>``, inbound from its own tag and two others."""
    inbound = tuple(
        Rule(
            "allow", {"protocol": "tcp", "src_tag": f"t{(i + k) % PROFILES}", "dst_ports": [80 + k]}
        )
        for k in range(rules)
    )
    profile = Profile(f"p{i}", (f"t{i}",), inbound, (Rule("allow"),))
    return KV(keys.profile(f"p{i}"), profile.to_json(), 1)


def cluster(total: int, local: int, hosts: int) -> dict[str, KV]:
    kvs = [profile_kv(i) for i in range(PROFILES)]
    kvs.append(KV(keys.network(NETWORK), Network(NETWORK, docker_name="bench").to_json(), 1))
    for n in range(total):
        host = HOST if n < local else f"host{1 + n % max(1, hosts - 1)}"
        kvs.append(endpoint_kv(n, host, n % PROFILES))
    return {kv.key: kv for kv in kvs}


def full_compile(store: dict[str, KV]) -> CompiledPolicy:
    """The old path: decode everything, count every tag, compile afresh."""
    snapshot: Snapshot = snapshot_of(r for kv in store.values() if (r := agent_record(kv)))
    every = [
        (effective_profiles(e, snapshot.networks.get(e.network_id)), tuple(map(str, e.ipv4)))
        for e in snapshot.endpoints
    ]
    members = tag_members({n: p for n, p in snapshot.profiles.items() if p}, every)
    return compile_policy(snapshot.profiles, local_of(snapshot, None), members)


def local_of(snapshot: Snapshot, index: AgentIndex | None) -> list[LocalEndpoint]:
    found = []
    for e in snapshot.endpoints_of(HOST):
        names = (
            index.effective(e)
            if index
            else effective_profiles(e, snapshot.networks.get(e.network_id))
        )
        found.append(LocalEndpoint(e.id, e.interface, tuple(map(str, e.ipv4)), names))
    return found


def incremental_compile(index: AgentIndex, cache: CompileCache) -> CompiledPolicy:
    snapshot = index.snapshot()
    local = local_of(snapshot, index)
    used = {name for ep in local for name in ep.profiles}
    profiles = {name: snapshot.profiles.get(name) for name in used}
    return compile_policy(profiles, local, index.members(), snapshot.pools, None, cache)


def changes(total: int, count: int) -> list[dict[str, KV | None]]:
    """A mixed series of single changes on other hosts, and profile edits."""
    series: list[dict[str, KV | None]] = []
    for k in range(count):
        n = total + k
        kind = k % 4
        if kind == 0:  # a new endpoint on another host
            kv = endpoint_kv(n, "host1", k % PROFILES)
            series.append({kv.key: kv})
        elif kind == 1:  # an existing endpoint moved to another tag
            kv = endpoint_kv(total - 1 - k, f"host{1 + (total - 1 - k) % 7}", (k * 7) % PROFILES)
            series.append({kv.key: kv})
        elif kind == 2:  # an endpoint deleted
            kv = endpoint_kv(n - 2, "host1", (k - 2) % PROFILES)
            series.append({kv.key: None})
        else:  # a profile's rules edited
            kv = profile_kv(k % PROFILES, rules=2 + k % 3)
            series.append({kv.key: kv})
    return series


def measure(total: int, local: int, hosts: int, count: int, full_every: int) -> dict[str, Any]:
    """``full_every``: the full recompute (slow at size) is timed on every
    n-th change only; the results are compared on those."""
    store = cluster(total, local, hosts)
    index = AgentIndex()
    started = time.perf_counter()
    index.reset(store.values())
    load = time.perf_counter() - started
    cache = CompileCache()
    incremental_compile(index, cache)
    inc: list[float] = []
    full: list[float] = []
    same = True
    for n, change in enumerate(changes(total, count)):
        for key, kv in change.items():
            if kv is None:
                store.pop(key, None)
            else:
                store[key] = kv
        started = time.perf_counter()
        index.apply(change)
        got = incremental_compile(index, cache)
        inc.append(time.perf_counter() - started)
        if n % full_every == 0:
            started = time.perf_counter()
            want = full_compile(store)
            full.append(time.perf_counter() - started)
            same = same and got == want
    return {
        "total": total,
        "local": local,
        "hosts": hosts,
        "changes": count,
        "load_s": load,
        "incremental_ms": 1000 * statistics.median(inc),
        "incremental_p99_ms": 1000 * sorted(inc)[int(0.99 * (len(inc) - 1))],
        "full_ms": 1000 * statistics.median(full),
        "same_result": same,
    }


def run(quick: bool, out: Path | None, say: Callable[[str], None] = print) -> list[dict[str, Any]]:
    sizes = [(1_000, 20), (5_000, 50)] if quick else [(1_000, 100), (10_000, 100), (100_000, 100)]
    results = []
    for total, local in sizes:
        count = 20 if quick else 80
        full_every = 1 if total <= 10_000 else 10
        result = measure(total, local, max(2, total // 100), count, full_every)
        results.append(result)
        say(
            f"total {total:>7} local {local:>4}: incremental {result['incremental_ms']:.2f} ms "
            f"(p99 {result['incremental_p99_ms']:.2f}), full {result['full_ms']:.1f} ms, "
            f"same result: {result['same_result']}"
        )
    if out is not None:
        out.mkdir(parents=True, exist_ok=True)
        rows = [
            [
                f"{r['total']:,}",
                str(r["local"]),
                f"{r['incremental_ms']:.2f}",
                f"{r['incremental_p99_ms']:.2f}",
                f"{r['full_ms']:.1f}",
                f"{r['full_ms'] / r['incremental_ms']:.0f}x",
                "yes" if r["same_result"] else "NO",
            ]
            for r in results
        ]
        table = markdown_table(
            [
                "endpoints in the cluster",
                "local",
                "incremental ms (median)",
                "p99",
                "full recompute ms",
                "full / incremental",
                "same result",
            ],
            rows,
        )
        write_markdown(
            out / "agent_cost.md",
            [
                (
                    "Agent calculation per change",
                    "One change (endpoint created, moved, deleted, or a profile edited) "
                    "brought into the desired kernel state; in-process, same run, "
                    f"{utc_stamp()}.\n\n{table}",
                )
            ],
        )
        write_json(out / "agent_cost.json", results)
    return results


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.agent_cost", description=__doc__)
    parser.add_argument("--quick", action="store_true", help="small sizes (a smoke run)")
    parser.add_argument("--out", type=Path, help="directory for agent_cost.md and .json")
    args = parser.parse_args(argv)
    run(args.quick, args.out)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
