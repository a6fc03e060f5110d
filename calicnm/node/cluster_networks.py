"""Networks defined once for the cluster, kept on every host's Docker.

``calicnm network create NAME`` stores a definition in etcd
(``model.ClusterNetwork``).  Every node keeps a Docker network of that name,
driver and IPAM driver calicnm, on its own dockerd: it creates the ones
missing (a host that joins later gets them all on its first sync), and when
a definition is removed it removes its Docker network once no container uses
it.  It does so from its own thread, off Docker's call path, woken by an etcd
watch on the definitions and at least every ``SYNC_SECONDS``.  Those
periodic syncs check Docker against the definitions the last watch event
made it read: an idle cluster costs etcd nothing.

Each node reports per network (``model.HostNetworkState`` under its host key,
written only when it changes): ``present``; ``in-use`` (removed from the
definitions, kept while containers use it); or ``problem`` (Docker refused,
or another driver's network holds the name, which is never touched).  Only
networks the node made (labelled ``io.calicnm.cluster-network``) are ever
removed, so networks created by hand with ``docker network create`` are left
as they are.  Docker not answering skips a sync; nothing is reported or
removed on a guess.
"""

from __future__ import annotations

import logging
import threading
from typing import Any, Protocol

from calicnm.errors import CalicnmError
from calicnm.model import ClusterNetwork, HostNetworkState
from calicnm.node.docker_api import UNREACHABLE
from calicnm.store import keys, records
from calicnm.store.kv import Store

_log = logging.getLogger(__name__)

LABEL = "io.calicnm.cluster-network"
SYNC_SECONDS = 10.0
DRIVER = "calicnm"


class DockerNetworks(Protocol):
    def networks(self) -> dict[str, dict[str, Any]]: ...

    def network_endpoints(self, network_id: str) -> frozenset[str] | None: ...

    def create_network(self, spec: dict[str, Any]) -> None: ...

    def remove_network(self, network_id: str) -> None: ...


def docker_spec(network: ClusterNetwork, driver: str = DRIVER) -> dict[str, Any]:
    """The body of Docker's ``POST /networks/create`` for ``network``."""
    config: list[dict[str, str]] = []
    if network.subnet is not None:
        entry = {"Subnet": str(network.subnet)}
        if network.ip_range is not None:
            entry["IPRange"] = str(network.ip_range)
        config.append(entry)
    spec: dict[str, Any] = {
        "Name": network.name,
        "Driver": driver,
        "CheckDuplicate": True,
        "IPAM": {"Driver": driver, "Config": config},
        "Internal": network.internal,
        "Labels": {LABEL: network.name},
    }
    if network.profile:
        spec["Options"] = {"profile": network.profile}
    return spec


def _is_calicnm(summary: dict[str, Any]) -> bool:
    driver = str(summary.get("Driver", ""))
    return driver == DRIVER or driver.startswith(DRIVER + "/")


class ClusterNetworkSync:
    def __init__(
        self, store: Store, host: str, docker: DockerNetworks, driver: str = DRIVER
    ) -> None:
        """``driver`` is the name this host's Docker knows the plugin by
        (``calicnm``, or a managed plugin's ``calicnm/calicnm:latest``)."""
        self._store = store
        self._host = host
        self._docker = docker
        self._driver = driver
        self._defined: dict[str, ClusterNetwork] | None = None
        self._reported: dict[str, HostNetworkState] | None = None

    def sync(self, reread: bool = True) -> None:
        """One pass: make the Docker networks equal to the definitions.
        ``reread=False`` uses the definitions and this host's reports as the
        last pass read and wrote them (``run`` does so while its watch on the
        definitions runs and reported nothing), so a pass that only checks
        Docker costs etcd nothing.  Raises ``CalicnmError`` for etcd, and
        Docker's errors when it does not answer (the caller retries later)."""
        if reread or self._defined is None:
            self._defined = None
            self._reported = None
            self._defined = records.cluster_networks(self._store)
        defined = self._defined
        present = self._docker.networks()
        states: dict[str, tuple[str, str]] = {}
        for name, network in sorted(defined.items()):
            have = present.get(name)
            if have is None:
                try:
                    self._docker.create_network(docker_spec(network, self._driver))
                except OSError as exc:
                    states[name] = ("problem", str(exc))
                    continue
                _log.info("cluster network created on this host's Docker name=%s", name)
                states[name] = ("present", "")
            elif _is_calicnm(have):
                states[name] = ("present", "")
            else:
                states[name] = (
                    "problem",
                    f"this host's Docker already has a network {name} with driver "
                    f"{have.get('Driver')}; it is left alone",
                )
        for name, have in sorted(present.items()):
            labels = have.get("Labels")
            if name in defined or not isinstance(labels, dict) or labels.get(LABEL) != name:
                continue  # defined, or not one this node made: never removed
            users = self._docker.network_endpoints(str(have.get("Id", "")))
            if users:
                states[name] = ("in-use", f"{len(users)} container(s) still use it")
                continue
            self._docker.remove_network(str(have.get("Id", "")))
            _log.info("cluster network removed from this host's Docker name=%s", name)
        self._publish(states)

    def _publish(self, states: dict[str, tuple[str, str]]) -> None:
        if self._reported is None:
            found = records.host_network_states(self._store, self._host)
            self._reported = {s.name: s for s in found}
        reported = self._reported
        for name, (state, detail) in states.items():
            new = HostNetworkState(name, self._host, state, detail[:512])
            if reported.get(name) != new:
                self._store.put(keys.host_network_state(self._host, name), new.to_json())
                reported[name] = new
        for name in reported.keys() - states.keys():
            self._store.delete(keys.host_network_state(self._host, name))
            del reported[name]

    def run(self, stop: threading.Event, watch: Any) -> None:
        """Sync now, on every change of the definitions, and every
        ``SYNC_SECONDS``, until ``stop``.  Never raises."""
        wake = threading.Event()
        broken = threading.Event()
        changed = threading.Event()
        changed.set()  # the first sync reads the definitions

        def notify(ok: bool) -> None:
            if not ok:
                broken.set()
            changed.set()
            wake.set()

        cancel = None
        while not stop.is_set():
            if broken.is_set() and cancel is not None:
                cancel()
                cancel = None
            if cancel is None:
                broken.clear()
                try:
                    cancel = watch(keys.CLUSTER_NETWORKS, notify)
                except CalicnmError as exc:
                    _log.debug("cluster networks: no watch yet: %s", exc)
            wake.clear()
            # Read etcd only when the watch reported something or is not
            # running; otherwise the pass checks Docker against what it knows.
            reread = changed.is_set() or cancel is None
            changed.clear()
            try:
                self.sync(reread=reread)
            except UNREACHABLE as exc:
                _log.debug("cluster networks: Docker does not answer: %s", exc)
            except CalicnmError as exc:
                changed.set()  # read everything again next time
                _log.warning("cluster networks: sync skipped: %s", exc)
            except Exception:  # the thread must outlive any one sync
                _log.exception("cluster networks: sync failed unexpectedly")
            for _ in range(int(SYNC_SECONDS)):
                if wake.wait(1.0) or stop.is_set():
                    break
        if cancel is not None:
            cancel()
