#!/usr/bin/env python3
"""Soak: container start/stop cycles on 3 emulated hosts under injected faults, then
the invariants, the leaks by kind, and the idle cost.

Three hosts (netns + dockerd + calicnm node each) share one etcd on the fabric; each
host's dockerd has its own calicnm network.  Worker threads run start/stop cycles
(``docker run --rm --net N busybox true``) on every host, while a fault thread, every
``--fault-every`` seconds, picks one at random:

- ``node-kill``: SIGKILL a host's node, start it again 1-5 s later;
- ``dockerd-restart``: stop and start a host's dockerd (``systemctl restart docker``);
- ``etcd-restart``: stop and start the etcd every host uses.

A cycle that fails while a fault is in the way is counted, not an error: what must
hold is the state afterwards.  When the time (or ``--cycles``) is up, load stops; the
soak waits, bounded, for the nodes' ownership collectors (one reconcile period plus
the grace, and the pending bound), then checks on every host:

- no endpoint record, allocation, ``cali`` link, per-endpoint chain or ``tmp`` link
  remains (no container runs), and ``calicnm ipam check`` is clean;
- no two endpoint records ever shared an address (sampled during the run);
- the node, its plugin and its agent are alive and healthy.

Then it measures the idle cost for ``--idle-seconds``: agent passes per second (from
each agent's status file) and etcd revisions per second.  Writes ``soak.json`` and
``soak.md`` into ``--out``; exit status 1 if an invariant failed, so the short run in
``make test`` is a test.

Usage (root, from the repository's root):
  .venv/bin/python -m bench.soak --minutes 30 [--out DIR]
  .venv/bin/python -m bench.soak --cycles 60 --fault-every 20   (the short run)
"""

from __future__ import annotations

import argparse
import contextlib
import json
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
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from bench.report import markdown_table, system_info, utc_stamp, write_json, write_markdown
from lab.cluster import CalicnmHost, Cluster, wait_until
from lab.etcd import fabric_etcd
from lab.images import DEFAULT_IMAGE

FAULTS = ("node-kill", "dockerd-restart", "etcd-restart")
SETTLE_SECONDS = 120.0
"""Bound on the wait for the collectors after load stops (test settings: a 2 s period,
a 5 s grace, pending addresses freed after 15 s)."""


@dataclass
class Tally:
    cycles: int = 0
    failed: int = 0
    faults: Counter[str] = field(default_factory=Counter)
    shared_samples: list[str] = field(default_factory=list)
    errors: list[str] = field(default_factory=list)
    lock: threading.Lock = field(default_factory=threading.Lock)

    def add(self, ok: bool) -> None:
        with self.lock:
            self.cycles += 1
            self.failed += 0 if ok else 1


class Soak:
    def __init__(self, cluster: Cluster, rng: random.Random, tally: Tally) -> None:
        self.cluster = cluster
        self.rng = rng
        self.tally = tally
        self.stop = threading.Event()
        self.fault_lock = threading.Lock()
        """Held while a fault is being undone, so checks never race a restart."""

    # ---- load ------------------------------------------------------------

    def worker(self, host: CalicnmHost, budget: Callable[[], bool]) -> None:
        while not self.stop.is_set() and budget():
            try:
                result = host.docker_run(
                    "run", "--rm", "--net", "soak", DEFAULT_IMAGE, "true", timeout=90
                )
                ok = result.returncode == 0
            except (subprocess.SubprocessError, OSError):
                ok = False
            self.tally.add(ok)
            if not ok:
                self.stop.wait(0.5)

    # ---- faults ----------------------------------------------------------

    def faults(self, every: float) -> None:
        while not self.stop.wait(every * self.rng.uniform(0.7, 1.3)):
            kind = self.rng.choice(FAULTS)
            host = self.rng.choice(self.cluster.hosts)
            with self.fault_lock:
                try:
                    self.inject(kind, host)
                    self.tally.faults[kind] += 1
                except Exception as exc:  # recorded: the invariants decide
                    self.tally.errors.append(f"{kind} on {host.hostname}: {exc}")

    def inject(self, kind: str, host: CalicnmHost) -> None:
        if kind == "node-kill":
            host.stop_node(sig=signal.SIGKILL)
            time.sleep(self.rng.uniform(1, 5))
            host.start_node()
        elif kind == "dockerd-restart":
            host.dockerd.stop_daemon()
            host.dockerd.start_daemon(timeout=120)
        else:
            etcd = self.cluster.etcd
            assert etcd is not None
            etcd.stop()
            time.sleep(self.rng.uniform(1, 5))
            self.cluster.etcd = fabric_etcd(self.cluster.fabric, self.cluster.workdir)

    # ---- checks ----------------------------------------------------------

    def sample_shared(self) -> None:
        """Every few seconds: no two endpoint records name one address."""
        while not self.stop.wait(5):
            try:
                keys = self.cluster.hosts[0].etcd_keys("/calicnm/v1/hosts/")
            except Exception:
                continue  # etcd restarting
            owners: dict[str, str] = {}
            for key, value in keys.items():
                if "/endpoints/" not in key:
                    continue
                for ip in _addresses(value):
                    if ip in owners:
                        self.tally.shared_samples.append(f"{ip}: {owners[ip]} and {key}")
                    owners[ip] = key


