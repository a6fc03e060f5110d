"""Smoke test of the data-plane benchmark (``python -m bench.dataplane --quick``).

It keeps the benchmark's harness from rotting: every case must still build, carry qperf
traffic and land in the report.  It asserts no performance figure.
"""

from __future__ import annotations

import importlib.util
import json
import os
import shutil
from pathlib import Path

import pytest

from bench.dataplane.cpu_profile import CATEGORIES, PROFILED
from bench.dataplane.parts import PARTS
from tests.e2e.helpers import run_quick_bench

MODULE = "bench.dataplane"
CASES = {
    "loopback",
    "veth",
    "host",
    "handbuilt",
    "calicnm-same",
    "calicnm-same-iptables",
    "calicnm-same-nopolicy",
    "calicnm-routed",
    "calicnm-vxlan",
    "docker-bridge",
    "overlay",
    "macvlan",
    *(f"part-{part.key}" for part in PARTS),
}
TIMEOUT = 600


def _require() -> None:
    if os.geteuid() != 0:
        pytest.skip("the benchmark needs root")
    for tool in ("qperf", "dockerd", "etcd"):
        if shutil.which(tool) is None:
            pytest.fail(f"{tool} is not installed; run 'sh scripts/install-deps.sh'")


def test_quick_run_writes_a_report_with_numbers_for_every_case(tmp_path: Path) -> None:
    _require()
    out = tmp_path / "report"
    returncode, output = run_quick_bench(MODULE, str(out), TIMEOUT)
    if returncode is None:
        pytest.fail(f"{MODULE} --quick took over {TIMEOUT}s:\n{output[-4000:]}")
    assert returncode == 0, output[-4000:]

    assert (out / "dataplane.md").stat().st_size > 0
    if importlib.util.find_spec("matplotlib") is not None:
        for chart in ("bandwidth.png", "latency.png"):
            assert (out / chart).read_bytes().startswith(b"\x89PNG"), chart

    data = json.loads((out / "dataplane.json").read_text())
    cases = {case["key"]: case for case in data["cases"]}
    assert set(cases) == CASES
    sizes = set(data["settings"]["sweep_sizes"])
    for key, case in cases.items():
        assert case["errors"] == [], (key, case["errors"])
        fixed = case["fixed"]
        assert fixed["bw_bytes_per_s"] and fixed["lat_s"] and fixed["lat_1b_s"], key
        assert all(v > 0 for v in fixed["bw_bytes_per_s"] + fixed["lat_s"]), key
        if key.startswith("part-"):
            assert case["sweep"] == [], key
            continue
        for test in ("tcp_bw", "tcp_lat"):
            got = {s["msg_size"] for s in case["sweep"] if s["test"] == test and s["value"] > 0}
            assert got == sizes, (key, test, sorted(got))

    markdown = (out / "dataplane.md").read_text()
    for heading in (
        "System",
        "Results at 64 KiB messages",
        "calicnm against its goals",
        "Breakdown: the hand-built path plus one part",
        "Where the CPU goes (perf)",
    ):
        assert f"## {heading}" in markdown
    assert {goal["status"] for goal in data["goals"]} <= {"met", "missed"}
    # Every profiled case was profiled (the shares are figures, and not asserted: the
    # CPU's samples include whatever else the machine runs meanwhile).
    profiles = {p["key"]: p for p in data["profiles"]}
    if shutil.which("perf") is not None:
        assert set(profiles) == set(PROFILED), data["profile_note"]
        for key, prof in profiles.items():
            assert prof["error"] == "" and prof["latency_s"] > 0, (key, prof)
            assert set(prof["shares"]) == {name for name, _ in CATEGORIES}, key
