"""etcd behind the ``Store`` protocol: the only module that imports
python-etcd3 (and grpc).

Every failure is translated into calicnm errors: an unreachable cluster is
``DatastoreUnavailable``, anything else etcd or the client library refuses
is a ``CalicnmError``; no grpc, etcd3 or channel exception leaves a method.

Clients: one per endpoint, made on first use and kept until ``close()``.
Failover only changes which one is *current*; it never closes a client,
since other threads may be in the middle of a call on it.  A call tries the
current endpoint, then the others in turn, for up to ``timeout`` seconds
(short outages such as a leader election become latency, not errors).

Watches do not use python-etcd3's watcher (one shared thread per client that
re-opens its stream in a tight loop while etcd is down, and raises once the
client is closed).  Each watch has its own gRPC stream and thread: when the
stream breaks it calls ``notify(False)`` once and ends; the caller watches
again, on whichever endpoint answers then.
"""

from __future__ import annotations

import builtins
import logging
import os
import queue
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any, TypeVar
from urllib.parse import urlsplit

from calicnm.errors import CalicnmError, DatastoreUnavailable, InvalidRequest, LeaseLost
from calicnm.store import keys
from calicnm.store.kv import ABSENT, KV, Change, OnChanges, OnEnd, Txn

_log = logging.getLogger(__name__)
T = TypeVar("T")

GRPC_OPTIONS = [
    # A member that comes back is tried again within 2 s, not after gRPC's
    # default backoff of up to 120 s (calls to a channel in backoff fail at
    # once without trying).
    ("grpc.initial_reconnect_backoff_ms", 500),
    ("grpc.max_reconnect_backoff_ms", 2000),
    # Listings are paged (``PAGE_KEYS``), but one page of large records
    # (profiles of many rules) may still pass gRPC's default 4 MiB.
    ("grpc.max_receive_message_length", 64 * 1024 * 1024),
]
PAGE_KEYS = 500
"""Keys per range request of a listing.  One request for a whole prefix
fails past gRPC's message limit (``/hosts/`` of about 9,000 endpoints) and
makes etcd build the whole answer at once; pages of a pinned revision do
neither and still read one consistent revision."""
MAX_PAGES = 100_000
"""Bound on the pages of one listing (50 million keys)."""
REQUIRE_LEADER = ("hasleader", "true")
"""Watch-stream metadata: etcd cancels the stream ("no leader") when its member
loses the leader, instead of keeping a watch open that can never deliver."""
RETRY_PAUSE = (0.05, 0.5)
"""First and longest pause between rounds over all endpoints."""

# gRPC status codes that say "this endpoint did not (reliably) serve the
# call": try the next one.  UNKNOWN is what a broken TLS handshake gives,
# INTERNAL and CANCELLED what a connection torn down mid-call can give.
_REACHABILITY_CODES = frozenset(
    {"UNAVAILABLE", "DEADLINE_EXCEEDED", "UNKNOWN", "INTERNAL", "CANCELLED"}
)


