"""``PluginClient``: the libnetwork remote-driver calls dockerd makes, on a plugin socket.

Used where a test or benchmark stands in for dockerd (hosts without Docker).  Every call
is bounded in time; a non-200 answer raises :class:`PluginError`.
"""

from __future__ import annotations

import http.client
import json
import socket
from pathlib import Path
from typing import Any

from lab.procs import HarnessError

__all__ = ["CALL_TIMEOUT", "PluginClient", "PluginError", "UnixHTTPConnection"]

CALL_TIMEOUT = 60.0
"""Longer than Join's own wait for the agent, so a slow Join answers rather than hangs."""
_ACCEPT = "application/vnd.docker.plugins.v1.2+json"


class PluginError(HarnessError):
    """A plugin call answered with a non-200 status (its ``Err`` in the message)."""


class UnixHTTPConnection(http.client.HTTPConnection):
    """HTTP on a plugin's unix socket, as dockerd talks to it."""

    def __init__(self, path: str, timeout: float) -> None:
        super().__init__("plugin.moby.localhost", timeout=timeout)
        self.unix_path = path

    def connect(self) -> None:
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        try:
            sock.settimeout(self.timeout)
            sock.connect(self.unix_path)
        except BaseException:
            sock.close()
            raise
        self.sock = sock


class PluginClient:
    """The libnetwork remote-driver calls, as dockerd sends them (POST, JSON body,
    no Content-Type), on one plugin socket.  Every call is bounded by
    :data:`CALL_TIMEOUT`; a non-200 answer raises :class:`PluginError`."""

    def __init__(self, path: Path) -> None:
        self.path = path

    def call(self, method: str, body: dict[str, Any] | None = None) -> dict[str, Any]:
        conn = UnixHTTPConnection(str(self.path), CALL_TIMEOUT)
        try:
            data = b"" if body is None else json.dumps(body).encode()
            conn.request("POST", f"/{method}", body=data, headers={"Accept": _ACCEPT})
            resp = conn.getresponse()
            raw = resp.read()
        finally:
            conn.close()
        try:
            answer = json.loads(raw) if raw else {}
        except ValueError:
            raise PluginError(f"{method}: {resp.status}, not JSON: {raw[:200]!r}") from None
        if resp.status != 200 or not isinstance(answer, dict):
            raise PluginError(f"{method}: {resp.status} {answer!r}")
        return answer

    # ---- what `docker network create -d calicnm --ipam-driver calicnm` sends ----------------

    def create_network(self, network_id: str) -> str:
        """RequestPool (calicnm chooses), the gateway request, CreateNetwork; the pool id."""
        pool = self.call(
            "IpamDriver.RequestPool",
            {"AddressSpace": "CalicnmLocal", "Pool": "", "SubPool": "", "Options": {}, "V6": False},
        )
        pool_id = str(pool["PoolID"])
        gateway = self.call(
            "IpamDriver.RequestAddress",
            {
                "PoolID": pool_id,
                "Address": "",
                "Options": {"RequestAddressType": "com.docker.network.gateway"},
            },
        )
        self.call(
            "NetworkDriver.CreateNetwork",
            {
                "NetworkID": network_id,
                "Options": {"com.docker.network.generic": {}},
                "IPv4Data": [
                    {
                        "AddressSpace": "CalicnmLocal",
                        "Pool": pool["Pool"],
                        "Gateway": gateway["Address"],
                    }
                ],
                "IPv6Data": [],
            },
        )
        return pool_id

    # ---- what `docker run --net N` / `docker rm -f` send ---------------------------------

    def request_address(self, pool_id: str) -> str:
        """An address without its prefix length."""
        got = self.call(
            "IpamDriver.RequestAddress", {"PoolID": pool_id, "Address": "", "Options": {}}
        )
        return str(got["Address"]).split("/")[0]

    def create_endpoint(self, network_id: str, endpoint_id: str, address: str) -> None:
        self.call(
            "NetworkDriver.CreateEndpoint",
            {
                "NetworkID": network_id,
                "EndpointID": endpoint_id,
                "Interface": {"Address": f"{address}/32", "AddressIPv6": "", "MacAddress": ""},
                "Options": {},
            },
        )

    def join(self, network_id: str, endpoint_id: str) -> None:
        """Join; the plugin answers once its agent has programmed the endpoint."""
        self.call(
            "NetworkDriver.Join",
            {
                "NetworkID": network_id,
                "EndpointID": endpoint_id,
                "SandboxKey": f"/var/run/docker/netns/{endpoint_id[:12]}",
                "Options": {},
            },
        )

    def remove_endpoint(
        self, pool_id: str, network_id: str, endpoint_id: str, address: str
    ) -> None:
        """Leave, DeleteEndpoint, ReleaseAddress: a container's removal."""
        ids = {"NetworkID": network_id, "EndpointID": endpoint_id}
        self.call("NetworkDriver.Leave", ids)
        self.call("NetworkDriver.DeleteEndpoint", ids)
        self.call("IpamDriver.ReleaseAddress", {"PoolID": pool_id, "Address": address})