def _addresses(record: str) -> list[str]:
    try:
        nets = json.loads(record).get("ipv4_nets") or []
    except ValueError:
        return []
    return [str(n).split("/")[0] for n in nets]


def leaks(cluster: Cluster) -> dict[str, list[str]]:
    """What is left once no container runs, by kind."""
    found: dict[str, list[str]] = {k: [] for k in ("records", "allocations", "links", "chains")}
    stored = cluster.hosts[0].etcd_keys()
    for key, value in stored.items():
        if "/endpoints/" in key:
            found["records"].append(key)
        if "/ipam/v4/blocks/" in key:
            allocations = json.loads(value).get("allocations") or {}
            found["allocations"] += [f"{key}#{o}={a}" for o, a in allocations.items()]
    for host in cluster.hosts:
        found["links"] += [f"{host.hostname}:{n}" for n in host.links("cali", "tmp")]
        saved = host.netns.run(["iptables-save", "-t", "filter"]).stdout
        found["chains"] += [
            f"{host.hostname}:{m}" for m in re.findall(r"^:(calicnm-(?:to|from)-\S+)", saved, re.M)
        ]
    return found


def check_reports(cluster: Cluster) -> dict[str, Any]:
    return {
        host.hostname: json.loads(host.calicnm("ipam", "check", "--json", check=False).stdout)
        for host in cluster.hosts
    }


def healthy(cluster: Cluster) -> dict[str, bool]:
    return {
        host.hostname: host.answering()
        and host.node is not None
        and host.node.is_running()
        and host.calicnm("status", check=False).returncode == 0
        for host in cluster.hosts
    }


def etcd_revision(host: CalicnmHost) -> int:
    out = host.netns.run(
        ["etcdctl", "--endpoints", cluster_url(host), "get", "/", "-w", "json"],
        env={**os.environ, "ETCDCTL_API": "3"},
    ).stdout
    return int(json.loads(out)["header"]["revision"])


def cluster_url(host: CalicnmHost) -> str:
    return host.etcd_endpoints or "http://127.0.0.1:2379"


def agent_passes(host: CalicnmHost) -> int:
    status = json.loads((host.state_dir / "agent-status.json").read_text())
    return int(status.get("passes", 0))


def idle_cost(cluster: Cluster, seconds: float) -> dict[str, float]:
    first = cluster.hosts[0]
    rev0, passes0, t0 = etcd_revision(first), [agent_passes(h) for h in cluster.hosts], time.time()
    time.sleep(seconds)
    rev1, passes1, t1 = etcd_revision(first), [agent_passes(h) for h in cluster.hosts], time.time()
    span = t1 - t0
    per_host = [(b - a) / span for a, b in zip(passes0, passes1, strict=True)]
    return {
        "seconds": round(span, 1),
        "etcd_revisions_per_s": round((rev1 - rev0) / span, 3),
        "agent_passes_per_s_per_host": round(max(per_host), 3),
    }