class _Unreachable(Exception):
    """Raised inside a call when the endpoint did not answer in time."""


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

    Thread-safe: one client (gRPC channel) per endpoint, shared by all
    threads; the current endpoint and the client table are guarded by a
    lock.  A call that cannot be served by any endpoint within ``timeout``
    seconds (each endpoint tried at least once) raises
    ``DatastoreUnavailable`` naming them all.  ``close()`` is final.
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
        self._clients: dict[int, Any] = {}
        self._closed = False

    def insecure_remote_endpoints(self) -> list[str]:
        """Endpoints reached over plain http that are not on this host."""
        local = ("127.", "localhost", "::1", "[::1]")
        return [
            f"http://{e.host}:{e.port}"
            for e in self._endpoints
            if not e.secure and not e.host.startswith(local)
        ]

    def describe(self) -> str:
        return ",".join(_url(e) for e in self._endpoints)

    def current(self) -> str:
        """URL of the endpoint calls try first (the last one that answered)."""
        with self._lock:
            return _url(self._endpoints[self._current])

    # ---- clients and failover ----------------------------------------------

    def _connect(self, index: int) -> Any:
        # gRPC's fork handlers can abort a child forked while its threads are
        # busy (the node forks etcd, gunicorn and BIRD with a pre-exec hook);
        # calicnm never uses a client across a fork, so they stay off.  grpc
        # reads the setting when it is first imported, which is here.
        os.environ.setdefault("GRPC_ENABLE_FORK_SUPPORT", "false")
        import etcd3

        ep = self._endpoints[index]
        kwargs: dict[str, Any] = {
            "host": ep.host,
            "port": ep.port,
            "timeout": self._timeout,
            "grpc_options": GRPC_OPTIONS,
        }
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

    def _client(self, index: int) -> Any:
        """The client of endpoint ``index``, made on first use and then kept
        (until ``close()``) whichever endpoint is current."""
        with self._lock:
            if self._closed:
                raise DatastoreUnavailable("the etcd client is closed")
            client = self._clients.get(index)
            if client is None:
                client = self._clients[index] = self._connect(index)
            return client

    def _settle(self, tried_first: int, served: int, why: str) -> None:
        if served == tried_first:
            return
        with self._lock:
            if self._current != tried_first:
                return  # another thread moved it already
            self._current = served
        _log.warning(
            "etcd endpoint %s failed (%s); using %s now",
            _url(self._endpoints[tried_first]),
            why,
            _url(self._endpoints[served]),
        )

    def _call(self, fn: Callable[[Any], T]) -> T:
        """``fn(client)`` on the current endpoint, else on the next ones.

        Rounds over all endpoints repeat (with a short pause) until one
        answers or ``timeout`` seconds have passed; every endpoint is tried
        at least once.  ``fn`` must be safe to run again on another endpoint
        after a failure whose outcome is unknown (see ``commit``)."""
        deadline = time.monotonic() + self._timeout
        pause = RETRY_PAUSE[0]
        failures: dict[int, str] = {}
        last: Exception | None = None
        while True:
            with self._lock:
                start = self._current
            for step in range(len(self._endpoints)):
                index = (start + step) % len(self._endpoints)
                client = self._client(index)
                try:
                    result = fn(client)
                except CalicnmError:
                    raise
                except Exception as exc:
                    if self._closed:
                        raise DatastoreUnavailable("the etcd client is closed") from exc
                    reachability, text = _classify(exc)
                    if not reachability:
                        raise CalicnmError(
                            f"etcd at {_url(self._endpoints[index])} refused the request: {text}"
                        ) from exc
                    _log.debug("etcd endpoint %s: %s", _url(self._endpoints[index]), text)
                    failures[index] = text
                    last = exc
                    continue
                self._settle(start, index, failures.get(start, "no answer"))
                return result
            if time.monotonic() + pause >= deadline:
                break
            time.sleep(pause)
            pause = min(pause * 2, RETRY_PAUSE[1])
        where = ", ".join(f"{self._endpoints[i].host}:{self._endpoints[i].port}" for i in failures)
        reasons = "; ".join(dict.fromkeys(failures.values()))
        raise DatastoreUnavailable(f"etcd is unreachable at {where} ({reasons})") from last

    # ---- the Store protocol --------------------------------------------------

    def get(self, key: str) -> KV | None:
        value, meta = self._call(lambda c: c.get(key))
        if meta is None:
            return None
        return KV(key, _text(value), meta.mod_revision)

    def list(self, prefix: str) -> list[KV]:
        return self.list_at(prefix)[0]

    def list_at(self, prefix: str) -> tuple[builtins.list[KV], int]:
        """The keys under ``prefix`` in key order, and the revision they were
        read at: pages of ``PAGE_KEYS`` keys, all read at the revision of the
        first.  If etcd compacts that revision away between pages, the read
        starts over (twice at most)."""

        def read(c: Any) -> tuple[builtins.list[KV], int]:
            import grpc

            for _attempt in range(3):
                try:
                    return _read_pages(c, prefix)
                except grpc.RpcError as exc:
                    if exc.code() != grpc.StatusCode.OUT_OF_RANGE:
                        raise
            raise DatastoreUnavailable(
                f"etcd compacted the history of {prefix} faster than it could be read"
            )

        return self._call(read)

    def current_revision(self) -> int:
        """etcd's revision now: a range that counts one key and returns none."""
        import etcd3.etcdrpc as etcdrpc

        def read(c: Any) -> int:
            probe = keys.CLUSTER_ID.encode()
            request = etcdrpc.RangeRequest(key=probe, count_only=True)
            response = c.kvstub.Range(
                request, c.timeout, credentials=c.call_credentials, metadata=c.metadata
            )
            return int(response.header.revision)

        return self._call(read)

    def watch_changes(
        self, prefix: str, after: int, on_changes: OnChanges, on_end: OnEnd
    ) -> Callable[[], None]:
        """As ``kv.ChangeSource.watch_changes``: one watch from revision
        ``after + 1``, whose events (key, value, revision) are passed on in
        batches.  When etcd no longer holds that history it says so right
        after creating the watch: ``on_end(True)`` follows from the stream's
        thread (or before this returns, if etcd refuses the watch outright)."""

        def start(client: Any) -> _Watch:
            return _Watch(
                client, prefix, None, self._timeout, after + 1, on_changes, on_end
            ).start()

        try:
            return self._call(start).cancel
        except WatchCompacted:
            on_end(True)
            return lambda: None

    def put(self, key: str, value: str) -> None:
        self._call(lambda c: c.put(key, value))

    def delete(self, key: str) -> bool:
        return bool(self._call(lambda c: c.delete(key)))

    def commit(self, txn: Txn) -> int:
        """Apply ``txn`` if its compares hold: the new revision, else 0.

        A call that fails on the way (a member stopped, a timeout) may still
        have been applied.  Failing over and running the txn again would then
        lose its compare to *its own* write and report 0, and the caller would
        redo its change on top of itself (IPAM: a second address for one
        request, the first one leaked).  So a retry that loses its compare
        asks etcd's history whether the earlier try was applied (see
        ``_applied_revision``) and if so returns that try's revision.  Once
        the retry has run, the earlier try can no longer apply: its compare
        is stale."""
        tries = [0]

        def run(c: Any) -> int:
            tries[0] += 1
            return _commit(c, txn, check_applied=tries[0] > 1)

        return self._call(run)

    # ---- the Leases protocol ----------------------------------------------------

    def grant_lease(self, ttl: int) -> int:
        """As ``kv.Leases.grant_lease``.  A grant whose answer was lost and is
        tried again leaves an unused lease behind, which expires by itself."""
        import etcd3.etcdrpc as etcdrpc

        def grant(c: Any) -> int:
            request = etcdrpc.LeaseGrantRequest(TTL=ttl, ID=0)
            response = c.leasestub.LeaseGrant(
                request, c.timeout, credentials=c.call_credentials, metadata=c.metadata
            )
            if response.error:
                raise CalicnmError(f"etcd refused a lease of {ttl}s: {response.error}")
            return int(response.ID)

        return self._call(grant)

    def keep_alive(self, lease: int) -> int:
        """As ``kv.Leases.keep_alive``: one LeaseKeepAlive request on a stream
        of its own, whose answer carries the new time to live (0: etcd does
        not know the lease).  etcd serves it from the leader without a raft
        write, so it makes no revision."""
        import etcd3.etcdrpc as etcdrpc

        def refresh(c: Any) -> int:
            requests = iter([etcdrpc.LeaseKeepAliveRequest(ID=lease)])
            stream = c.leasestub.LeaseKeepAlive(
                requests, c.timeout, credentials=c.call_credentials, metadata=c.metadata
            )
            for response in stream:
                return max(0, int(response.TTL))
            raise _Unreachable("the lease keepalive stream ended without an answer")

        return self._call(refresh)

    def revoke_lease(self, lease: int) -> bool:
        import etcd3.etcdrpc as etcdrpc

        def revoke(c: Any) -> bool:
            request = etcdrpc.LeaseRevokeRequest(ID=lease)
            try:
                c.leasestub.LeaseRevoke(
                    request, c.timeout, credentials=c.call_credentials, metadata=c.metadata
                )
            except Exception as exc:
                if _lease_not_found(exc):
                    return False
                raise
            return True

        return self._call(revoke)

    def put_leased(self, key: str, value: str, lease: int) -> int:
        import etcd3.etcdrpc as etcdrpc

        def put(c: Any) -> int:
            request = etcdrpc.PutRequest(
                key=key.encode("utf-8", "surrogateescape"),
                value=value.encode("utf-8", "surrogateescape"),
                lease=lease,
            )
            try:
                response = c.kvstub.Put(
                    request, c.timeout, credentials=c.call_credentials, metadata=c.metadata
                )
            except Exception as exc:
                if _lease_not_found(exc):
                    raise LeaseLost(f"etcd no longer holds lease {lease:x}") from exc
                raise
            return int(response.header.revision)

        return self._call(put)

    def watch(self, prefix: str, notify: Callable[[bool], None]) -> Callable[[], None]:
        """Call ``notify(True)`` on every change under ``prefix`` and
        ``notify(False)`` once if the watch breaks (it is then dead: watch
        again).  Returns a function that cancels the watch (idempotent; once
        it has returned, only a ``notify`` call already under way can still
        finish).

        The watch is made on the first endpoint that answers; it breaks when
        that member stops, loses its leader, or the store is closed."""

        def start(client: Any) -> _Watch:
            return _Watch(client, prefix, notify, self._timeout).start()

        return self._call(start).cancel

    def close(self) -> None:
        """Close every client.  Calls still running fail with
        ``DatastoreUnavailable``, live watches report ``notify(False)``;
        later calls raise ``DatastoreUnavailable``."""
        with self._lock:
            self._closed = True
            clients = list(self._clients.values())
            self._clients.clear()
        for client in clients:
            try:
                client.close()
            except Exception as exc:  # closing must not fail the caller
                _log.debug("closing an etcd client: %s", exc)


