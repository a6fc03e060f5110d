"""The data-plane report: ``dataplane.md`` (method, system, results, goals, sweeps, paths,
interfaces, run time, errors), ``dataplane.json`` (every raw sample) and the charts."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

from bench import report
from bench.dataplane.charts import TESTS, plot
from bench.dataplane.cpu_profile import CATEGORIES, NETFILTER
from bench.dataplane.goals import Verdict, evaluate_goals
from bench.dataplane.inventory import OFFLOADS
from bench.dataplane.measure import Case, Run
from bench.dataplane.qperf import Sample
from bench.dataplane.settings import FIXED_BYTES, Settings
from bench.dataplane.units import MICRO_S, gbit, size_label, usec
from bench.report import median

__all__ = ["write_report"]


def results_table(run: Run) -> str:
    """Case, bandwidth and latency at 64 KiB: median [min-max] and ratio to host to host."""
    base = run.by_key()["host"]
    base_bw = median(base.bw) if base.bw else None
    base_lat = median(base.lat) if base.lat else None
    rows = []
    for case in run.cases:
        bw = median(case.bw) if case.bw else None
        lat = median(case.lat) if case.lat else None
        rows.append(
            [
                case.spec.title,
                case.spec.group,
                report.format_spread(case.bw, gbit),
                report.format_ratio(report.ratio(bw, base_bw)),
                report.format_spread(case.lat, usec),
                report.format_ratio(report.ratio(lat, base_lat)),
                report.format_spread(case.lat1, usec),
            ]
        )
    header = [
        "case",
        "kind",
        "bandwidth Gbit/s",
        "bw / host",
        f"latency {MICRO_S} (one way)",
        "lat / host",
        f"latency at 1 B {MICRO_S}",
    ]
    return report.markdown_table(header, rows, align="llrrrrr")


def paired_extra(case: Case, base: Case, values: str) -> str:
    """Median over repetitions of ``case`` minus ``base`` in the same repetition, in µs."""
    mine, theirs = getattr(case, values), getattr(base, values)
    diffs = [a - b for a, b in zip(mine, theirs, strict=False)]
    return f"{median(diffs) * 1e6:+.2f}" if diffs else report.EN_DASH


def breakdown_table(run: Run) -> str:
    """The hand-built path with one part added per row: its latency at 1 B and 64 KiB, and
    the extra over the hand-built path (median of the per-repetition differences)."""
    cases = run.by_key()
    base = cases["handbuilt"]
    rows = []
    for case in [base, *(c for c in run.cases if c.spec.group == "breakdown")]:
        rows.append(
            [
                case.spec.title,
                report.format_spread(case.lat1, usec),
                paired_extra(case, base, "lat1") if case is not base else report.EN_DASH,
                report.format_spread(case.lat, usec),
                paired_extra(case, base, "lat") if case is not base else report.EN_DASH,
                report.format_spread(case.bw, gbit),
                case.spec.path,
            ]
        )
    header = [
        "path",
        f"1 B {MICRO_S}",
        f"extra {MICRO_S}",
        f"64 KiB {MICRO_S}",
        f"extra {MICRO_S}",
        "Gbit/s",
        "what the part adds",
    ]
    return report.markdown_table(header, rows, align="lrrrrrl")


def profile_table(run: Run) -> str:
    """ns per one-way 1 B message in each kernel category, from perf samples."""
    if not run.profiles:
        return f"Not profiled: {run.profile_note or 'no profiles'}."
    names = [name for name, _ in CATEGORIES]
    titles = run.by_key()
    rows = []
    for prof in run.profiles:
        title = titles[prof.key].spec.title if prof.key in titles else prof.key
        if prof.error:
            rows.append([title, report.EN_DASH, *[report.EN_DASH] * (len(names) + 1), prof.error])
            continue
        costs = [prof.cost_ns(name) for name in names]
        netfilter = sum(prof.cost_ns(n) for n in NETFILTER)
        rows.append(
            [title, usec(prof.latency), *[f"{c:.0f}" for c in costs], f"{netfilter:.0f}", ""]
        )
    header = ["case", f"1 B {MICRO_S}", *names, "netfilter total", "error"]
    return report.markdown_table(header, rows, align="l" + "r" * (len(names) + 2) + "l")


PROFILE_NOTE = """ns per one-way 1 B message, in each kernel category: the category's share of
the `perf` samples (cpu-clock, 5 kHz, on the CPU both qperf ends are pinned to, so
whatever else runs there is sampled too) times the one-way latency of the same run.
*netfilter total* is conntrack, nat hooks, rule evaluation, ipsets and hook dispatch.
Everything not listed is the work every path does (TCP, veth, routing, scheduling)."""


def sweep_table(run: Run, test: str, fmt: Callable[[float], str]) -> str:
    """One row per case at a handful of message sizes (all of them are in the JSON)."""
    shown = [s for s in (1, 16, 256, 4096, FIXED_BYTES) if s in run.settings.sweep_sizes]
    rows = []
    for case in (c for c in run.cases if c.spec.sweep):
        values = case.sweep_values(test)
        cells = [fmt(values[s]) if s in values else report.EN_DASH for s in shown]
        rows.append([case.spec.title, *cells])
    return report.markdown_table(["case", *[size_label(s) for s in shown]], rows)


def interfaces_table(run: Run) -> str:
    """MTU and offloads of every interface on a measured path (each interface once)."""
    merged: dict[tuple[str, str], dict[str, Any]] = {}
    for entry in run.interfaces:
        key = (entry["place"], entry["ifname"])
        merged.setdefault(key, {**entry, "cases": []})["cases"].append(entry["case"])
    rows = []
    for entry in merged.values():
        offloads = entry.get("offloads", {})
        rows.append(
            [
                f"{entry['place']} {entry['ifname']}",
                entry["role"],
                str(entry.get("kind", entry.get("error", "?"))),
                str(entry.get("mtu", "?")),
                *[offloads.get(feature, "?") for feature in OFFLOADS],
                ", ".join(entry["cases"]),
            ]
        )
    header = ["interface", "role", "kind", "MTU", *OFFLOADS.values(), "cases"]
    return report.markdown_table(header, rows, align="lllr" + "l" * len(OFFLOADS) + "l")


def goals_text(verdicts: list[Verdict]) -> str:
    rows = [
        [v.goal, v.status.upper() if v.status == "missed" else v.status, v.detail] for v in verdicts
    ]
    return report.markdown_table(["goal", "verdict", "figures (medians)"], rows, "lll")


def method_text(run: Run) -> str:
    s = run.settings
    mode = "quick (one short iteration per case)" if s.quick else "default"
    return f"""
