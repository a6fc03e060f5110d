"""Smoke test of the policy-at-size benchmark (``python -m bench.policy_at_size``):
``--quick`` (50 endpoints) runs end to end, its report holds every figure, and it leaves
no namespace behind.  Nothing is asserted about performance.

The benchmark builds its own namespaces (traffic only between them) and a loopback etcd,
and tears everything down; on a timeout here it gets SIGTERM, which unwinds its teardown,
and only then SIGKILL.
"""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import pytest

from tests.e2e.helpers import is_number, run_quick_bench_ok

pytestmark = [
    pytest.mark.e2e,
    pytest.mark.skipif(os.geteuid() != 0, reason="needs root"),
    pytest.mark.skipif(shutil.which("etcd") is None, reason="needs etcd"),
    pytest.mark.skipif(shutil.which("qperf") is None, reason="needs qperf"),
]

MODULE = "bench.policy_at_size"
TIMEOUT_S = 300
FIGURES = (
    "bw_a_gbit",
    "bw_b_gbit",
    "bandwidth_ratio",
    "lat_a_us",
    "lat_b_us",
    "latency_diff_us",
    "lat1_a_us",
    "lat1_b_us",
    "connect_a_us",
    "connect_b_us",
    "resync_s",
    "resync_cold_s",
    "memory_slope_kib_per_endpoint",
)


def test_quick_run_reports_every_figure_and_leaves_nothing(tmp_path: Path) -> None:
    out = tmp_path / "report"
    run_quick_bench_ok(MODULE, str(out), TIMEOUT_S)

    result = json.loads((out / "policy_at_size.json").read_text())
    figures = result["figures"]
    for name in FIGURES:
        assert is_number(figures[name]), f"{name} is {figures[name]!r}"
    assert all(is_number(v) for v in figures["memory_kib"].values()), figures["memory_kib"]
    assert len(figures["memory_kib"]) == len(result["settings"]["memory_sizes"])
    assert all(is_number(v) for v in figures["full_pass_s"].values()), figures["full_pass_s"]
    assert set(figures["goals"]) == {"bandwidth_ratio", "latency_diff_us", "resync_s"}
    assert all(v is not None for v in figures["goals"].values())
    states = result["data_path"]["states"]
    assert states["b"]["endpoints"] == 50 and states["a"]["endpoints"] == 2
    assert states["b"]["kernel"]["ipset_members"] > states["a"]["kernel"]["ipset_members"]
    steps = result["data_path"]["resync"]["cold"]
    assert {"read", "compile", "iptables_restore", "routes"} <= steps.keys()

    markdown = (out / "policy_at_size.md").read_text()
    for heading in ("## Results", "## Full resync", "## Agent memory", "## Machine"):
        assert heading in markdown
    assert "## Errors" not in markdown, markdown

    left = [ns for ns in result["namespaces"] if (Path("/run/netns") / ns).exists()]
    assert left == [], f"namespaces left behind: {left}"