def _url(ep: EtcdEndpoint) -> str:
    return f"{'https' if ep.secure else 'http'}://{ep.host}:{ep.port}"


def _rpc_text(err: Any) -> str:
    try:
        code = err.code()
        details = err.details()
    except Exception:
        return str(err)
    name = getattr(code, "name", str(code))
    return f"{name}: {details}" if details else str(name)


def _classify(exc: BaseException) -> tuple[bool, str]:
    """(does it say the endpoint could not serve the call?, a one-line text)."""
    import etcd3.exceptions as e3
    import grpc

    if isinstance(exc, _Unreachable):
        return True, str(exc)
    if isinstance(exc, grpc.RpcError):
        code = getattr(exc.code(), "name", "") if hasattr(exc, "code") else ""
        return code in _REACHABILITY_CODES, _one_line(_rpc_text(exc))
    if isinstance(exc, e3.Etcd3Exception):
        # etcd3 translated a grpc error (which it keeps as __context__).
        cause = exc.__context__
        text = _rpc_text(cause) if isinstance(cause, grpc.RpcError) else repr(exc)
        reachability = isinstance(
            exc,
            (
                e3.ConnectionFailedError,
                e3.ConnectionTimeoutError,
                e3.InternalServerError,
                e3.WatchTimedOut,
            ),
        )
        return reachability, _one_line(text)
    if isinstance(exc, ValueError) and any(
        words in str(exc).lower() for words in ("closed channel", "channel closed")
    ):
        # grpc: "Cannot invoke RPC on closed channel!" ("...: Channel closed!")
        return True, str(exc)
    _log.error("unexpected error from the etcd client", exc_info=exc)
    return False, _one_line(f"{type(exc).__name__}: {exc}")


