"""The node's metrics registry: what a scrape answers from ``NodeFigures``, and a
source that fails leaves the scrape standing."""

from __future__ import annotations

from pathlib import Path

from prometheus_client import generate_latest
from prometheus_client.parser import text_string_to_metric_families

from calicnm.node.metrics import NodeFigures, NodeMetrics


def scraped(metrics: NodeMetrics) -> dict[str, list[tuple[dict[str, str], float]]]:
    text = generate_latest(metrics.registry).decode()
    out: dict[str, list[tuple[dict[str, str], float]]] = {}
    for family in text_string_to_metric_families(text):
        for s in family.samples:
            out.setdefault(s.name, []).append((s.labels, s.value))
    return out


def test_figures_become_felix_style_series(tmp_path: Path) -> None:
    figures = NodeFigures(
        last_good_age=2.5,
        local_endpoints=3,
        allocations=7,
        blocks=2,
        pools=[("10.0.0.0/24", 256, 7)],
        bgp_sessions={"up": 2, "start": 1},
    )
    metrics = NodeMetrics(str(tmp_path / "m"), lambda: figures)
    metrics.observe_pass(0.2, ok=True)
    metrics.observe_pass(0.1, ok=False)
    metrics.iptables_errors.inc()
    got = scraped(metrics)
    assert got["calicnm_agent_passes_total"] == [({}, 2.0)]
    assert got["calicnm_agent_pass_failures_total"] == [({}, 1.0)]
    assert got["calicnm_agent_pass_seconds_count"] == [({}, 2.0)]
    assert got["calicnm_iptables_restore_errors_total"] == [({}, 1.0)]
    assert got["calicnm_ipset_errors_total"] == [({}, 0.0)]
    assert got["calicnm_active_local_endpoints"] == [({}, 3.0)]
    assert got["calicnm_agent_last_good_pass_age_seconds"] == [({}, 2.5)]
    assert got["calicnm_ipam_pool_addresses_in_use"] == [({"pool": "10.0.0.0/24"}, 7.0)]
    assert sorted(got["calicnm_bgp_sessions"], key=str) == [
        ({"state": "start"}, 1.0),
        ({"state": "up"}, 2.0),
    ]


def test_a_failing_source_leaves_out_its_figures_not_the_scrape(tmp_path: Path) -> None:
    def broken() -> NodeFigures:
        raise OSError("etcd went away")

    metrics = NodeMetrics(str(tmp_path / "m"), broken)
    metrics.observe_pass(0.2, ok=True)
    got = scraped(metrics)
    assert got["calicnm_agent_passes_total"] == [({}, 1.0)]
    assert "calicnm_ipam_allocations" not in got


def test_a_new_plugin_starts_from_an_empty_directory(tmp_path: Path) -> None:
    metrics = NodeMetrics(str(tmp_path / "m"), NodeFigures)
    (tmp_path / "m" / "counter_1234.db").write_bytes(b"")
    env = metrics.plugin_env()
    assert env == {"PROMETHEUS_MULTIPROC_DIR": str(tmp_path / "m")}
    assert list((tmp_path / "m").iterdir()) == []