- Mode: {mode}.  Each repetition: `qperf -v -m 64K -t {s.fixed_seconds} ADDRESS tcp_bw
  tcp_lat`, then `qperf -v -m 1 -t {s.fixed_seconds} ADDRESS tcp_lat`; {s.reps}
  repetition(s), taken round-robin over every case in one run; figures are the median with
  [min-max] over the repetitions.  Sweep: `qperf -v -oo {s.sweep_spec} -t {s.sweep_seconds}
  ADDRESS tcp_bw tcp_lat`, once per case.
- Ratios are to *host to host* measured in the same run (bandwidth: higher is better;
  latency: lower is better).
- qperf's `tcp_lat` is **one-way** latency: half the measured round trip.
- Every "host" is a network namespace on one machine: the underlay is veth - bridge - veth
  in software, and client and server share its {run.system.get("cores")} cores, so the
  figures compare the paths' CPU cost rather than any wire.
- {pin_text(s)}
- The calicnm nodes run with the product's defaults (INFO logs, 30 s resync); each emulated
  host also runs dockerd, and the fabric namespace runs etcd.
""".strip()


def pin_text(settings: Settings) -> str:
    if settings.pin == "off":
        return "qperf's client and server are not pinned: the scheduler places them."
    server, client = settings.server_prefix[-1], settings.client_prefix[-1]
    why = (
        "one CPU does all of a path's work, so the figures are the path's CPU cost, free of "
        "cross-CPU wake-ups (see the calibration under System)"
        if settings.pin == "same"
        else "every message wakes the other end on another CPU"
    )
    return f"qperf's server runs on CPU {server} and its client on CPU {client} (taskset): {why}."


def paths_text(run: Run) -> str:
    rows = [[c.spec.title, c.spec.path, c.pair.address if c.pair else "-"] for c in run.cases]
    return report.markdown_table(["case", "path", "server address"], rows, "lll")


def system_text(run: Run) -> str:
    lines = [report.system_info_markdown(run.system)]
    for place, values in run.sysctls.items():
        pairs = ", ".join(f"`{k}` = {v}" for k, v in values.items())
        lines.append(f"- **sysctls in {place}**: {pairs}")
    return "\n".join(lines)


def timing_text(run: Run) -> str:
    return "\n".join(f"- {name}: {seconds:.0f} s" for name, seconds in run.timing.items())


def errors_text(run: Run) -> str:
    lines = [f"- {case.spec.title}: {err}" for case in run.cases for err in case.errors]
    lines += [f"- run: {err}" for err in run.errors]
    return "\n".join(lines)


def write_report(run: Run, out: Path) -> None:
    """dataplane.md, dataplane.json and the two charts in ``out``."""
    out.mkdir(parents=True, exist_ok=True)
    charts = [plot(run.cases, t, out / f"{n}.png") for t, n in TESTS]
    verdicts = evaluate_goals(run.by_key())
    sections = [
        ("How it was measured", method_text(run)),
        ("System", system_text(run)),
        ("Results at 64 KiB messages", results_table(run)),
        ("calicnm against its goals", goals_text(verdicts)),
        ("Breakdown: the hand-built path plus one part", BREAKDOWN_NOTE + breakdown_table(run)),
        ("Where the CPU goes (perf)", PROFILE_NOTE + "\n\n" + profile_table(run)),
    ]
    if all(charts):
        sections.append(
            ("Message-size sweep", "![bandwidth](bandwidth.png)\n\n![latency](latency.png)")
        )
    else:
        sections.append(("Message-size sweep", "No charts: matplotlib is not installed."))
    sections += [
        ("Sweep: bandwidth (Gbit/s)", sweep_table(run, "tcp_bw", gbit)),
        (f"Sweep: one-way latency ({MICRO_S})", sweep_table(run, "tcp_lat", usec)),
        ("Paths measured", paths_text(run)),
        ("Interfaces: MTU and offloads (ethtool -k)", interfaces_table(run)),
        ("Run time", timing_text(run)),
    ]
    if errors_text(run):
        sections.append(("Errors", errors_text(run)))
    report.write_markdown(out / "dataplane.md", sections, title="calicnm data-plane benchmark")
    report.write_json(out / "dataplane.json", run_json(run, verdicts))


BREAKDOWN_NOTE = """Each row is its own copy of the hand-built path with one part added, measured
in the same rounds as every other case; *extra* is the median over the repetitions of the
row minus the hand-built path in the same repetition.  A one-way 1 B message crosses the
routing namespace once.