def _lease_not_found(exc: BaseException) -> bool:
    """Is ``exc`` etcd saying it does not know the lease named?"""
    import grpc

    return (
        isinstance(exc, grpc.RpcError)
        and hasattr(exc, "code")
        and exc.code() == grpc.StatusCode.NOT_FOUND
        and "lease not found" in _rpc_text(exc)
    )


def _one_line(text: str) -> str:
    return " ".join(text.split())


def _commit(c: Any, txn: Txn, check_applied: bool) -> int:
    import etcd3.etcdrpc as etcdrpc
    import etcd3.transactions as ops

    compare = []
    for key, revision in txn.compare:
        if revision == ABSENT:
            compare.append(c.transactions.version(key) == 0)
        else:
            compare.append(c.transactions.mod(key) == revision)
    success = [ops.Put(k, v) for k, v in txn.puts] + [ops.Delete(k) for k in txn.deletes]
    failure = [ops.Get(k) for k in _keys_of(txn)] if check_applied else []
    # etcd3's own transaction() drops the response header; the header's
    # revision is the new mod_revision of every key written, which lets IPAM
    # compare against its own last write next time instead of reading the
    # block again.
    request = etcdrpc.TxnRequest(
        compare=[x.build_message() for x in compare],
        success=c._ops_to_requests(success),
        failure=c._ops_to_requests(failure),
    )
    response = c.kvstub.Txn(request, c.timeout, credentials=c.call_credentials, metadata=c.metadata)
    if response.succeeded:
        return int(response.header.revision)
    if not check_applied:
        return 0
    now = {
        key: (r.response_range.kvs[0] if r.response_range.kvs else None)
        for key, r in zip(_keys_of(txn), response.responses, strict=True)
    }
    return _applied_revision(c, txn, now, int(response.header.revision))