def run(args: argparse.Namespace) -> int:
    out = Path(args.out or f"bench/results/{utc_stamp()}")
    out.mkdir(parents=True, exist_ok=True)
    rng = random.Random(args.seed)
    tally = Tally()
    deadline: float | None = time.monotonic() + args.minutes * 60 if args.minutes else None
    cycle_limit = int(args.cycles)
    started = time.monotonic()
    workdir = Path(tempfile.mkdtemp(prefix="calicnm-soak-"))
    result: dict[str, Any] = {"system": system_info(), "seed": args.seed}
    with Cluster(workdir, 3) as cluster:
        for host in cluster.hosts:
            host.create_network("soak")
        soak = Soak(cluster, rng, tally)

        def budget() -> bool:
            if deadline is not None:
                return time.monotonic() < deadline
            return tally.cycles < cycle_limit

        threads = [
            threading.Thread(target=soak.worker, args=(host, budget), daemon=True)
            for host in cluster.hosts
            for _ in range(args.workers)
        ]
        side = [
            threading.Thread(target=soak.faults, args=(args.fault_every,), daemon=True),
            threading.Thread(target=soak.sample_shared, daemon=True),
        ]
        for t in threads + side:
            t.start()
        for t in threads:
            t.join()
        soak.stop.set()
        with soak.fault_lock:  # a fault in progress finishes first
            pass
        for t in side:
            t.join(timeout=300)
        load_seconds = time.monotonic() - started

        def settled() -> bool:
            clean = all(not v for v in leaks(cluster).values())
            return clean and all(r.get("ok") is True for r in check_reports(cluster).values())

        with contextlib.suppress(AssertionError):  # reported below as leaks
            wait_until(settled, SETTLE_SECONDS, "the collectors to clean up", interval=3)
        left = leaks(cluster)
        reports = check_reports(cluster)
        health = healthy(cluster)
        result.update(
            cycles=tally.cycles,
            failed_cycles=tally.failed,
            faults=dict(tally.faults),
            fault_errors=tally.errors,
            load_seconds=round(load_seconds, 1),
            leaks={k: len(v) for k, v in left.items()},
            leaked=left,
            shared_address_samples=tally.shared_samples,
            ipam_check={h: r.get("findings") for h, r in reports.items()},
            healthy=health,
            idle=idle_cost(cluster, args.idle_seconds),
        )
        for host in cluster.hosts:
            host.docker("network", "rm", "soak")
    ok = (
        not any(result["leaks"].values())
        and not tally.shared_samples
        and all(health.values())
        and all(not f for f in result["ipam_check"].values())
        and tally.cycles > 0
    )
    result["ok"] = ok
    if ok:
        shutil.rmtree(workdir, ignore_errors=True)
    else:
        result["logs"] = str(workdir)  # node and dockerd logs, kept for a failed run
    write_json(out / "soak.json", result)
    write_markdown(out / "soak.md", [("Soak", summary(result))])
    print(summary(result))
    print(f"report: {out}")
    return 0 if ok else 1


def summary(result: dict[str, Any]) -> str:
    rows = [
        ["start/stop cycles", str(result["cycles"])],
        ["cycles that failed during faults", str(result["failed_cycles"])],
        ["load time (s)", str(result["load_seconds"])],
        [
            "faults injected",
            ", ".join(f"{k} {v}" for k, v in sorted(result["faults"].items())) or "0",
        ],
        ["leaked objects", ", ".join(f"{k} {v}" for k, v in result["leaks"].items())],
        ["addresses ever shared by two records", str(len(result["shared_address_samples"]))],
        ["nodes healthy at the end", f"{sum(result['healthy'].values())}/3"],
        ["idle etcd revisions/s (3 hosts)", str(result["idle"]["etcd_revisions_per_s"])],
        ["idle agent passes/s (busiest host)", str(result["idle"]["agent_passes_per_s_per_host"])],
        ["verdict", "ok" if result.get("ok") else "FAILED"],
    ]
    return markdown_table(["figure", "value"], rows)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.soak", description=__doc__)
    parser.add_argument("--minutes", type=float, help="run for this long (default: --cycles)")
    parser.add_argument("--cycles", type=int, default=60, help="stop after this many cycles")
    parser.add_argument("--workers", type=int, default=2, help="cycle threads per host")
    parser.add_argument("--fault-every", type=float, default=60.0, help="seconds between faults")
    parser.add_argument("--idle-seconds", type=float, default=30.0)
    parser.add_argument("--seed", type=int, default=int(time.time()))
    parser.add_argument("--out", help="report directory (default bench/results/<UTC time>)")
    args = parser.parse_args(argv)
    signal.signal(signal.SIGTERM, _terminate)
    return run(args)


def _terminate(signum: int, _frame: object) -> None:
    raise SystemExit(128 + signum)  # unwinds the cluster's teardown: all is stopped


if __name__ == "__main__":
    sys.exit(main())
