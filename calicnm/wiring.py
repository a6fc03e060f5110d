"""Builders shared by the composition roots (plugin app, node, CLI).

Only the roots call these; domain modules receive what they need as
arguments.
"""

from __future__ import annotations

import logging
import os
import sys
import time
from collections.abc import Callable

from calicnm.config import Config
from calicnm.driver import Driver
from calicnm.host.markers import InFlight, Markers, StatusFile
from calicnm.host.netlink import HostPlumbing
from calicnm.ipam import Allocator
from calicnm.store.etcd import EtcdStore, EtcdTLS, parse_endpoints
from calicnm.store.identity import DatastoreGuard, is_cluster_id
from calicnm.store.kv import Store

EMBEDDED_ETCD_URL = "http://127.0.0.1:2379"
"""Where the node's embedded etcd listens; the default for every client."""

LOG_FORMAT = "%(asctime)s %(levelname)s %(name)s pid=%(process)d %(message)s"


QUIET_LIBRARIES = ("werkzeug", "urllib3", "pyroute2", "asyncio")
"""Loggers whose records below WARNING never reach calicnm's log."""


def _quiet_libraries(record: logging.LogRecord) -> bool:
    if record.levelno >= logging.WARNING:
        return True
    return not any(
        record.name == name or record.name.startswith(name + ".") for name in QUIET_LIBRARIES
    )


def setup_logging(level: str) -> None:
    """One event a line on stderr."""
    numeric = logging.getLevelName(level.upper())
    if not isinstance(numeric, int):
        numeric = logging.INFO
    root = logging.getLogger()
    root.handlers.clear()
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(logging.Formatter(LOG_FORMAT))
    root.addHandler(handler)
    root.setLevel(numeric)
    # Libraries' chatter stays out of calicnm's log at any level.  A filter
    # on the handler, not a logger level: pyroute2 resets its own logger's
    # level when it is first imported, which happens later.
    handler.addFilter(_quiet_libraries)


def build_store(config: Config, timeout: float = 5.0) -> EtcdStore:
    endpoints = parse_endpoints(config.etcd_endpoints or EMBEDDED_ETCD_URL)
    tls = EtcdTLS(config.etcd_trusted_ca_file, config.etcd_cert_file, config.etcd_key_file)
    return EtcdStore(endpoints, tls, timeout=timeout)


def build_driver(config: Config) -> tuple[Driver, EtcdStore]:
    store = build_store(config)
    ipam = Allocator(store, config.hostname)
    markers = Markers(config.marker_dir)
    status = StatusFile(config.agent_status_path)
    driver = Driver(
        store,
        ipam,
        HostPlumbing(),
        config.hostname,
        programmed=markers.is_set,
        agent_problem=lambda: status.problem(time.time()),
        in_flight=InFlight(config.in_flight_dir).held,
    )
    return driver, store


def remembered_cluster_id(config: Config) -> str | None:
    """The cluster id this host's node last served (None: none yet)."""
    try:
        with open(config.cluster_id_path) as fh:
            text = fh.read().strip()
    except FileNotFoundError:
        return None
    return text if is_cluster_id(text) else None


def remember_cluster_id(config: Config, cluster_id: str) -> None:
    temp = config.cluster_id_path + ".tmp"
    with open(temp, "w") as fh:
        fh.write(cluster_id + "\n")
    os.replace(temp, config.cluster_id_path)


def datastore_guard(config: Config, store: Store) -> Callable[[], None] | None:
    """The plugin's check that etcd is still the datastore this host serves
    (None before the node has recorded one)."""
    expected = remembered_cluster_id(config)
    return None if expected is None else DatastoreGuard(store, expected).check