def _keys_of(txn: Txn) -> list[str]:
    keys = [k for k, _ in txn.compare] + [k for k, _ in txn.puts] + list(txn.deletes)
    return list(dict.fromkeys(keys))


def _applied_revision(c: Any, txn: Txn, now: dict[str, Any], header: int) -> int:
    """The revision at which an earlier try of ``txn``, whose answer was lost,
    was applied; 0 if it was not (or if that cannot be told any more).

    ``now`` holds the txn's keys as they are at revision ``header``, read in
    the same etcd txn as the retry that just lost its compare.  The evidence
    comes from history, which nothing can change: the first change after the
    compared revision of a compared key (for "must not exist": the key's
    creation) is the only write that can be this txn; it is, if at that
    revision every key the txn puts holds exactly its value and was written
    then (one etcd txn, one revision), and every key it deletes is gone."""
    import grpc

    puts = dict(txn.puts)
    evidence = [(k, r) for k, r in txn.compare if k in puts or k in txn.deletes]
    if not evidence:
        return 0
    key, compared = evidence[0]
    kv = now[key]
    try:
        if compared == ABSENT:
            if kv is None or key not in puts:
                return 0
            candidate = int(kv.create_revision)
        else:
            if kv is not None and kv.mod_revision == compared:
                return 0  # unchanged since: the compare failed on another key
            high = int(kv.mod_revision) if kv is not None else header
            candidate = _first_change_after(c, key, compared, high)
        for k, value in txn.puts:
            old = _range_at(c, k, candidate)
            if old is None or old.mod_revision != candidate:
                return 0
            if old.value != value.encode("utf-8", "surrogateescape"):
                return 0
        for k in txn.deletes:
            if _range_at(c, k, candidate) is not None:
                return 0
    except grpc.RpcError as exc:
        if exc.code() != grpc.StatusCode.OUT_OF_RANGE:
            raise
        _log.warning("cannot tell whether a lost etcd txn was applied: history compacted (%s)", exc)
        return 0
    _log.info("an etcd txn whose answer was lost had been applied at revision %d", candidate)
    return candidate


