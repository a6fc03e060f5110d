"""Learning Docker network names, off Docker's call path.

CreateNetwork carries the network id but not its name, and a plugin that
calls the Docker API from inside a Docker call can deadlock dockerd (it may
be mid-start, holding the very lock the API call needs).  So the plugin
only records the id; the node asks Docker for names afterwards, from its
own loop, and writes them into the network records.  A record that already
has a name is never asked about again.
"""

from __future__ import annotations

import dataclasses
import logging
import time
from collections.abc import Callable, Set

from calicnm.model import Network
from calicnm.node.docker_api import UNREACHABLE, DockerAPI
from calicnm.store import keys, records
from calicnm.store.edits import ensure_profile
from calicnm.store.kv import Store, replace

_log = logging.getLogger(__name__)


EAGER_SECONDS = 30.0
"""How long a new unnamed network is asked about on every pass; after that
(another host's network, say, which this Docker will never know) only every
``SLOW_SECONDS``."""
SLOW_SECONDS = 30.0
WARN_SECONDS = 10.0
"""A network this host has endpoints on, still unnamed after this long, is
logged as a warning once: this host's Docker should know it."""


class NetworkNamer:
    """Fills ``docker_name`` of network records that lack one, and creates
    the profile named after the network (``-o profile`` networks got theirs
    at CreateNetwork)."""

    def __init__(
        self,
        store: Store,
        docker: DockerAPI,
        clock: Callable[[], float] = time.monotonic,
        problems_path: str | None = None,
    ) -> None:
        """``problems_path``: a file that lists, one line each, the networks
        this host uses that stay unnamed (``calicnm status`` shows them)."""
        self._store = store
        self._docker = docker
        self._clock = clock
        self._problems_path = problems_path
        self._reported: tuple[str, ...] | None = None
        self._first_seen: dict[str, float] = {}
        self._last_asked: dict[str, float] = {}
        self._warned: set[str] = set()

    def tick(self, networks: list[Network] | None = None, local: Set[str] = frozenset()) -> bool:
        """One pass over unnamed networks; True while some recent one is still
        unnamed (come back soon).  Never raises for Docker being unreachable.

        ``local`` holds the ids of networks this host has endpoints on: one
        of those still unnamed after ``WARN_SECONDS`` means this host's
        Docker does not know a network its own containers use (``DOCKER_HOST``
        names another daemon), which is logged once as a warning; its traffic
        is dropped until the profile exists."""
        if networks is None:
            networks = list(records.networks(self._store).values())
        now = self._clock()
        eager = False
        named: set[str] = set()
        for network in networks:
            if network.docker_name:
                continue
            first = self._first_seen.setdefault(network.id, now)
            recent = now - first < EAGER_SECONDS
            if network.id in local and now - first >= WARN_SECONDS:
                self._warn(network.id, now - first)
            if not recent and now - self._last_asked.get(network.id, 0.0) < SLOW_SECONDS:
                continue
            self._last_asked[network.id] = now
            try:
                name = self._docker.network_name(network.id)
            except UNREACHABLE as exc:
                _log.debug("docker not answering for network=%s: %s", network.id[:12], exc)
                eager = True  # come back soon; the others wait for the next pass
                break
            if name is None:
                eager = eager or recent
                continue
            self._name(network, name)
            named.add(network.id)
        live = {n.id for n in networks}
        self._first_seen = {k: v for k, v in self._first_seen.items() if k in live}
        self._report(
            [
                f"network {n.id[:12]} has endpoints here but Docker at DOCKER_HOST does not "
                "know it (its traffic is dropped): check DOCKER_HOST, or use -o profile=NAME"
                for n in networks
                if not n.docker_name
                and n.id not in named
                and n.id in local
                and now - self._first_seen.get(n.id, now) >= WARN_SECONDS
            ]
        )
        return eager

    def _report(self, problems: list[str]) -> None:
        if self._problems_path is None or tuple(problems) == self._reported:
            return
        with open(self._problems_path, "w") as fh:
            fh.write("".join(f"{p}\n" for p in problems))
        self._reported = tuple(problems)

    def _warn(self, network_id: str, age: float) -> None:
        if network_id in self._warned:
            return
        self._warned.add(network_id)
        _log.warning(
            "network %s has endpoints on this host but no name after %.0fs: the Docker at "
            "DOCKER_HOST does not know it, so its profile is missing and its traffic is "
            "dropped; check DOCKER_HOST, or create the network with -o profile=NAME",
            network_id[:12],
            age,
        )

    def _name(self, network: Network, name: str) -> None:
        kv = self._store.get(keys.network(network.id))
        if kv is None:
            return
        current = records.decode_network(kv)
        updated = dataclasses.replace(current, docker_name=name)
        if replace(self._store, kv.key, updated.to_json(), kv.revision):
            _log.info("network named network=%s name=%s", network.id[:12], name)
            if not current.profile:
                ensure_profile(self._store, name)
