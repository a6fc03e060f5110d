"""Prometheus metrics of a running node (``CALICNM_METRICS_ADDRESS``), scraped and
parsed: the plugin's calls by method and status (from its worker processes), the
agent's passes, local endpoints, IPAM figures and BGP sessions by state."""

from __future__ import annotations

from pathlib import Path

from prometheus_client.parser import text_string_to_metric_families

from lab.cluster import CalicnmHost, single_host, wait_until
from lab.images import DEFAULT_IMAGE as IMG

ADDRESS = "127.0.0.1:9091"


Samples = dict[tuple[str, tuple[tuple[str, str], ...]], float]


def scrape(host: CalicnmHost) -> Samples:
    code = (
        "import urllib.request; print(urllib.request.urlopen("
        f"'http://{ADDRESS}/metrics', timeout=10).read().decode())"
    )
    text = host.netns.run(["python3", "-c", code]).stdout
    samples: Samples = {}
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            samples[(sample.name, tuple(sorted(sample.labels.items())))] = sample.value
    return samples


def value(
    samples: dict[tuple[str, tuple[tuple[str, str], ...]], float], name: str, **labels: str
) -> float:
    return samples.get((name, tuple(sorted(labels.items()))), 0.0)


def test_metrics_are_served_and_parse(tmp_path: Path) -> None:
    with single_host(tmp_path, extra_env={"CALICNM_METRICS_ADDRESS": ADDRESS}) as host:
        host.create_network("net")
        host.docker("run", "-d", "--name", "web", "--net", "net", IMG, "sleep", "600")
        samples = wait_until(
            lambda: (s := scrape(host)) and value(s, "calicnm_active_local_endpoints") == 1 and s,
            30,
            "one local endpoint in the metrics",
        )
        calls = "calicnm_plugin_calls_total"
        assert value(samples, calls, method="NetworkDriver.CreateEndpoint", status="200") == 1
        assert value(samples, calls, method="NetworkDriver.Join", status="200") == 1
        assert value(samples, calls, method="IpamDriver.RequestAddress", status="200") >= 1
        assert value(samples, "calicnm_plugin_call_seconds_count", method="NetworkDriver.Join") == 1
        assert value(samples, "calicnm_agent_passes_total") >= 1
        assert value(samples, "calicnm_agent_pass_seconds_count") >= 1
        assert value(samples, "calicnm_agent_pass_failures_total") == 0
        assert value(samples, "calicnm_iptables_restore_errors_total") == 0
        assert 0 <= value(samples, "calicnm_agent_last_good_pass_age_seconds") < 60
        assert value(samples, "calicnm_ipam_allocations") == 1
        assert value(samples, "calicnm_ipam_blocks") >= 1
        pool = "192.168.0.0/16"
        assert value(samples, "calicnm_ipam_pool_addresses", pool=pool) == 65536
        assert value(samples, "calicnm_ipam_pool_addresses_in_use", pool=pool) == 1
        host.docker("rm", "-f", "web")
        after = wait_until(
            lambda: (s := scrape(host)) and value(s, "calicnm_ipam_allocations") == 0 and s,
            30,
            "the address freed in the metrics",
        )
        assert value(after, calls, method="NetworkDriver.DeleteEndpoint", status="200") == 1
