"""Smoke test of the control-plane benchmark (``python -m bench.controlplane``): ``--quick``
runs end to end and its report holds a number for every case.  Nothing is asserted about
performance.

The benchmark builds its own emulated host (traffic only between its containers) and a
loopback etcd, and stops everything it started; on a timeout here it gets SIGTERM, which
unwinds its teardown, and only then SIGKILL.
"""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path
from typing import Any

import pytest

from tests.e2e.helpers import is_number, run_quick_bench

pytestmark = [
    pytest.mark.e2e,
    pytest.mark.skipif(os.geteuid() != 0, reason="needs root"),
    pytest.mark.skipif(shutil.which("dockerd") is None, reason="needs dockerd"),
    pytest.mark.skipif(shutil.which("etcd") is None, reason="needs etcd"),
]

EN_DASH = "\u2013"  # bench/report.py writes it for a missing figure
MODULE = "bench.controlplane"
TIMEOUT_S = 600


def assert_numbers(case: dict[str, Any], *paths: str) -> None:
    for path in paths:
        value: Any = case
        for part in path.split("."):
            assert isinstance(value, dict) and part in value, f"{path} missing"
            value = value[part]
        assert is_number(value), f"{path} is {value!r}, not a number"


def test_quick_run_reports_every_case(tmp_path: Path) -> None:
    out = tmp_path / "report"
    returncode, output = run_quick_bench(MODULE, str(out), TIMEOUT_S)
    assert returncode is not None, f"timed out after {TIMEOUT_S} s:\n{output[-4000:]}"
    assert returncode == 0, output[-4000:]

    report = json.loads((out / "controlplane.json").read_text())
    cases = report["cases"]
    for kind in ("calicnm", "bridge"):
        assert_numbers(cases["docker"][kind], "total_ms.median", "total_ms.min", "total_ms.max")
        assert_numbers(cases["docker"][kind], "connected_ms.median")
    assert_numbers(cases["docker"], "diff_ms", "ratio")
    for key in ("single", "two_hosts"):
        ipam = cases["ipam"][key]
        assert_numbers(ipam, "ipam_per_s.median", "ipam_per_s.min", "ipam_per_s.max")
        assert_numbers(ipam, "raw_cas_per_s.median", "ratio")
    assert isinstance(cases["ipam"]["two_hosts"]["unique_ok"], bool)
    assert_numbers(
        cases["policy"],
        "change_median_ms",
        "change_p99_ms",
        "resync_cold_ms",
        "resync_warm_ms",
        "iptables_rules",
        "baseline_ms",
    )
    assert all(goal["met"] is not None for goal in report["goals"]), report["goals"]
    assert {"kernel", "cpu_model", "cores"} <= report["meta"]["system"].keys()

    markdown = (out / "controlplane.md").read_text()
    for heading in ("## Results", "## Goals", "## System"):
        assert heading in markdown
    rows = results_rows(markdown)
    assert len(rows) == 7, markdown
    for row in rows:
        assert row[1] and not row[1].startswith(EN_DASH), f"no figure in {row}"


def results_rows(markdown: str) -> list[list[str]]:
    """Body rows of the table under ``## Results``, as lists of cells."""
    section = markdown.split("## Results", 1)[1].split("\n## ", 1)[0]
    lines = [line for line in section.splitlines() if line.startswith("|")]
    return [[cell.strip() for cell in line.strip("|").split("|")] for line in lines[2:]]
