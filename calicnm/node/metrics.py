"""Prometheus metrics, off by default (the only importer of prometheus_client).

With ``CALICNM_METRICS_ADDRESS`` set (``127.0.0.1:9091``, say) the node serves
``/metrics`` there.  Two kinds of figures meet in one answer:

- the plugin's, from its gunicorn workers: ``calicnm_plugin_calls_total``
  by method and status, and ``calicnm_plugin_call_seconds`` by method.  The
  workers are other processes, so they write them in prometheus_client's
  multiprocess mode into files under the node's state directory
  (``PROMETHEUS_MULTIPROC_DIR``, which the node gives only to the plugin);
  the node reads the files at each scrape;
- the node's own: agent passes (count, failures, duration, age of the last
  good one), ``iptables-restore`` and ``ipset`` errors, active local
  endpoints, IPAM (allocations, blocks, each pool's size and use) and BGP
  sessions by state.  Counts that live in etcd or BIRD are read at scrape
  time, never in the background, so an unscraped node pays nothing.

Names follow Felix's (``felix_iptables_restore_errors`` becomes
``calicnm_iptables_restore_errors_total``).  A figure that cannot be read at
a scrape (etcd or BIRD down) is left out of that answer; the scrape itself
never fails for it.
"""

from __future__ import annotations

import logging
import os
import shutil
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field

from prometheus_client import CollectorRegistry, Counter, Histogram, start_http_server
from prometheus_client.core import GaugeMetricFamily, Metric
from prometheus_client.multiprocess import MultiProcessCollector
from prometheus_client.registry import Collector

from calicnm.errors import InvalidRequest

_log = logging.getLogger(__name__)

MULTIPROC_ENV = "PROMETHEUS_MULTIPROC_DIR"
CALL_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0)
PASS_BUCKETS = (0.01, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0)


def parse_address(text: str) -> tuple[str, int]:
    """``HOST:PORT`` (``[v6]:PORT`` too) to listen on; InvalidRequest otherwise."""
    host, sep, port = text.rpartition(":")
    host = host.strip("[]")
    if not sep or not host or not port.isdigit() or not 0 < int(port) < 65536:
        raise InvalidRequest(f"metrics address {text!r} is not HOST:PORT")
    return host, int(port)


class PluginMetrics:
    """The plugin's call figures, kept in multiprocess files (see the module)."""

    def __init__(self) -> None:
        registry = CollectorRegistry()  # values go to the files; nothing is served here
        self._calls = Counter(
            "calicnm_plugin_calls",
            "Docker calls answered by the plugin, by method and HTTP status.",
            ["method", "status"],
            registry=registry,
        )
        self._seconds = Histogram(
            "calicnm_plugin_call_seconds",
            "Time to answer a Docker call, by method.",
            ["method"],
            buckets=CALL_BUCKETS,
            registry=registry,
        )

    def observe(self, method: str, status: int, seconds: float) -> None:
        self._calls.labels(method, str(status)).inc()
        self._seconds.labels(method).observe(seconds)


@dataclass
class NodeFigures:
    """What the node knows at a scrape; None for what could not be read."""

    last_good_age: float | None = None
    local_endpoints: int | None = None
    allocations: int | None = None
    blocks: int | None = None
    pools: list[tuple[str, int, int]] = field(default_factory=list)
    """(pool CIDR, addresses, addresses in use)."""
    bgp_sessions: dict[str, int] | None = None


class NodeMetrics:
    """The node's figures and the server that answers scrapes."""

    def __init__(self, multiproc_dir: str, read: Callable[[], NodeFigures]) -> None:
        """Owns ``multiproc_dir``: emptied now, and whenever a plugin starts."""
        self.multiproc_dir = multiproc_dir
        shutil.rmtree(multiproc_dir, ignore_errors=True)
        os.makedirs(multiproc_dir, mode=0o700)
        self.registry = CollectorRegistry()
        MultiProcessCollector(self.registry, path=multiproc_dir)  # type: ignore[no-untyped-call]
        self.passes = Counter("calicnm_agent_passes", "Agent passes run.", registry=self.registry)
        self.pass_failures = Counter(
            "calicnm_agent_pass_failures", "Agent passes that failed.", registry=self.registry
        )
        self.pass_seconds = Histogram(
            "calicnm_agent_pass_seconds",
            "Duration of agent passes.",
            buckets=PASS_BUCKETS,
            registry=self.registry,
        )
        self.iptables_errors = Counter(
            "calicnm_iptables_restore_errors",
            "iptables-restore runs that failed.",
            registry=self.registry,
        )
        self.ipset_errors = Counter(
            "calicnm_ipset_errors", "ipset runs that failed.", registry=self.registry
        )
        self.registry.register(_Scraped(read))

    def observe_pass(self, seconds: float, ok: bool) -> None:
        self.passes.inc()
        self.pass_seconds.observe(seconds)
        if not ok:
            self.pass_failures.inc()

    def plugin_env(self) -> dict[str, str]:
        """Empty the plugin's metrics directory (figures of processes gone:
        call it only while no plugin runs) and return the environment that
        makes a new plugin write into it."""
        for name in os.listdir(self.multiproc_dir):
            os.unlink(os.path.join(self.multiproc_dir, name))
        return {MULTIPROC_ENV: self.multiproc_dir}

    def serve(self, address: str) -> None:
        host, port = parse_address(address)
        start_http_server(port, addr=host, registry=self.registry)
        _log.info("metrics served on http://%s:%d/metrics", host, port)


class _Scraped(Collector):
    """Figures read when a scrape asks (``NodeFigures``)."""

    def __init__(self, read: Callable[[], NodeFigures]) -> None:
        self._read = read

    def collect(self) -> Iterator[Metric]:
        try:
            figures = self._read()
        except Exception as exc:  # a scrape never fails for one source
            _log.warning("metrics: cannot read the node's figures: %s", exc)
            return
        if figures.last_good_age is not None:
            yield _gauge(
                "calicnm_agent_last_good_pass_age_seconds",
                "Seconds since the agent's last pass that succeeded.",
                figures.last_good_age,
            )
        if figures.local_endpoints is not None:
            yield _gauge(
                "calicnm_active_local_endpoints",
                "Endpoints on this host the agent has programmed.",
                figures.local_endpoints,
            )
        if figures.allocations is not None:
            yield _gauge(
                "calicnm_ipam_allocations",
                "Addresses allocated, cluster-wide.",
                figures.allocations,
            )
        if figures.blocks is not None:
            yield _gauge("calicnm_ipam_blocks", "Blocks claimed, cluster-wide.", figures.blocks)
        if figures.pools:
            size = GaugeMetricFamily(
                "calicnm_ipam_pool_addresses", "Addresses in each pool.", labels=["pool"]
            )
            used = GaugeMetricFamily(
                "calicnm_ipam_pool_addresses_in_use", "Addresses in use per pool.", labels=["pool"]
            )
            for cidr, addresses, in_use in figures.pools:
                size.add_metric([cidr], addresses)
                used.add_metric([cidr], in_use)
            yield size
            yield used
        if figures.bgp_sessions is not None:
            sessions = GaugeMetricFamily(
                "calicnm_bgp_sessions", "BGP sessions of this host, by state.", labels=["state"]
            )
            for state, count in sorted(figures.bgp_sessions.items()):
                sessions.add_metric([state], count)
            yield sessions


def _gauge(name: str, doc: str, value: float) -> GaugeMetricFamily:
    return GaugeMetricFamily(name, doc, value=value)
