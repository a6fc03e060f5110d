"""etcd behind the ``Store`` protocol: the only module that imports
python-etcd3 (and grpc).

Every failure is translated into calicnm errors: an unreachable cluster is
``DatastoreUnavailable``; nothing else leaks a grpc or etcd3 exception.
With several endpoints it fails over to the next one when a call cannot
reach the current one, so a single dead member does not stop the host.
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any
from urllib.parse import urlsplit

from calicnm.errors import CalicnmError, DatastoreUnavailable, InvalidRequest
from calicnm.store.kv import ABSENT, KV, Txn

_log = logging.getLogger(__name__)


@dataclass(frozen=True)
class EtcdEndpoint:
    host: str
    port: int
    secure: bool


def parse_endpoints(text: str) -> list[EtcdEndpoint]:
    """Parse ``ETCD_ENDPOINTS``: comma-separated ``http(s)://host:port``."""
    endpoints = []
    for raw in text.split(","):
        item = raw.strip()
        if not item:
            continue
        if "://" not in item:
            item = "http://" + item
        parts = urlsplit(item)
        if parts.scheme not in ("http", "https") or not parts.hostname:
            raise InvalidRequest(f"ETCD_ENDPOINTS entry {raw.strip()!r} is not http(s)://host:port")
        try:
            port = parts.port or 2379
        except ValueError as exc:
            raise InvalidRequest(f"ETCD_ENDPOINTS entry {raw.strip()!r} has a bad port") from exc
        endpoints.append(EtcdEndpoint(parts.hostname, port, parts.scheme == "https"))
    if not endpoints:
        raise InvalidRequest("ETCD_ENDPOINTS is empty")
    return endpoints


@dataclass(frozen=True)
class EtcdTLS:
    ca_file: str | None = None
    cert_file: str | None = None
    key_file: str | None = None


