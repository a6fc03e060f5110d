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
from typing import Any
from urllib.parse import quote, urlsplit

from calicnm import keys
from calicnm.datastore import Store, replace
from calicnm.model import Network

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


class NetworkNamer:
    """Fills ``docker_name`` of network records that lack one."""

    def __init__(self, store: Store, docker: DockerAPI) -> None:
        self._store = store
        self._docker = docker
        self._unknown: set[str] = set()

    def tick(self) -> int:
        """One pass; returns how many records were named.  Never raises for
        Docker being unreachable (it will be asked again next pass)."""
        named = 0
        for kv in self._store.list(keys.NETWORKS):
            network = Network.from_json(kv.value)
            if network.docker_name:
                continue
            try:
                name = self._docker.network_name(network.id)
            except (OSError, ValueError, http.client.HTTPException) as exc:
                _log.debug("docker not answering for network=%s: %s", network.id[:12], exc)
                return named
            if name is None:
                if network.id not in self._unknown:
                    self._unknown.add(network.id)
                    _log.info(
                        "network=%s is not (yet) known to this host's Docker", network.id[:12]
                    )
                continue
            updated = dataclasses.replace(network, docker_name=name)
            if replace(self._store, kv.key, updated.to_json(), kv.revision):
                named += 1
                _log.info("network named network=%s name=%s", network.id[:12], name)
        return named
