"""Smoke test of the scale benchmark (``python -m bench.scale --quick``): a simulated
cluster of 5 docker-less hosts per topology runs end to end, its report holds every
figure, and nothing it started is left afterwards.  Nothing is asserted about the
figures' values.

The benchmark builds its own fabric, etcd and host namespaces (traffic only between
them) and stops everything it started; on a timeout here it gets SIGTERM, which unwinds
its teardown, and only then SIGKILL.
"""

from __future__ import annotations

import json
import math
import os
import shutil
from pathlib import Path
from typing import Any

import pytest

from calicnm.profiles import tag_ipset
from lab.procs import NETNS_DIR, cmdline, run_command
from lab.sim_cluster import process_start
from tests.e2e.helpers import run_quick_bench

pytestmark = [
    pytest.mark.e2e,
    pytest.mark.skipif(os.geteuid() != 0, reason="needs root"),
    pytest.mark.skipif(shutil.which("etcd") is None, reason="needs etcd"),
    pytest.mark.skipif(shutil.which("bird") is None, reason="needs bird"),
]

MODULE = "bench.scale"
TIMEOUT_S = 600
FIGURES = (
    "idle.etcd_requests_per_s",
    "idle.etcd_requests_per_s_without_keepalives",
    "idle.passes_per_s_per_host_mean",
    "create.bytes_per_endpoint",
    "create.bytes_per_endpoint_per_host",
    "ipset.p50",
    "ipset.p99",
    "route.p50",
    "route.p99",
    "churn.cpu_ms_per_change_per_host.mean",
    "churn.rss_mib_per_host.mean",
)


def value_at(run: dict[str, Any], path: str) -> Any:
    value: Any = run
    for part in path.split("."):
        assert isinstance(value, dict) and part in value, f"{path} missing in {run['topology']}"
        value = value[part]
    return value


def test_quick_run_reports_every_figure_and_leaves_nothing(tmp_path: Path) -> None:
    out = tmp_path / "report"
    returncode, output = run_quick_bench(MODULE, str(out), TIMEOUT_S)
    assert returncode is not None, f"timed out after {TIMEOUT_S} s:\n{output[-4000:]}"
    assert returncode == 0, output[-4000:]

    report = json.loads((out / "results.json").read_text())
    runs = report["runs"]
    assert {r["topology"] for r in runs} == {"mesh", "rr"}, runs
    for run in runs:
        assert "error" not in run, run.get("trace")
        for path in FIGURES:
            value = value_at(run, path)
            assert isinstance(value, int | float) and math.isfinite(value), (path, value)
    markdown = (out / "report.md").read_text()
    for heading in ("## Figures", "## Goals", "## Charts"):
        assert heading in markdown
    for chart in ("cost-vs-n.png", "convergence.png"):
        assert (out / chart).stat().st_size > 0

    # Nothing left: the namespaces (and with them every veth, route and ipset of the
    # hosts), the processes, the socket dir, the run's work dir; no set in this namespace.
    for run in runs:
        started = run["started"]
        assert [n for n in started["namespaces"] if (NETNS_DIR / n).exists()] == []
        alive = [(p, cmdline(p)) for p, since in started["processes"] if process_start(p) == since]
        assert alive == []
        assert not Path(started["socket_dir"]).exists()
    assert not (out / "work").exists()
    sets = run_command(["ipset", "list", "-n"]).stdout.split()
    assert tag_ipset("scale") not in sets