class EtcdStore:
    """python-etcd3 behind the ``Store`` protocol.

    Thread-safe: grpc channels are; the failover index is guarded.  Each call
    has ``timeout`` seconds; a call that cannot reach any endpoint raises
    ``DatastoreUnavailable`` naming them all.
    """

    def __init__(
        self,
        endpoints: list[EtcdEndpoint],
        tls: EtcdTLS | None = None,
        timeout: float = 5.0,
    ) -> None:
        self._endpoints = endpoints
        self._tls = tls or EtcdTLS()
        self._timeout = timeout
        self._lock = threading.Lock()
        self._current = 0
        self._client: Any = None

    def insecure_remote_endpoints(self) -> list[str]:
        """Endpoints reached over plain http that are not on this host."""
        local = ("127.", "localhost", "::1", "[::1]")
        return [
            f"http://{e.host}:{e.port}"
            for e in self._endpoints
            if not e.secure and not e.host.startswith(local)
        ]

    def describe(self) -> str:
        return ",".join(
            f"{'https' if e.secure else 'http'}://{e.host}:{e.port}" for e in self._endpoints
        )

    def _connect(self, index: int) -> Any:
        import etcd3

        ep = self._endpoints[index]
        kwargs: dict[str, Any] = {"host": ep.host, "port": ep.port, "timeout": self._timeout}
        if ep.secure or self._tls.ca_file:
            if not self._tls.ca_file:
                raise InvalidRequest(
                    f"etcd endpoint {ep.host}:{ep.port} is https but no CA file was given "
                    "(ETCD_TRUSTED_CA_FILE)"
                )
            kwargs.update(
                ca_cert=self._tls.ca_file,
                cert_cert=self._tls.cert_file,
                cert_key=self._tls.key_file,
            )
        try:
            return etcd3.client(**kwargs)
        except (ValueError, OSError) as exc:
            raise InvalidRequest(f"cannot set up etcd TLS: {exc}") from exc

    def _client_for(self, index: int) -> Any:
        with self._lock:
            if self._client is None or index != self._current:
                if self._client is not None:
                    self._client.close()
                self._client = self._connect(index)
                self._current = index
            return self._client

    def _call(self, fn: Callable[[Any], Any]) -> Any:
        import etcd3.exceptions as e3

        start = self._current
        failures = []
        for step in range(len(self._endpoints)):
            index = (start + step) % len(self._endpoints)
            client = self._client_for(index)
            try:
                return fn(client)
            except (e3.ConnectionFailedError, e3.ConnectionTimeoutError, e3.WatchTimedOut) as exc:
                ep = self._endpoints[index]
                failures.append(f"{ep.host}:{ep.port}")
                _log.warning("etcd endpoint %s:%s unreachable: %s", ep.host, ep.port, exc)
                last: Exception = exc
            except e3.Etcd3Exception as exc:
                raise CalicnmError(f"etcd error: {exc!r}") from exc
            except Exception as exc:
                # grpc errors without an etcd3 translation (e.g. UNKNOWN on a
                # broken TLS handshake) are reachability problems too.
                if type(exc).__module__.startswith("grpc"):
                    failures.append(f"{self._endpoints[index].host}:{self._endpoints[index].port}")
                    last = exc
                    continue
                raise
        raise DatastoreUnavailable(
            f"etcd is unreachable at {', '.join(failures)} ({last})"
        ) from last

    def get(self, key: str) -> KV | None:
        value, meta = self._call(lambda c: c.get(key))
        if meta is None:
            return None
        return KV(key, _text(value), meta.mod_revision)

    def list(self, prefix: str) -> list[KV]:
        items = self._call(lambda c: list(c.get_prefix(prefix, sort_order="ascend")))
        return [
            KV(
                m.key.decode(errors="surrogateescape"),
                v.decode(errors="surrogateescape"),
                m.mod_revision,
            )
            for v, m in items
        ]

    def put(self, key: str, value: str) -> None:
        self._call(lambda c: c.put(key, value))

    def delete(self, key: str) -> bool:
        return bool(self._call(lambda c: c.delete(key)))

    def commit(self, txn: Txn) -> int:
        def run(c: Any) -> int:
            import etcd3.etcdrpc as etcdrpc

            compare = []
            for key, revision in txn.compare:
                if revision == ABSENT:
                    compare.append(c.transactions.version(key) == 0)
                else:
                    compare.append(c.transactions.mod(key) == revision)
            success = [c.transactions.put(k, v) for k, v in txn.puts]
            success += [c.transactions.delete(k) for k in txn.deletes]
            # etcd3's own transaction() drops the response header; the
            # header's revision is the new mod_revision of every key written,
            # which lets IPAM compare against its own last write next time
            # instead of reading the block again.
            request = etcdrpc.TxnRequest(
                compare=[x.build_message() for x in compare],
                success=c._ops_to_requests(success),
                failure=[],
            )
            response = c.kvstub.Txn(
                request, c.timeout, credentials=c.call_credentials, metadata=c.metadata
            )
            return int(response.header.revision) if response.succeeded else 0

        return int(self._call(run))

    def watch(self, prefix: str, notify: Callable[[bool], None]) -> Callable[[], None]:
        """Call ``notify(True)`` on every change under ``prefix`` and
        ``notify(False)`` once if the watch breaks (it is then dead: watch
        again).  Returns a function that cancels the watch."""

        def callback(response: Any) -> None:
            notify(not isinstance(response, Exception))

        watch_id = self._call(lambda c: c.add_watch_prefix_callback(prefix, callback))
        client = self._client

        def cancel() -> None:
            try:
                client.cancel_watch(watch_id)
            except Exception as exc:  # the channel may already be gone
                _log.debug("cancelling watch: %s", exc)

        return cancel

    def close(self) -> None:
        with self._lock:
            if self._client is not None:
                self._client.close()
                self._client = None


def _text(raw: bytes) -> str:
    """Stored bytes as text.  Bytes that are not UTF-8 are kept as escapes
    (``surrogateescape``) instead of failing the whole read: the records
    layer then refuses just that record (``validation.check_utf8``)."""
    return raw.decode(errors="surrogateescape")
