"""Docker's own API: the only module that speaks to dockerd.

Reads; creating and removing the cluster networks a node keeps on its
Docker; and, for ``calicnm node run --container``, creating, starting and
removing the node's own container.  Never called from inside a Docker call
(dockerd may hold the lock the API call needs, and deadlock): the node and
the CLI call it from their own threads.
"""

from __future__ import annotations

import http.client
import json
import socket
from typing import Any
from urllib.parse import quote, urlsplit

UNREACHABLE = (OSError, ValueError, http.client.HTTPException)
"""What a call raises when dockerd does not answer, or answers nonsense."""


def _message(body: Any) -> str:
    """Docker's error message in an answer body."""
    return str(body.get("message") if isinstance(body, dict) else body).strip()[:300]


class _UnixHTTPConnection(http.client.HTTPConnection):
    def __init__(self, path: str, timeout: float) -> None:
        super().__init__("localhost", timeout=timeout)
        self._path = path

    def connect(self) -> None:
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        try:
            sock.settimeout(self.timeout)
            sock.connect(self._path)
        except BaseException:
            sock.close()
            raise
        self.sock = sock


class DockerAPI:
    """The read-only Docker API calls calicnm makes; each raises ``OSError``
    (or ``http.client.HTTPException``, ``ValueError``) when dockerd does not
    answer sensibly, which callers treat as "Docker unreachable"."""

    def __init__(self, docker_host: str, timeout: float = 3.0) -> None:
        parts = urlsplit(docker_host)
        self._unix = parts.path if parts.scheme == "unix" else None
        self._tcp = parts.netloc if parts.scheme in ("tcp", "http") else None
        self._timeout = timeout

    def _get(self, path: str) -> tuple[int, Any]:
        return self._request("GET", path)

    def _request(self, method: str, path: str, body: Any = None) -> tuple[int, Any]:
        conn: http.client.HTTPConnection
        if self._unix:
            conn = _UnixHTTPConnection(self._unix, self._timeout)
        elif self._tcp:
            conn = http.client.HTTPConnection(self._tcp, timeout=self._timeout)
        else:
            raise OSError("DOCKER_HOST must be unix:// or tcp://")
        try:
            if body is None:
                conn.request(method, path)
            else:
                payload = json.dumps(body).encode()
                conn.request(method, path, payload, {"Content-Type": "application/json"})
            resp = conn.getresponse()
            body = resp.read()
        finally:
            conn.close()
        if resp.getheader("Content-Type", "").startswith("application/json") or body[:1] in (
            b"{",
            b"[",
        ):
            return resp.status, json.loads(body) if body else None
        return resp.status, body.decode(errors="replace")

    def ping(self) -> None:
        """Raise unless dockerd answers."""
        status, _body = self._get("/_ping")
        if status != 200:
            raise OSError(f"Docker answered {status} to a ping")

    def network_name(self, network_id: str) -> str | None:
        """The network's name, or None if Docker does not know the id."""
        status, body = self._get(f"/networks/{quote(network_id)}")
        if status == 404:
            return None
        if status != 200 or not isinstance(body, dict):
            raise OSError(f"Docker answered {status} for network {network_id[:12]}")
        name = body.get("Name")
        return name if isinstance(name, str) else None

    def networks(self) -> dict[str, dict[str, Any]]:
        """Docker's networks by name: each one's summary (Id, Driver, Labels)."""
        status, body = self._get("/networks")
        if status != 200 or not isinstance(body, list):
            raise OSError(f"Docker answered {status} to a network listing")
        return {
            str(n["Name"]): n
            for n in body
            if isinstance(n, dict) and isinstance(n.get("Name"), str)
        }

    def create_network(self, spec: dict[str, Any]) -> None:
        """``POST /networks/create``; OSError with Docker's message on refusal."""
        status, body = self._request("POST", "/networks/create", spec)
        if status not in (200, 201):
            message = body.get("message") if isinstance(body, dict) else body
            raise OSError(f"Docker refused to create network {spec.get('Name')}: {message}")

    def remove_network(self, network_id: str) -> None:
        status, body = self._request("DELETE", f"/networks/{quote(network_id)}")
        if status not in (200, 204, 404):
            message = body.get("message") if isinstance(body, dict) else body
            raise OSError(f"Docker refused to remove network {network_id[:12]}: {message}")

    def calicnm_networks(self) -> list[dict[str, Any]]:
        """``docker network inspect`` of every network whose driver is calicnm
        (the legacy plugin's ``calicnm``, or a managed plugin's
        ``calicnm/calicnm:latest``)."""
        status, body = self._get("/networks")
        if status != 200 or not isinstance(body, list):
            raise OSError(f"Docker answered {status} to a network listing")
        found = []
        for summary in body:
            if not isinstance(summary, dict):
                continue
            driver = str(summary.get("Driver", ""))
            if driver != "calicnm" and not driver.startswith("calicnm/"):
                continue
            status, network = self._get(f"/networks/{quote(str(summary.get('Id', '')))}")
            if status == 200 and isinstance(network, dict):
                found.append(network)
        return found

    def container_running(self, name: str) -> bool | None:
        """Whether container ``name`` runs; None if Docker has no such container."""
        status, body = self._get(f"/containers/{quote(name)}/json")
        if status == 404:
            return None
        if status != 200 or not isinstance(body, dict):
            raise OSError(f"Docker answered {status} for container {name}")
        state = body.get("State")
        return bool(state.get("Running")) if isinstance(state, dict) else False

    def has_image(self, image: str) -> bool:
        status, _body = self._get(f"/images/{quote(image, safe='')}/json")
        if status not in (200, 404):
            raise OSError(f"Docker answered {status} for image {image}")
        return status == 200

    def run_container(self, name: str, spec: dict[str, Any]) -> str:
        """Create container ``name`` from ``spec`` and start it; its id.  On a
        failed start the created container is removed again."""
        status, body = self._request("POST", f"/containers/create?name={quote(name)}", spec)
        if status != 201 or not isinstance(body, dict) or not isinstance(body.get("Id"), str):
            raise OSError(f"Docker refused to create container {name}: {_message(body)}")
        container_id: str = body["Id"]
        status, body = self._request("POST", f"/containers/{quote(container_id)}/start")
        if status not in (204, 304):
            self.remove_container(container_id)
            raise OSError(f"Docker could not start container {name}: {_message(body)}")
        return container_id

    def remove_container(self, name: str) -> None:
        """Stop and remove container ``name`` (``docker rm -f``); no error if gone."""
        status, body = self._request("DELETE", f"/containers/{quote(name)}?force=1")
        if status not in (204, 404):
            raise OSError(f"Docker refused to remove container {name}: {_message(body)}")

    def network_endpoints(self, network_id: str) -> frozenset[str] | None:
        """Ids of the endpoints Docker has on the network (joined or not), or
        None if Docker does not know the network."""
        status, body = self._get(f"/networks/{quote(network_id)}")
        if status == 404:
            return None
        if status != 200 or not isinstance(body, dict):
            raise OSError(f"Docker answered {status} for network {network_id[:12]}")
        containers = body.get("Containers") or {}
        if not isinstance(containers, dict):
            raise ValueError(f"Docker's Containers of network {network_id[:12]} is not an object")
        ids = set()
        for value in containers.values():
            endpoint_id = value.get("EndpointID") if isinstance(value, dict) else None
            if not isinstance(endpoint_id, str):
                raise ValueError(f"Docker listed an endpoint without an id on {network_id[:12]}")
            ids.add(endpoint_id)
        return frozenset(ids)
