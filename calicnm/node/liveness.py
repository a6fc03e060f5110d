"""This node's liveness: a record on an etcd lease, kept alive without writes.

At start the node grants a lease of ``ttl`` seconds and puts its liveness
record (``keys.liveness(host)``, a ``model.Liveness``: pid, start time,
version) on it.  Every ``ttl / 3`` seconds it sends a keepalive, which etcd
answers without a write: no revision and no watch event, so an idle cluster
stays idle.  The record therefore exists exactly while the node runs:

- a clean stop revokes the lease: the record is gone at once;
- a node that dies without stopping (kill -9, a lost host) sends no more
  keepalives: etcd deletes the record ``ttl`` seconds later at most;
- a lease etcd no longer holds (it expired while etcd was unreachable for
  longer than ``ttl``, or etcd lost its data) shows at the next keepalive,
  whose answer is a TTL of 0: a new lease is granted and the record written
  again in the same beat.

Failure behaviour: a beat that cannot reach etcd raises to ``run``, which
logs it (once per distinct reason) and tries again at the same pace; the
node never stops for it.  Readers: ``records.liveness`` (``calicnm status``,
``calicnm node show``).
"""

from __future__ import annotations

import importlib.metadata
import logging
import threading

from calicnm.errors import CalicnmError, LeaseLost
from calicnm.model import Liveness
from calicnm.store import keys
from calicnm.store.kv import Leases

_log = logging.getLogger(__name__)


def calicnm_version() -> str:
    try:
        return importlib.metadata.version("calicnm")
    except importlib.metadata.PackageNotFoundError:
        return "unknown"


class Heartbeat:
    """One node's lease and liveness record.

    State: ``lease`` (None until granted, and again once etcd lost it) and
    whether the record is written on it.  ``beat`` moves one step towards
    "record written on a live lease" or keeps it so; ``release`` ends it.
    Not thread-safe: one thread beats (``run``), and ``release`` runs after
    that thread has ended."""

    def __init__(self, store: Leases, record: Liveness, ttl: int) -> None:
        self._store = store
        self._record = record
        self._ttl = ttl
        self.lease: int | None = None
        self._written = False
        self.grants = 0
        """Leases granted so far (1 after the first beat; more after losses)."""

    @property
    def interval(self) -> float:
        """Seconds between keepalives: a third of the TTL, so two may be lost
        before the record expires."""
        return max(0.5, self._ttl / 3)

    def beat(self) -> None:
        """Grant a lease and write the record if either is missing, else keep
        the lease alive (and start over if etcd no longer holds it).  Raises
        ``CalicnmError`` (``DatastoreUnavailable`` ...) on failure."""
        if self.lease is not None and self._written:
            if self._store.keep_alive(self.lease) > 0:
                return
            _log.warning(
                "etcd no longer holds this node's lease %x (its liveness record expired); "
                "granting a new one",
                self.lease,
            )
            self.lease = None
        if self.lease is None:
            self.lease = self._store.grant_lease(self._ttl)
            self._written = False
            self.grants += 1
        try:
            self._store.put_leased(
                keys.liveness(self._record.host), self._record.to_json(), self.lease
            )
        except LeaseLost:
            self.lease = None  # expired between grant and write: next beat
            raise
        self._written = True
        _log.info("liveness record written host=%s ttl=%ds", self._record.host, self._ttl)

    def run(self, stop: threading.Event) -> None:
        """Beat now, then every ``interval`` seconds until ``stop`` is set.
        Never raises."""
        reported: str | None = None
        while True:
            try:
                self.beat()
                if reported is not None:
                    _log.info("liveness keepalives reach etcd again")
                reported = None
            except CalicnmError as exc:
                if str(exc) != reported:
                    _log.warning("liveness keepalive failed; retrying: %s", exc)
                    reported = str(exc)
            except Exception:  # the heartbeat must outlive any one beat
                _log.exception("liveness keepalive failed unexpectedly")
            if stop.wait(self.interval):
                return

    def release(self) -> bool:
        """Revoke the lease, deleting the record at once (a clean stop).
        True if a lease was revoked; failures are logged, not raised (the
        record then expires by itself)."""
        lease, self.lease, self._written = self.lease, None, False
        if lease is None:
            return False
        try:
            return self._store.revoke_lease(lease)
        except CalicnmError as exc:
            _log.warning("could not revoke this node's lease (it expires by itself): %s", exc)
            return False