"""


def _sample_json(sample: Sample) -> dict[str, Any]:
    return {
        "test": sample.test,
        "msg_size": sample.msg_size,
        "value": sample.value,
        "fields": sample.fields,
    }


def case_json(case: Case) -> dict[str, Any]:
    """A case's raw numbers: bandwidth in bytes/s, latency in seconds (one way)."""
    summary = {}
    for name, values in (("bw_bytes_per_s", case.bw), ("lat_s", case.lat)):
        if values:
            median, low, high = report.median_spread(values)
            summary[name] = {"median": median, "min": low, "max": high}
    return {
        "key": case.key,
        "title": case.spec.title,
        "group": case.spec.group,
        "path": case.spec.path,
        "address": case.pair.address if case.pair else None,
        "client": case.pair.client.label if case.pair else None,
        "server": case.pair.server.label if case.pair else None,
        "fixed": {
            "msg_size": FIXED_BYTES,
            "bw_bytes_per_s": case.bw,
            "lat_s": case.lat,
            "lat_1b_s": case.lat1,
            "summary": summary,
            "raw": [[_sample_json(s) for s in rep] for rep in case.fixed_raw],
        },
        "sweep": [_sample_json(s) for s in case.sweep],
        "errors": case.errors,
    }


def run_json(run: Run, verdicts: list[Verdict]) -> dict[str, Any]:
    s = run.settings
    return {
        "settings": {
            "reps": s.reps,
            "fixed_msg_size": FIXED_BYTES,
            "fixed_seconds": s.fixed_seconds,
            "sweep_spec": s.sweep_spec,
            "sweep_sizes": s.sweep_sizes,
            "sweep_seconds": s.sweep_seconds,
            "quick": s.quick,
            "pin": s.pin,
            "server_prefix": s.server_prefix,
            "client_prefix": s.client_prefix,
        },
        "units": {"bandwidth": "bytes/s", "latency": "seconds, one way (qperf tcp_lat)"},
        "system": run.system,
        "sysctls": run.sysctls,
        "interfaces": run.interfaces,
        "cases": [case_json(case) for case in run.cases],
        "goals": [v.__dict__ for v in verdicts],
        "profiles": [
            {"key": p.key, "latency_s": p.latency, "shares": p.shares, "error": p.error}
            for p in run.profiles
        ],
        "profile_note": run.profile_note,
        "timing_s": run.timing,
        "errors": run.errors,
    }
