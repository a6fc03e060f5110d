"""The short soak (``python -m bench.soak`` with a cycle budget): start/stop cycles on
three hosts while node kills, dockerd restarts and etcd restarts are injected; its
exit status is its verdict (no leak, no shared address, healthy nodes).  ``make soak``
runs the long version."""

from __future__ import annotations

import json
import sys
from pathlib import Path

from lab.paths import REPO
from lab.procs import run_bounded

TIMEOUT_S = 900


def test_short_soak_leaks_nothing(tmp_path: Path) -> None:
    out = tmp_path / "soak"
    argv = [
        sys.executable,
        "-m",
        "bench.soak",
        "--cycles",
        "90",
        "--fault-every",
        "15",
        "--idle-seconds",
        "10",
        "--seed",
        "7",
        "--out",
        str(out),
    ]
    returncode, output = run_bounded(argv, TIMEOUT_S, cwd=REPO)
    assert returncode is not None, f"the soak did not finish in {TIMEOUT_S}s:\n{output[-3000:]}"
    report = json.loads((out / "soak.json").read_text())
    assert report["cycles"] >= 90
    assert sum(report["faults"].values()) >= 1, report["faults"]
    assert report["leaks"] == {"records": 0, "allocations": 0, "links": 0, "chains": 0}, report
    assert report["shared_address_samples"] == []
    assert all(report["healthy"].values()), report["healthy"]
    assert returncode == 0, output[-3000:]
