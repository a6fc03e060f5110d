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
import http.client
import json
import logging
import socket
import time
from collections.abc import Callable
from typing import Any
from urllib.parse import quote, urlsplit

from calicnm.model import Network
from calicnm.store import keys, records
from calicnm.store.edits import ensure_profile
from calicnm.store.kv import Store, replace

_log = logging.getLogger(__name__)


class _UnixHTTPConnection(http.client.HTTPConnection):
    def __init__(self, path: str, timeout: float) -> None:
        super().__init__("localhost", timeout=timeout)
        self._path = path

    def connect(self) -> None:
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        sock.settimeout(self.timeout)
        sock.connect(self._path)
        self.sock = sock


class DockerAPI:
    """The two read-only Docker API calls calicnm needs."""

    def __init__(self, docker_host: str, timeout: float = 3.0) -> None:
        parts = urlsplit(docker_host)
        self._unix = parts.path if parts.scheme == "unix" else None
        self._tcp = parts.netloc if parts.scheme in ("tcp", "http") else None
        self._timeout = timeout

    def _get(self, path: str) -> tuple[int, Any]:
        conn: http.client.HTTPConnection
        if self._unix:
            conn = _UnixHTTPConnection(self._unix, self._timeout)
        elif self._tcp:
            conn = http.client.HTTPConnection(self._tcp, timeout=self._timeout)
        else:
            raise OSError("DOCKER_HOST must be unix:// or tcp://")
        try:
            conn.request("GET", path)
            resp = conn.getresponse()
            body = resp.read()
        finally:
            conn.close()
        return resp.status, json.loads(body) if body else None

    def network_name(self, network_id: str) -> str | None:
        """The network's name, or None if Docker does not know the id."""
        status, body = self._get(f"/networks/{quote(network_id)}")
        if status == 404:
            return None
        if status != 200 or not isinstance(body, dict):
            raise OSError(f"Docker answered {status} for network {network_id[:12]}")
        name = body.get("Name")
        return name if isinstance(name, str) else None


EAGER_SECONDS = 30.0
"""How long a new unnamed network is asked about on every pass; after that
(another host's network, say, which this Docker will never know) only every
``SLOW_SECONDS``."""
SLOW_SECONDS = 30.0


class NetworkNamer:
    """Fills ``docker_name`` of network records that lack one, and creates
    the profile named after the network (``-o profile`` networks got theirs
    at CreateNetwork)."""

    def __init__(
        self, store: Store, docker: DockerAPI, clock: Callable[[], float] = time.monotonic
    ) -> None:
        self._store = store
        self._docker = docker
        self._clock = clock
        self._first_seen: dict[str, float] = {}
        self._last_asked: dict[str, float] = {}

    def tick(self, networks: list[Network] | None = None) -> bool:
        """One pass over unnamed networks; True while some recent one is still
        unnamed (come back soon).  Never raises for Docker being unreachable."""
        if networks is None:
            networks = list(records.networks(self._store).values())
        now = self._clock()
        eager = False
        for network in networks:
            if network.docker_name:
                continue
            first = self._first_seen.setdefault(network.id, now)
            recent = now - first < EAGER_SECONDS
            if not recent and now - self._last_asked.get(network.id, 0.0) < SLOW_SECONDS:
                continue
            self._last_asked[network.id] = now
            try:
                name = self._docker.network_name(network.id)
            except (OSError, ValueError, http.client.HTTPException) as exc:
                _log.debug("docker not answering for network=%s: %s", network.id[:12], exc)
                return True
            if name is None:
                eager = eager or recent
                continue
            self._name(network, name)
        live = {n.id for n in networks}
        self._first_seen = {k: v for k, v in self._first_seen.items() if k in live}
        return eager

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
