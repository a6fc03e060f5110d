"""The HTTP face of the driver: the only module that imports Flask.

``create_app()`` is the composition root gunicorn calls
(``calicnm.plugin_api:create_app()``); it builds the etcd store, IPAM and
plumbing from the environment, and connects lazily: nothing happens at
import and nothing contacts etcd until the first call.

Wire rules (see Docker's plugin client):
- bodies are read without looking at Content-Type (Docker sends none) and
  may be empty;
- every success is a JSON object, even ``{}``;
- every failure is a non-200 status with ``{"Err": "..."}``, for both the
  NetworkDriver and the IpamDriver interface (a 200 with ``Err`` would be
  taken as success by Docker's IPAM client);
- an unknown method is a plain 404, which Docker reads as "not implemented";
- a body over ``MAX_BODY`` is a 413 with ``{"Err"}``, and is never read.
"""

from __future__ import annotations

import json
import logging
import os
import time
from collections.abc import Callable
from typing import Any

from flask import Flask, Response, request
from werkzeug.exceptions import HTTPException

from calicnm.driver import Driver
from calicnm.errors import CalicnmError, InvalidRequest

_log = logging.getLogger(__name__)

CONTENT_TYPE = "application/vnd.docker.plugins.v1.2+json"
MAX_BODY = 1 << 20
"""Largest request body accepted (1 MiB); Docker's largest call is a few KiB.
Anything bigger is refused with 413 before it is read into memory."""

Handler = Callable[[Any], dict[str, Any]]


def routes(driver: Driver) -> dict[str, Handler]:
    """Every call Docker makes, mapped to the driver method that answers it."""
    return {
        "Plugin.Activate": driver.activate,
        "NetworkDriver.GetCapabilities": driver.network_capabilities,
        "NetworkDriver.CreateNetwork": driver.create_network,
        "NetworkDriver.DeleteNetwork": driver.delete_network,
        "NetworkDriver.AllocateNetwork": driver.allocate_network,
        "NetworkDriver.FreeNetwork": driver.free_network,
        "NetworkDriver.CreateEndpoint": driver.create_endpoint,
        "NetworkDriver.EndpointOperInfo": driver.endpoint_oper_info,
        "NetworkDriver.DeleteEndpoint": driver.delete_endpoint,
        "NetworkDriver.Join": driver.join,
        "NetworkDriver.Leave": driver.leave,
        "NetworkDriver.ProgramExternalConnectivity": driver.no_op,
        "NetworkDriver.RevokeExternalConnectivity": driver.no_op,
        "NetworkDriver.DiscoverNew": driver.no_op,
        "NetworkDriver.DiscoverDelete": driver.no_op,
        "NetworkDriver.GwAllocCheck": driver.gw_alloc_check,
        "IpamDriver.GetCapabilities": driver.ipam_capabilities,
        "IpamDriver.GetDefaultAddressSpaces": driver.default_address_spaces,
        "IpamDriver.RequestPool": driver.request_pool,
        "IpamDriver.ReleasePool": driver.release_pool,
        "IpamDriver.RequestAddress": driver.request_address,
        "IpamDriver.ReleaseAddress": driver.release_address,
    }


def _json(status: int, payload: dict[str, Any]) -> Response:
    return Response(json.dumps(payload), status=status, content_type=CONTENT_TYPE)


def _body() -> Any:
    raw = request.get_data(cache=False)
    if not raw.strip():
        return {}
    try:
        return json.loads(raw)
    except ValueError as exc:
        raise InvalidRequest(f"request body is not valid JSON: {exc}") from exc


def _ids(body: Any) -> str:
    if not isinstance(body, dict):
        return ""
    parts = []
    for key, label in (("NetworkID", "network"), ("EndpointID", "endpoint"), ("PoolID", "pool")):
        value = body.get(key)
        if isinstance(value, str) and value:
            parts.append(f"{label}={value[:12] if label != 'pool' else value}")
    return " ".join(parts)


UNGUARDED = {
    "Plugin.Activate",
    "NetworkDriver.GetCapabilities",
    "IpamDriver.GetCapabilities",
    "IpamDriver.GetDefaultAddressSpaces",
}
"""The handshake calls, answered even against a foreign datastore."""


def build_app(
    driver: Driver,
    guard: Callable[[], None] | None = None,
    observe: Callable[[str, int, float], None] | None = None,
) -> Flask:
    """A Flask app around an already-built driver (tests pass their own).

    ``guard`` runs before every call but the handshake; it raises (a
    ``ForeignDatastore``) when etcd is not the datastore this host serves,
    so nothing is allocated or released in the wrong one.  ``observe(method,
    status, seconds)`` is told of every answered call (metrics)."""
    app = Flask("calicnm")
    app.config["MAX_CONTENT_LENGTH"] = MAX_BODY
    table = routes(driver)

    def dispatch(method: str) -> Response:
        started = time.monotonic()
        response = answer(method)
        if observe is not None:
            known = method if method in table else "unknown"
            observe(known, response.status_code, time.monotonic() - started)
        return response

    def answer(method: str) -> Response:
        handler = table.get(method)
        if handler is None:
            return _json(404, {"Err": f"{method} is not implemented by calicnm"})
        body: Any = None
        try:
            body = _body()
            if guard is not None and method not in UNGUARDED:
                guard()
            result = handler(body)
        except HTTPException as exc:  # e.g. 413 for a body over MAX_BODY
            _log.warning("call=%s status=%s error=%s", method, exc.code, exc.description)
            return _json(exc.code or 400, {"Err": f"{method}: {exc.description or exc.name}"})
        except CalicnmError as exc:
            _log.warning("call=%s %s status=%d error=%s", method, _ids(body), exc.status, exc)
            return _json(exc.status, {"Err": str(exc)})
        except Exception as exc:  # the daemon must stay up whatever happens
            _log.exception("call=%s %s status=500 unexpected error", method, _ids(body))
            return _json(500, {"Err": f"internal error in {method}: {exc!r}"})
        _log.debug("call=%s %s status=200", method, _ids(body))
        return _json(200, result)

    app.add_url_rule("/<method>", "dispatch", dispatch, methods=["POST"])

    @app.errorhandler(HTTPException)
    def http_error(exc: HTTPException) -> Response:
        return _json(exc.code or 500, {"Err": exc.description or exc.name})

    return app


def create_app() -> Flask:
    """Composition root for gunicorn: wire real adapters from the environment."""
    from calicnm.config import Config
    from calicnm.wiring import build_driver, datastore_guard, setup_logging

    config = Config.from_env()
    setup_logging(config.log_level)
    driver, store = build_driver(config)
    observe = None
    if os.environ.get("PROMETHEUS_MULTIPROC_DIR"):  # the node serves metrics
        from calicnm.node.metrics import PluginMetrics

        observe = PluginMetrics().observe
    return build_app(driver, datastore_guard(config, store), observe)