def _read_pages(c: Any, prefix: str) -> tuple[list[KV], int]:
    """Every key under ``prefix`` (every key, for ""), page by page at the
    revision of the first page.  Raises what gRPC raises."""
    import etcd3.etcdrpc as etcdrpc
    import etcd3.utils as utils

    start = prefix.encode("utf-8", "surrogateescape")
    end = utils.increment_last_byte(start) if start else b"\0"
    found: list[KV] = []
    revision = 0
    key = start or b"\0"
    for _page in range(MAX_PAGES):
        request = etcdrpc.RangeRequest(key=key, range_end=end, limit=PAGE_KEYS, revision=revision)
        response = c.kvstub.Range(
            request, c.timeout, credentials=c.call_credentials, metadata=c.metadata
        )
        if not revision:
            revision = int(response.header.revision)
        found.extend(
            KV(
                kv.key.decode(errors="surrogateescape"),
                kv.value.decode(errors="surrogateescape"),
                kv.mod_revision,
            )
            for kv in response.kvs
        )
        if not response.more or not response.kvs:
            return found, revision
        key = response.kvs[-1].key + b"\0"
    raise DatastoreUnavailable(f"listing {prefix} took more than {MAX_PAGES} pages")


def _range_at(c: Any, key: str, revision: int) -> Any:
    """``key`` as it was at ``revision`` (its KeyValue, None if absent)."""
    import etcd3.etcdrpc as etcdrpc

    # Built here: etcd3 0.12's request builder drops its ``revision`` argument.
    request = etcdrpc.RangeRequest(key=key.encode("utf-8", "surrogateescape"), revision=revision)
    response = c.kvstub.Range(
        request, c.timeout, credentials=c.call_credentials, metadata=c.metadata
    )
    return response.kvs[0] if response.kvs else None


def _first_change_after(c: Any, key: str, revision: int, changed: int) -> int:
    """The first revision after ``revision`` (where ``key`` was last written)
    at which ``key`` was written or deleted; ``changed`` is a revision by
    which it had been.  A binary search over history: log2(changed -
    revision) reads."""
    low, high = revision, changed
    while high - low > 1:
        middle = (low + high) // 2
        kv = _range_at(c, key, middle)
        if kv is not None and kv.mod_revision == revision:
            low = middle
        else:
            high = middle
    return high


class WatchCompacted(CalicnmError):
    """etcd no longer holds the history a watch was asked to start from."""


