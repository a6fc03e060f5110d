"""``bench.agent_cost`` runs, and its incremental path gives what the full one does
(the figures themselves are printed, never asserted)."""

from __future__ import annotations

from pathlib import Path

from bench.agent_cost import measure, run


def test_the_incremental_calculation_matches_the_full_one_on_the_bench_cluster() -> None:
    result = measure(total=400, local=12, hosts=5, count=12, full_every=1)
    assert result["same_result"] is True
    assert result["incremental_ms"] > 0 and result["full_ms"] > 0


def test_a_quick_run_writes_its_report(tmp_path: Path) -> None:
    results = run(quick=True, out=tmp_path, say=lambda _line: None)
    assert [r["total"] for r in results] == [1_000, 5_000]
    assert "full / incremental" in (tmp_path / "agent_cost.md").read_text()
    assert (tmp_path / "agent_cost.json").exists()
