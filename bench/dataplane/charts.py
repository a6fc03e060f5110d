"""The two charts: bandwidth and latency against message size, one line per case
(matplotlib, from the ``bench`` extra; without it no chart is drawn)."""

from __future__ import annotations

from pathlib import Path

from bench.dataplane.measure import Case
from bench.dataplane.units import MICRO_S, size_label

__all__ = ["TESTS", "plot"]

TESTS = (("tcp_bw", "bandwidth"), ("tcp_lat", "latency"))


def plot(cases: list[Case], test: str, path: Path) -> bool:
    """One line per case against message size (log x), like the article's charts.

    Returns False (and draws nothing) if matplotlib is not installed."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return False
    styles = {"baseline": ("--", 1.4), "calicnm": ("-", 2.4), "peer": (":", 1.8)}
    fig, ax = plt.subplots(figsize=(10, 6))
    sizes: set[int] = set()
    for i, case in enumerate(cases):
        points = sorted(case.sweep_values(test).items())
        if not points:
            continue
        xs = [x for x, _ in points]
        ys = [v * 8 / 1e9 if test == "tcp_bw" else v * 1e6 for _, v in points]
        sizes.update(xs)
        style, width = styles[case.spec.group]
        ax.plot(xs, ys, style, lw=width, marker="o", ms=3.5, color=f"C{i}", label=case.spec.title)
    ax.set_xscale("log", base=2)
    ticks = sorted(sizes)
    ax.set_xticks(ticks, [size_label(t) for t in ticks])
    ax.set_xlabel("message size (bytes)")
    if test == "tcp_bw":
        ax.set_ylabel("bandwidth (Gbit/s)")
        ax.set_title("qperf tcp_bw: bandwidth vs message size")
    else:
        ax.set_ylabel(f"one-way latency ({MICRO_S})")
        ax.set_title("qperf tcp_lat: one-way latency vs message size")
    ax.set_ylim(bottom=0)
    ax.grid(True, alpha=0.3)
    ax.legend(fontsize=8, loc="upper left")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return True