class _Watch:
    """One watch on one client: its own gRPC stream and reader thread.

    States: ``starting`` (until etcd confirms), ``live``, ``cancelled`` (by
    the caller) or ``broken``.  A live watch that breaks calls
    ``notify(False)`` (or, for a change stream, ``on_end``) exactly once and
    its thread ends; a cancelled one ends quietly.  Nothing is raised in the
    thread.  A change stream (``start_revision`` and ``on_changes`` given)
    passes each response's events on as ``Change`` batches, and ends as
    broken if ``on_changes`` raises; a plain watch only calls
    ``notify(True)``."""

    def __init__(
        self,
        client: Any,
        prefix: str,
        notify: Callable[[bool], None] | None,
        timeout: float,
        start_revision: int | None = None,
        on_changes: OnChanges | None = None,
        on_end: OnEnd | None = None,
    ) -> None:
        self._client = client
        self._prefix = prefix
        self._notify = notify
        self._timeout = timeout
        self._start_revision = start_revision
        self._on_changes = on_changes
        self._on_end = on_end
        self._lock = threading.Lock()
        self._state = "starting"
        self._created = threading.Event()
        self._error: Exception | None = None
        self._requests: queue.Queue[Any] = queue.Queue()
        self._stream: Any = None
        self._compacted = False

    def start(self) -> _Watch:
        """Open the stream and wait (``timeout``) for etcd to confirm the
        watch; raises (for ``_call`` to classify) if it does not."""
        import etcd3.etcdrpc as etcdrpc
        import etcd3.utils as utils

        key = self._prefix.encode()
        create = etcdrpc.WatchCreateRequest(key=key, range_end=utils.increment_last_byte(key))
        if self._start_revision is not None:
            create.start_revision = self._start_revision
        self._requests.put(etcdrpc.WatchRequest(create_request=create))
        metadata = (*(self._client.metadata or ()), REQUIRE_LEADER)
        stub = etcdrpc.WatchStub(self._client.channel)
        self._stream = stub.Watch(
            self._request_iter(), credentials=self._client.call_credentials, metadata=metadata
        )
        threading.Thread(target=self._run, name=f"etcd-watch {self._prefix}", daemon=True).start()
        if not self._created.wait(self._timeout):
            self.cancel()
            raise _Unreachable(f"no answer to a watch request in {self._timeout:.0f}s")
        if self._error is not None:
            raise self._error
        return self

    def cancel(self) -> None:
        with self._lock:
            if self._state in ("cancelled", "broken"):
                return
            self._state = "cancelled"
        self._created.set()
        self._requests.put(None)
        try:
            self._stream.cancel()
        except Exception as exc:  # the channel may already be closed
            _log.debug("cancelling an etcd watch: %s", exc)

    def _request_iter(self) -> Iterator[Any]:
        while (request := self._requests.get()) is not None:
            yield request

    def _run(self) -> None:
        error: Exception
        try:
            for response in self._stream:
                if not self._handle(response):
                    break
            error = _Unreachable("the etcd watch stream ended")
        except Exception as exc:  # RpcError, ValueError (closed channel), ...
            error = exc
        finally:
            self._requests.put(None)  # ends gRPC's request-sending thread
        self._end(error)

    def _handle(self, response: Any) -> bool:
        """Deal with one response; False when the watch is over."""
        if response.compact_revision or response.canceled:
            reason = response.cancel_reason or f"compacted at {response.compact_revision}"
            with self._lock:
                starting = self._state == "starting"
            if response.compact_revision:
                self._compacted = True
            if starting:
                self._error = (
                    WatchCompacted(f"etcd compacted {self._prefix} at {response.compact_revision}")
                    if response.compact_revision
                    else CalicnmError(f"etcd refused the watch on {self._prefix}: {reason}")
                )
            else:
                _log.warning("etcd ended the watch on %s: %s", self._prefix, reason)
            return False
        if response.created:
            with self._lock:
                if self._state == "starting":
                    self._state = "live"
            self._created.set()
            return True
        with self._lock:
            live = self._state == "live"
        if live:
            if self._on_changes is not None:
                changes = [_change(event) for event in response.events]
                if changes and not self._safe_call(lambda: self._on_changes(changes)):  # type: ignore[misc]
                    # Fail closed: a consumer that could not take a batch
                    # must not be handed the next one as if it had.  The
                    # stream ends (``on_end``), so the consumer stops trusting
                    # its copy and starts over from what it last applied.
                    return False
            else:
                self._safe_notify(True)
        return live

    def _end(self, error: Exception) -> None:
        with self._lock:
            state = self._state
            if state in ("starting", "live"):
                self._state = "broken"
        if state == "starting":
            if self._error is None:
                self._error = error
            self._created.set()
        elif state == "live":
            _, text = _classify(error)
            if not self._compacted:
                _log.warning("etcd watch on %s broke: %s", self._prefix, text)
            if self._on_end is not None:
                on_end, compacted = self._on_end, self._compacted
                self._safe_call(lambda: on_end(compacted))
            else:
                self._safe_notify(False)

    def _safe_notify(self, healthy: bool) -> None:
        notify = self._notify
        if notify is not None:
            self._safe_call(lambda: notify(healthy))

    def _safe_call(self, fn: Callable[[], None]) -> bool:
        """Call a consumer's callback; False (logged) if it raised."""
        try:
            fn()
        except Exception:
            _log.exception("etcd watch callback failed")
            return False
        return True


def _change(event: Any) -> Change:
    """A watch event as a ``Change`` (a delete has no value)."""
    kv = event.kv
    key = kv.key.decode(errors="surrogateescape")
    if event.type == 1:  # mvccpb.Event.DELETE
        return Change(key, None, int(kv.mod_revision))
    return Change(key, kv.value.decode(errors="surrogateescape"), int(kv.mod_revision))


def _text(raw: bytes) -> str:
    """Stored bytes as text.  Bytes that are not UTF-8 are kept as escapes
    (``surrogateescape``) instead of failing the whole read: the records
    layer then refuses just that record (``validation.check_utf8``)."""
    return raw.decode(errors="surrogateescape")
