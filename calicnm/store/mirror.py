"""A copy of one datastore prefix kept current by a change stream.

The agent used to read the whole datastore after every etcd event, which
made each change cost every host a full read.  A ``PrefixMirror`` reads the
prefix once (``list_at``), then applies the changes etcd streams from the
revision after that read (``watch_changes``): each change costs one event
carrying its key and value, whatever the size of the cluster.  The records
layer decodes the copy exactly as it decodes etcd (``view`` offers the same
``get``/``list`` reads), so what the agent compiles from the mirror is, by
construction, what a fresh read would give.

Invariants:

- ``revision`` is the revision the copy is current at: every change up to it
  is applied, none after it.
- Changes are applied in revision order; one below ``revision`` (a repeat)
  is skipped.
- A stream that ends leaves the copy as it was; ``resume`` starts a new one
  from ``revision`` where etcd still holds that history, and ``reload``
  reads the prefix anew where it does not (compacted), where etcd's revision
  is now below the copy's (etcd was replaced, or restored from a backup: a
  watch from a future revision would wait silently), or when asked.
- ``fresh`` is False from the moment a stream ends until the next
  ``resume`` or ``reload`` succeeds: a reader that needs the current
  datastore then reads it itself.
- ``take_delta`` hands one consumer what changed since its last call: each
  changed key's latest value (None once deleted), or, after a reload or
  when asked, the whole copy.  Applying every delta in turn to a model of
  the prefix keeps that model equal to the copy.
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable
from dataclasses import dataclass

from calicnm.errors import DatastoreUnavailable
from calicnm.store.kv import KV, Change, ChangeSource

_log = logging.getLogger(__name__)


class MirrorView:
    """Read-only ``get``/``list`` over a frozen copy of the mirror."""

    def __init__(self, items: dict[str, KV]) -> None:
        self._items = items

    def get(self, key: str) -> KV | None:
        return self._items.get(key)

    def list(self, prefix: str) -> list[KV]:
        """The keys under ``prefix`` in key order (only those are sorted)."""
        found = [kv for key, kv in self._items.items() if key.startswith(prefix)]
        found.sort(key=lambda kv: kv.key)
        return found


@dataclass(frozen=True)
class MirrorDelta:
    """What changed in the copy since the last ``take_delta``.  ``reset``: the
    consumer must drop what it holds and take ``changes`` (then the whole
    copy) as everything there is."""

    reset: bool
    changes: dict[str, KV | None]
    revision: int
    """The copy's revision when the delta was taken."""


class PrefixMirror:
    """The keys under ``prefix`` of ``source``, kept current (see the module
    docstring).  ``on_change()`` is called (in the stream's thread) after each
    batch is applied and when the stream ends, so a reader can wake."""

    def __init__(
        self, source: ChangeSource, prefix: str, on_change: Callable[[], None] | None = None
    ) -> None:
        self._source = source
        self._prefix = prefix
        self._on_change = on_change or (lambda: None)
        self._lock = threading.Lock()
        self._items: dict[str, KV] = {}
        self._revision = 0
        self._loaded = False
        self._live = False
        self._compacted = False
        self._cancel: Callable[[], None] | None = None
        self._pending: dict[str, KV | None] = {}
        self._reset = True
        self.reloads = 0
        """Full reads of the prefix so far."""

    @property
    def revision(self) -> int:
        return self._revision

    @property
    def fresh(self) -> bool:
        """Is the copy current (loaded, and its stream still running)?"""
        with self._lock:
            return self._loaded and self._live

    def get(self, key: str) -> KV | None:
        """One key of the copy as it is now."""
        with self._lock:
            return self._items.get(key)

    def view(self) -> MirrorView:
        """The copy as it is now, frozen."""
        with self._lock:
            return MirrorView(dict(self._items))

    def take_delta(self, whole: bool = False) -> MirrorDelta:
        """The changes since the last call (``whole``: the whole copy, as a
        reset), and start collecting anew.  For one consumer only."""
        with self._lock:
            if whole or self._reset:
                delta = MirrorDelta(True, dict(self._items), self._revision)
            else:
                delta = MirrorDelta(False, self._pending, self._revision)
            self._pending = {}
            self._reset = False
        return delta

    def start(self) -> None:
        """Make the copy current: resume the stream where the copy stopped if
        etcd still has that history, else read the prefix anew.  Raises what
        the source raises (``DatastoreUnavailable``); the copy then stays as
        it was and not fresh."""
        with self._lock:
            if self._live:
                return
            resumable = self._loaded and not self._compacted
        if resumable and self._resume():
            return
        self.reload()

    def reload(self) -> None:
        """Read the prefix anew, then stream from the revision after the read
        (twice at most, if etcd compacts that history in between)."""
        self.stop()
        for _attempt in range(2):
            kvs, revision = self._source.list_at(self._prefix)
            with self._lock:
                self._items = {kv.key: kv for kv in kvs}
                self._pending = {}
                self._reset = True
                self._revision = revision
                self._loaded = True
                self.reloads += 1
            if self._resume():
                return
        raise DatastoreUnavailable(
            f"etcd compacted the history of {self._prefix} faster than it could be read"
        )

    def stop(self) -> None:
        """End the stream; the copy stays as it is, not fresh."""
        with self._lock:
            cancel, self._cancel = self._cancel, None
            self._live = False
        if cancel is not None:
            cancel()

    def _resume(self) -> bool:
        """Stream from ``revision`` itself (its changes come again and are
        applied again, unchanged): True once it runs, False if etcd no longer
        holds that history.  Starting one revision early matters: etcd's
        compaction at ``revision + 1`` drops a delete made at that revision,
        yet still accepts a watch from it, which would miss the delete.
        DatastoreUnavailable if the stream broke at once."""
        if self._loaded and self._source.current_revision() < self._revision:
            _log.warning(
                "etcd's revision is below the copy's %d (etcd replaced or restored): "
                "reading %s anew",
                self._revision,
                self._prefix,
            )
            return False
        with self._lock:
            after = max(0, self._revision - 1)
            self._live = True
            self._compacted = False
        try:
            cancel = self._source.watch_changes(self._prefix, after, self._apply, self._ended)
        except BaseException:
            with self._lock:
                self._live = False
            raise
        with self._lock:
            if self._live:
                self._cancel = cancel
                return True
            compacted = self._compacted
        cancel()
        if compacted:
            return False
        raise DatastoreUnavailable(f"the change stream on {self._prefix} broke as it started")

    def _apply(self, changes: list[Change]) -> None:
        """Apply a batch; a change older than the copy (a repeat) is skipped.
        The changes of one transaction share a revision, so equal is applied."""
        with self._lock:
            for change in changes:
                if change.revision < self._revision:
                    continue
                if change.value is None:
                    self._items.pop(change.key, None)
                    self._pending[change.key] = None
                else:
                    kv = KV(change.key, change.value, change.revision)
                    self._items[change.key] = kv
                    self._pending[change.key] = kv
                self._revision = change.revision
        self._on_change()

    def _ended(self, compacted: bool) -> None:
        with self._lock:
            self._live = False
            self._compacted = compacted
            self._cancel = None
        _log.warning(
            "change stream on %s ended (%s) at revision %d",
            self._prefix,
            "history compacted" if compacted else "broken",
            self._revision,
        )
        self._on_change()
