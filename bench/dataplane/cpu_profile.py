"""Where the CPU goes on a path: ``perf`` samples of the measuring CPU during a 1 B
``tcp_lat`` run, summed into kernel categories (conntrack, rule evaluation, ipsets, ...).

qperf's two ends share one CPU (see ``--pin``), which is busy for the whole run, so a
category's share of the samples times the one-way latency of the same run is what it costs
per one-way message.  This is robust where latency differences are not: the noise of a VM
moves every category together.  Skipped (and said so) when ``perf`` is missing or unpinned.
"""

from __future__ import annotations

import re
import shutil
import subprocess
import tempfile
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

from bench.dataplane.measure import Case, held, short_error
from bench.dataplane.qperf import run_qperf
from bench.dataplane.settings import Settings, cpus, log

__all__ = ["CATEGORIES", "NETFILTER", "PROFILED", "Profile", "profile_cases"]

CATEGORIES: tuple[tuple[str, str], ...] = (
    (
        "conntrack",
        r"(__)*nf_conntrack|nf_ct_|hash_conntrack|ipv4_conntrack|nf_confirm|tcp_in_window|__siphash|siphash",
    ),
    ("nat hooks", r"nf_nat_"),
    ("rules: nf_tables", r"nft_|__nft|nf_tables"),
    (
        "rules: xt matches",
        r"conntrack_mt|xt_|mark_mt|mark_tg|addrtype_mt|multiport_mt|comment_mt|notrack_tg|ct_target",
    ),
    ("rules: iptables-legacy", r"ipt_do_table"),
    ("ipset", r"ip_set_|hash_ip4|hash_net4|set_match"),
    ("hook dispatch", r"nf_hook_slow|nf_hook_"),
    ("rp_filter", r"(__)?fib_validate_source"),
    ("bridge", r"br_|nf_bridge"),
    ("VXLAN", r"vxlan_|udp_tunnel|iptunnel_|skb_tunnel"),
    ("tc/BPF", r"bpf_|tcf_|tc_run|sch_handle_ingress|cls_bpf|skb_do_redirect|___bpf|__bpf"),
)
"""(category, regular expression on the kernel symbol, matched at its start), first match
wins; everything else is the path's common work (TCP, veth, routing, scheduling)."""

NETFILTER = (
    "conntrack",
    "nat hooks",
    "rules: nf_tables",
    "rules: xt matches",
    "rules: iptables-legacy",
    "ipset",
    "hook dispatch",
)
"""The categories that are netfilter's per-packet work."""

PROFILED: tuple[str, ...] = (
    "handbuilt",
    "part-all",
    "calicnm-same",
    "calicnm-same-iptables",
    "calicnm-same-nopolicy",
    "calicnm-routed",
    "calicnm-vxlan",
    "docker-bridge",
    "overlay",
)
SECONDS = 4
FREQUENCY = "4999"


@dataclass
class Profile:
    """One case's profile: category -> share of the samples (0-1), and the latency."""

    key: str
    latency: float = 0.0
    """One-way 1 B latency of the profiled run, seconds."""
    shares: dict[str, float] = field(default_factory=dict)
    error: str = ""

    def cost_ns(self, category: str) -> float:
        return self.shares.get(category, 0.0) * self.latency * 1e9


def categorise(report: str) -> dict[str, float]:
    """Shares per category from ``perf report --sort sym`` text (percent lines)."""
    shares = {name: 0.0 for name, _ in CATEGORIES}
    patterns = [(name, re.compile(rx)) for name, rx in CATEGORIES]
    for line in report.splitlines():
        m = re.match(r"\s+([\d.]+)%\s+\[[k.]\]\s+(\S+)", line)
        if not m:
            continue
        share, symbol = float(m.group(1)) / 100, m.group(2)
        for name, rx in patterns:
            if rx.match(symbol):
                shares[name] += share
                break
    return shares


def perf_report(data: Path) -> str:
    cmd = ["perf", "report", "-i", str(data), "--no-children", "--sort", "sym", "--stdio"]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=120, check=False)
    if proc.returncode != 0:
        raise RuntimeError(f"perf report exited {proc.returncode}: {proc.stderr.strip()[-300:]}")
    return proc.stdout


def profile_one(case: Case, settings: Settings, cpu: str, workdir: Path) -> Profile:
    prof = Profile(case.key)
    if case.pair is None:
        prof.error = "not set up"
        return prof
    seconds = 2 if settings.quick else SECONDS
    data = workdir / f"{case.key}.perf"
    record = ["perf", "record", "-q", "-e", "cpu-clock", "-F", FREQUENCY, "-C", cpu]
    try:
        with held(case):
            perf = subprocess.Popen(
                [*record, "-o", str(data), "--", "sleep", str(seconds)],
                stdout=subprocess.DEVNULL,
                stderr=subprocess.PIPE,
            )
            try:
                opts = ["-m", "1", "-t", str(seconds + 1)]
                samples = run_qperf(case.pair, opts, 60, settings.client_prefix, ("tcp_lat",))
            finally:
                _, err = perf.communicate(timeout=seconds + 30)
        if perf.returncode != 0:
            raise RuntimeError(f"perf record exited {perf.returncode}: {err.decode()[-300:]}")
        prof.latency = samples[0].value
        prof.shares = categorise(perf_report(data))
    except Exception as exc:
        prof.error = short_error(exc)
        log(f"  {case.key}: profile failed: {prof.error[:300]}")
    finally:
        data.unlink(missing_ok=True)
    return prof


def profile_cases(cases: Sequence[Case], settings: Settings) -> tuple[list[Profile], str]:
    """Profiles of the :data:`PROFILED` cases, or none and why."""
    if shutil.which("perf") is None:
        return [], "perf is not installed"
    if settings.pin != "same":
        return [], "profiles need qperf's ends on one CPU (--pin same)"
    cpu = str(max(cpus()))
    by_key = {case.key: case for case in cases}
    out: list[Profile] = []
    log("CPU profiles (perf)")
    with tempfile.TemporaryDirectory(prefix="cnmt-perf-") as tmp:
        for key in PROFILED:
            if key in by_key:
                out.append(profile_one(by_key[key], settings, cpu, Path(tmp)))
    return out, ""
