"""Test doubles that model state, never call sequences.

``MemoryStore`` implements the ``Store`` protocol with etcd's revision
semantics (a global counter; each write stamps the key's mod_revision), so
compare-and-swap code behaves as it does against etcd, and etcd's prefix
watches and leases (on an injectable clock: a lease's keys are deleted, in
one revision, by the first call made after it expired).  ``FakePlumbing``
keeps the links it would have made, so tests assert the resulting host
state.

The kernel at the adapter boundary, after Felix's IptablesStub: each fake
parses the real input of the command it replaces and refuses what the real
one refuses, so a test fails where the host would.  ``FakeIptables``
(iptables-restore / iptables-save), ``FakeIpsets`` (ipset restore; linked
to a ``FakeIptables`` it knows which sets rules still use), ``FakeRoutes``
(the agent's endpoint routes), ``FakeTunnels`` (``route_sync.Tunnels``) and
``FakeBird`` (BIRD's running configuration).
"""

from __future__ import annotations

import ipaddress
import shlex
import threading
import time
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any

from calicnm.endpoint import LinkPlan
from calicnm.errors import DataplaneError, DatastoreUnavailable, LeaseLost
from calicnm.host.ipsets import Ipsets
from calicnm.host.iptables import Backend, Iptables
from calicnm.store.kv import ABSENT, KV, Change, OnChanges, OnEnd, Txn


class MemoryStore:
    def __init__(self, clock: Callable[[], float] = time.monotonic) -> None:
        self._data: dict[str, tuple[str, int]] = {}
        self._clock = clock
        self._leases: dict[int, tuple[int, float]] = {}
        """Live leases: id -> (ttl, when it expires on ``clock``)."""
        self._key_lease: dict[str, int] = {}
        self._next_lease = 0x1000
        self._revision = 0
        self._lock = threading.Lock()
        self._down = False
        self._watches: dict[int, tuple[str, Callable[[bool], None]]] = {}
        self._next_watch = 0
        self.commits = 0
        self._history: list[Change] = []
        self._compacted = 0
        self._streams: dict[int, tuple[str, OnChanges, OnEnd]] = {}
        self.reads = 0
        """``get``, ``list`` and ``list_at`` calls so far."""
        self._ordered = threading.RLock()
        """Held across a write and the delivery of its changes, so every
        stream sees changes in revision order, as from etcd."""

    @property
    def down(self) -> bool:
        """True: every call fails as with an unreachable etcd, and every
        watch breaks (its ``notify(False)``, then it is dead)."""
        return self._down

    @down.setter
    def down(self, value: bool) -> None:
        self._down = value
        if value:
            with self._lock:
                broken = list(self._watches.values())
                self._watches.clear()
                streams = list(self._streams.values())
                self._streams.clear()
            for _prefix, notify in broken:
                notify(False)
            for _prefix, _on_changes, on_end in streams:
                on_end(False)

    def _check(self) -> None:
        if self._down:
            raise DatastoreUnavailable("etcd is unreachable at memory:0: test")
        self._expire()

    # ---- leases, as etcd's -------------------------------------------------

    def _expire(self) -> None:
        """Delete the keys of every lease past its time, one revision per
        lease, as etcd's lessor does."""
        with self._ordered:
            now = self._clock()
            with self._lock:
                due = [lid for lid, (_ttl, end) in self._leases.items() if end <= now]
            for lease in due:
                self._end_lease(lease)

    def _end_lease(self, lease: int) -> bool:
        with self._ordered:
            with self._lock:
                if self._leases.pop(lease, None) is None:
                    return False
                mine = sorted(k for k, lid in self._key_lease.items() if lid == lease)
                changes = []
                if mine:
                    self._revision += 1
                    for key in mine:
                        del self._key_lease[key]
                        del self._data[key]
                        changes.append(Change(key, None, self._revision))
                    self._record(changes)
            if changes:
                self._changed(mine, changes)
            return True

    def grant_lease(self, ttl: int) -> int:
        self._check()
        with self._lock:
            self._next_lease += 1
            self._leases[self._next_lease] = (ttl, self._clock() + ttl)
            return self._next_lease

    def keep_alive(self, lease: int) -> int:
        self._check()
        with self._lock:
            found = self._leases.get(lease)
            if found is None:
                return 0
            self._leases[lease] = (found[0], self._clock() + found[0])
            return found[0]

    def revoke_lease(self, lease: int) -> bool:
        self._check()
        return self._end_lease(lease)

    def put_leased(self, key: str, value: str, lease: int) -> int:
        self._check()
        with self._ordered:
            with self._lock:
                if lease not in self._leases:
                    raise LeaseLost(f"etcd no longer holds lease {lease:x}")
                self._revision += 1
                self._data[key] = (value, self._revision)
                self._key_lease[key] = lease
                changes = [Change(key, value, self._revision)]
                self._record(changes)
                revision = self._revision
            self._changed([key], changes)
        return revision

    def leases(self) -> dict[int, list[str]]:
        """Every live lease and the keys on it."""
        with self._lock:
            return {
                lid: sorted(k for k, owner in self._key_lease.items() if owner == lid)
                for lid in self._leases
            }

    def watch(self, prefix: str, notify: Callable[[bool], None]) -> Callable[[], None]:
        """As ``EtcdStore.watch``: ``notify(True)`` after every change under
        ``prefix`` (called in the writer's thread, after the write), and
        ``notify(False)`` once when the store goes down; returns the cancel."""
        self._check()
        with self._lock:
            self._next_watch += 1
            watch_id = self._next_watch
            self._watches[watch_id] = (prefix, notify)

        def cancel() -> None:
            with self._lock:
                self._watches.pop(watch_id, None)

        return cancel

    def live_watches(self) -> int:
        with self._lock:
            return len(self._watches) + len(self._streams)

    def watch_changes(
        self, prefix: str, after: int, on_changes: OnChanges, on_end: OnEnd
    ) -> Callable[[], None]:
        """As ``EtcdStore.watch_changes``.  The history after ``after`` is
        replayed before this returns (in the caller's thread); a compacted
        one calls ``on_end(True)`` instead.  Later changes are delivered in
        the writer's thread, after the write."""
        self._check()
        with self._lock:
            if after + 1 < self._compacted:  # as etcd: start revision < compaction
                compacted = True
            else:
                compacted = False
                self._next_watch += 1
                stream_id = self._next_watch
                self._streams[stream_id] = (prefix, on_changes, on_end)
                replay = [
                    c for c in self._history if c.revision > after and c.key.startswith(prefix)
                ]
        if compacted:
            on_end(True)
            return lambda: None
        if replay:
            on_changes(replay)

        def cancel() -> None:
            with self._lock:
                self._streams.pop(stream_id, None)

        return cancel

    def compact(self, revision: int | None = None) -> None:
        """Forget the history before ``revision`` (default: the current one), as
        etcd's compaction does: a change stream asked to start before it is
        told it is compacted.  Like etcd, a delete made at ``revision`` itself
        is forgotten too, while a stream may still start there."""
        with self._lock:
            # As etcd, which refuses a compaction older than the last one.
            wanted = self._revision if revision is None else revision
            self._compacted = max(self._compacted, wanted)
            self._history = [
                c
                for c in self._history
                if c.revision > self._compacted
                or (c.revision == self._compacted and c.value is not None)
            ]

    def current_revision(self) -> int:
        self._check()
        with self._lock:
            return self._revision

    def list_at(self, prefix: str) -> tuple[list[KV], int]:
        self._check()
        with self._lock:
            self.reads += 1
            kvs = [KV(k, *v) for k, v in sorted(self._data.items()) if k.startswith(prefix)]
            return kvs, self._revision

    def _record(self, changes: list[Change]) -> None:
        """Called under the lock by every write: keep the history."""
        self._history.extend(changes)

    def _changed(self, changed: Iterable[str], recent: list[Change] | None = None) -> None:
        with self._lock:
            watches = list(self._watches.values())
            streams = list(self._streams.values())
        recent = recent or []
        keys = list(changed)
        for prefix, notify in watches:
            if any(k.startswith(prefix) for k in keys):
                notify(True)
        for prefix, on_changes, _on_end in streams:
            mine = [c for c in recent if c.key.startswith(prefix)]
            if mine:
                on_changes(mine)

    def get(self, key: str) -> KV | None:
        self._check()
        with self._lock:
            self.reads += 1
            item = self._data.get(key)
            return KV(key, *item) if item else None

    def list(self, prefix: str) -> list[KV]:
        self._check()
        with self._lock:
            self.reads += 1
            return [KV(k, *v) for k, v in sorted(self._data.items()) if k.startswith(prefix)]

    def put(self, key: str, value: str) -> None:
        self._check()
        with self._ordered:
            with self._lock:
                self._revision += 1
                self._data[key] = (value, self._revision)
                self._key_lease.pop(key, None)
                changes = [Change(key, value, self._revision)]
                self._record(changes)
            self._changed([key], changes)

    def delete(self, key: str) -> bool:
        self._check()
        with self._ordered:
            changes = []
            with self._lock:
                found = self._data.pop(key, None) is not None
                self._key_lease.pop(key, None)
                if found:
                    self._revision += 1
                    changes = [Change(key, None, self._revision)]
                    self._record(changes)
            if found:
                self._changed([key], changes)
        return found

    def commit(self, txn: Txn) -> int:
        self._check()
        with self._ordered:
            with self._lock:
                self.commits += 1
                for key, revision in txn.compare:
                    current = self._data.get(key)
                    if revision == ABSENT and current is not None:
                        return 0
                    if revision != ABSENT and (current is None or current[1] != revision):
                        return 0
                self._revision += 1
                changes = []
                for key, value in txn.puts:
                    self._data[key] = (value, self._revision)
                    self._key_lease.pop(key, None)
                    changes.append(Change(key, value, self._revision))
                for key in txn.deletes:
                    self._key_lease.pop(key, None)
                    if self._data.pop(key, None) is not None:
                        changes.append(Change(key, None, self._revision))
                self._record(changes)
                revision = self._revision
            self._changed([k for k, _ in txn.puts] + list(txn.deletes), changes)
        return revision

    def close(self) -> None:
        pass

    def all_keys(self) -> list[str]:
        return sorted(self._data)


WriteHook = Callable[[list[str]], None]


class HookedStore(MemoryStore):
    """A ``MemoryStore`` with hooks around every write (``put``, ``delete``,
    ``commit``), for the moments a test must control: another writer
    landing between a read and a write, a reply lost after the write.

    ``before_write(keys)`` runs before a write is tried, with the keys it
    writes or deletes; ``after_write(keys)`` runs after a write has been
    applied, in the writer's thread, before the call returns (a commit
    whose compare failed was not applied and calls no ``after_write``).
    Either may raise, e.g. ``DatastoreUnavailable``: before the write it
    fails cleanly, after it the write is in the store and the reply lost.
    A hook that writes to the store itself is not called again meanwhile.
    """

    def __init__(self) -> None:
        super().__init__()
        self.before_write: WriteHook | None = None
        self.after_write: WriteHook | None = None
        self._in_hook = threading.local()

    def _hook(self, hook: WriteHook | None, keys: list[str]) -> None:
        if hook is None or getattr(self._in_hook, "on", False):
            return
        self._in_hook.on = True
        try:
            hook(keys)
        finally:
            self._in_hook.on = False

    def put(self, key: str, value: str) -> None:
        self._hook(self.before_write, [key])
        super().put(key, value)
        self._hook(self.after_write, [key])

    def delete(self, key: str) -> bool:
        self._hook(self.before_write, [key])
        found = super().delete(key)
        self._hook(self.after_write, [key])
        return found

    def commit(self, txn: Txn) -> int:
        keys = [k for k, _ in txn.puts] + list(txn.deletes)
        self._hook(self.before_write, keys)
        revision = super().commit(txn)
        if revision:
            self._hook(self.after_write, keys)
        return revision

    def contents(self) -> dict[str, tuple[str, int]]:
        """Every key with its value and revision: equal before and after a
        call exactly when the call wrote nothing."""
        return {kv.key: (kv.value, kv.revision) for kv in self.list("")}


class FakePlumbing:
    """The host namespace's veth pairs.  ``sandbox`` moves a peer into a
    container (as Docker does after Join): it is then no longer a link of
    the host namespace; removing either end removes the pair."""

    def __init__(self) -> None:
        self.links: dict[str, LinkPlan] = {}
        self.sandboxed: set[str] = set()
        self.fail_create = False

    def create(self, plan: LinkPlan) -> None:
        if self.fail_create:
            raise DataplaneError(f"cannot create veth {plan.host_if}: test failure")
        self.remove(plan.host_if, plan.peer_if)  # a leftover is replaced, as on a host
        self.links[plan.host_if] = plan

    def remove(self, host_if: str, peer_if: str | None = None) -> bool:
        for plan in list(self.links.values()):
            if {plan.host_if, plan.peer_if} & {host_if, peer_if} - {None}:
                del self.links[plan.host_if]
                self.sandboxed.discard(plan.peer_if)
                return True
        return False

    def exists(self, ifname: str) -> bool:
        return ifname in self.links_with_prefix("")

    def sandbox(self, peer_if: str) -> None:
        assert any(p.peer_if == peer_if for p in self.links.values()), peer_if
        self.sandboxed.add(peer_if)

    def destroy_sandboxes(self) -> None:
        """Every container namespace is gone (a reboot, say): with it each
        sandboxed peer, and so its whole pair."""
        for plan in list(self.links.values()):
            if plan.peer_if in self.sandboxed:
                self.remove(plan.host_if)

    def links_with_prefix(self, *prefixes: str) -> list[str]:
        names = {p.host_if for p in self.links.values()}
        names |= {p.peer_if for p in self.links.values() if p.peer_if not in self.sandboxed}
        return sorted(n for n in names if n.startswith(prefixes))


class FakeDocker:
    """dockerd as the ownership collector reads it: the endpoint ids of each
    network it knows; ``answering = False`` is a dockerd that is down."""

    def __init__(self) -> None:
        self.networks: dict[str, set[str]] = {}
        self.answering = True

    def ping(self) -> None:
        if not self.answering:
            raise ConnectionRefusedError("dockerd is down")

    def network_endpoints(self, network_id: str) -> frozenset[str] | None:
        self.ping()
        known = self.networks.get(network_id)
        return None if known is None else frozenset(known)


# ---- the kernel at the adapter boundary ----------------------------------------

BUILTIN_CHAINS: dict[str, tuple[str, ...]] = {
    "filter": ("INPUT", "FORWARD", "OUTPUT"),
    "nat": ("PREROUTING", "INPUT", "OUTPUT", "POSTROUTING"),
    "raw": ("PREROUTING", "OUTPUT"),
}
"""The kernel's own chains of each table FakeIptables models."""
TARGETS = frozenset({"ACCEPT", "DROP", "RETURN", "REJECT", "LOG", "MARK", "CONNMARK", "NFLOG"})
"""Target extensions valid in every table."""
TABLE_TARGETS: dict[str, frozenset[str]] = {
    "nat": frozenset({"MASQUERADE", "SNAT", "DNAT", "REDIRECT"}),
    "raw": frozenset({"CT"}),
}
MAX_CHAIN_NAME = 28
IFNAMSIZ = 16


class _Refused(Exception):
    """One line refused; becomes a ``DataplaneError`` naming the line."""


@dataclass
class FakeChain:
    """A chain: its policy ("-" for a user chain), its rules in order, and
    the ``FakeIptables.commits`` value of the last transaction that touched it
    (like an etcd mod_revision: a chain not written keeps its generation)."""

    policy: str
    rules: list[str] = field(default_factory=list)
    generation: int = 0


class FakeIptables(Iptables):
    """``Iptables`` with the kernel's tables in memory instead of a process.

    ``restore`` interprets ``iptables-restore --noflush`` input the way the
    real one does: each ``*table`` ... ``COMMIT`` block is one transaction,
    applied whole or not at all, committed at its ``COMMIT`` (an earlier
    table of the same input stays committed when a later one fails, as with
    the real command).  It refuses, with ``DataplaneError`` and the table
    untouched, what the real one refuses: a rule for a chain that does not
    exist, a ``-j``/``-g`` to a chain that does not exist or to a kernel
    chain, an unknown target, a ``--match-set`` of an ipset that does not
    exist (when linked to a ``FakeIpsets``), ``-X`` of a kernel chain or of
    a chain that is missing, still has rules or is still jumped to, ``-D``
    of a rule that is not there, a chain name over 28 characters, and input
    that ends without ``COMMIT``.

    Rules are kept exactly as written (the real one would normalise
    ``-s 10.0.0.1`` to ``10.0.0.1/32``; calicnm only reads back its own
    unconditional jumps, which need no normalising).

    For tests: ``chains``/``rules`` inspect, ``command`` changes the tables
    from outside as ``iptables -t TABLE ...`` would (dockerd, an operator),
    ``fail_next_restore`` makes the next ``restore`` fail with nothing
    applied, ``commits`` counts committed transactions.
    """

    def __init__(self, tables: Iterable[str] = ("filter", "nat", "raw")) -> None:
        # No super().__init__(): there is no binary to detect.
        self.backend = Backend("fake", "iptables-save", "iptables-restore", "iptables")
        self._timeout = 0.0
        self._tables: dict[str, dict[str, FakeChain]] = {
            t: {c: FakeChain("ACCEPT") for c in BUILTIN_CHAINS[t]} for t in tables
        }
        self.ipsets: FakeIpsets | None = None
        """Set by ``FakeIpsets(iptables=...)``: then ``--match-set`` must name a set."""
        self.fail_next_restore = False
        self.commits = 0
        self._lock = threading.RLock()

    # ---- the Iptables interface ----

    def restore(self, text: str) -> None:
        with self._lock:
            if self.fail_next_restore:
                self.fail_next_restore = False
                raise DataplaneError("iptables-restore rejected the update: test failure")
            table: str | None = None
            work: dict[str, FakeChain] = {}
            touched: set[str] = set()
            lineno = 0
            for lineno, raw in enumerate(text.splitlines(), 1):
                line = raw.strip()
                if not line or line.startswith("#"):
                    continue
                try:
                    if line.startswith("*"):
                        if table is not None:
                            raise _Refused(f"table {line[1:]} starts before {table} is committed")
                        table = line[1:]
                        work = self._copy(table)
                        touched = set()
                    elif table is None:
                        raise _Refused("a command outside a *table ... COMMIT block")
                    elif line == "COMMIT":
                        self._commit(table, work, touched)
                        table = None
                    elif line.startswith(":"):
                        self._declare(work, line, touched)
                    else:
                        self._apply_command(table, work, line, touched)
                except _Refused as exc:
                    raise DataplaneError(
                        f"iptables-restore rejected the update: line {lineno} failed: {exc}"
                    ) from None
            if table is not None:
                raise DataplaneError(f"iptables-restore: COMMIT expected at line {lineno + 1}")

    def save(self, table: str = "filter") -> str:
        with self._lock:
            if table not in self._tables:
                raise DataplaneError(f"iptables-save failed: table {table} does not exist")
            chains = self._ordered(table)
            lines = ["# Generated by FakeIptables", f"*{table}"]
            lines += [f":{name} {chain.policy} [0:0]" for name, chain in chains.items()]
            lines += [f"-A {name} {rule}" for name, chain in chains.items() for rule in chain.rules]
            lines += ["COMMIT", "# Completed"]
            return "\n".join(lines) + "\n"

    # ---- inspection and outside interference ----

    def first_rule(self, table: str, chain: str) -> str | None:
        """What ``iptables -t TABLE -S CHAIN 1`` prints: rule 1 in ``-A`` form,
        "" for an empty chain, None for a missing chain (or table)."""
        with self._lock:
            found = self._tables.get(table, {}).get(chain)
            if found is None:
                return None
            return f"-A {chain} {found.rules[0]}" if found.rules else ""

    def chains(self, table: str = "filter") -> dict[str, list[str]]:
        """Every chain of ``table`` with its rules (a copy), kernel chains first."""
        with self._lock:
            return {name: list(chain.rules) for name, chain in self._ordered(table).items()}

    def rules(self, chain: str, table: str = "filter") -> list[str]:
        with self._lock:
            return list(self._tables[table][chain].rules)

    def generations(self, table: str = "filter") -> dict[str, int]:
        """Chain -> the commit that last wrote it (a flush, a rule added ...)."""
        with self._lock:
            return {name: chain.generation for name, chain in self._tables[table].items()}

    def command(self, line: str, table: str = "filter") -> None:
        """``iptables -t table <line>`` from outside calicnm, e.g.
        ``-N DOCKER-USER`` then ``-I FORWARD 1 -j DOCKER-USER``; refused like
        a restore line."""
        self.restore(f"*{table}\n{line}\nCOMMIT\n")

    def delete_chain(self, name: str, table: str = "filter") -> None:
        """What an operator must do to delete a chain by hand: delete every
        rule that jumps to it, flush it, delete it (one transaction)."""
        with self._lock:
            lines = [
                f"-D {parent} {rule}"
                for parent, rules in self.chains(table).items()
                for rule in rules
                if _target(rule)[1] == name
            ]
            self.restore("\n".join([f"*{table}", *lines, f"-F {name}", f"-X {name}", "COMMIT"]))

    def referenced_sets(self) -> set[str]:
        """Names of ipsets a rule of any table matches on (they cannot be destroyed)."""
        with self._lock:
            found: set[str] = set()
            for chains in self._tables.values():
                for chain in chains.values():
                    for rule in chain.rules:
                        words = _words(rule)
                        found.update(
                            words[i + 1]
                            for i, w in enumerate(words[:-1])
                            if w in ("--match-set", "--set")
                        )
            return found

    # ---- the transaction ----

    def _copy(self, table: str) -> dict[str, FakeChain]:
        if table not in self._tables:
            raise _Refused(f"can't initialize iptables table `{table}': Table does not exist")
        return {
            name: FakeChain(c.policy, list(c.rules), c.generation)
            for name, c in self._tables[table].items()
        }

    def _commit(self, table: str, work: dict[str, FakeChain], touched: set[str]) -> None:
        self.commits += 1
        for name in touched & set(work):
            work[name].generation = self.commits
        self._tables[table] = work

    def _ordered(self, table: str) -> dict[str, FakeChain]:
        chains = self._tables[table]
        builtin = [c for c in BUILTIN_CHAINS[table] if c in chains]
        return {n: chains[n] for n in [*builtin, *sorted(set(chains) - set(builtin))]}

    def _declare(self, work: dict[str, FakeChain], line: str, touched: set[str]) -> None:
        """``:CHAIN POLICY [p:b]``: with --noflush a user chain is flushed if
        it exists, else created; a kernel chain only takes its policy."""
        parts = line[1:].split()
        if len(parts) < 2:
            raise _Refused(f"malformed chain line {line!r}")
        name, policy = parts[0], parts[1]
        if name in _builtins(work):
            if policy not in ("-", "ACCEPT", "DROP"):
                raise _Refused(f"bad policy {policy!r} for {name}")
            if policy != "-":
                work[name].policy = policy
                touched.add(name)
            return
        _check_chain_name(name)
        if policy != "-":
            raise _Refused(f"cannot set a policy on user-defined chain {name}")
        if name in work:
            work[name].rules.clear()
        else:
            work[name] = FakeChain("-")
        touched.add(name)

    def _apply_command(
        self, table: str, work: dict[str, FakeChain], line: str, touched: set[str]
    ) -> None:
        parts = line.split(None, 2)
        op = parts[0]
        if len(parts) < 2:
            raise _Refused(f"{op} needs a chain")
        name = parts[1]
        rest = parts[2].strip() if len(parts) > 2 else ""
        if op in ("-N", "--new-chain"):
            _check_chain_name(name)
            if name in work:
                raise _Refused(f"chain {name} already exists")
            work[name] = FakeChain("-")
            touched.add(name)
            return
        if name not in work:
            raise _Refused(f"chain {name} does not exist")
        chain = work[name]
        if op in ("-A", "--append"):
            self._check_rule(table, work, rest)
            chain.rules.append(rest)
        elif op in ("-I", "--insert"):
            first, _, body = rest.partition(" ")
            position = 1
            if first.isdigit():
                position, rest = int(first), body.strip()
            if not 1 <= position <= len(chain.rules) + 1:
                raise _Refused(f"index of insertion {position} too big for {name}")
            self._check_rule(table, work, rest)
            chain.rules.insert(position - 1, rest)
        elif op in ("-D", "--delete"):
            if rest.isdigit():
                if not 1 <= int(rest) <= len(chain.rules):
                    raise _Refused(f"index of deletion {rest} too big for {name}")
                del chain.rules[int(rest) - 1]
            elif rest in chain.rules:
                chain.rules.remove(rest)
            else:
                raise _Refused(f"bad rule (does a matching rule exist in {name}?): {rest}")
        elif op in ("-F", "--flush"):
            chain.rules.clear()
        elif op in ("-X", "--delete-chain"):
            if name in _builtins(work):
                raise _Refused(f"cannot delete built-in chain {name}")
            if chain.rules:
                raise _Refused(f"chain {name} is not empty")
            users = sorted(
                p for p, c in work.items() if any(_target(r)[1] == name for r in c.rules)
            )
            if users:
                raise _Refused(f"chain {name} is still referenced by {', '.join(users)}")
            del work[name]
        else:
            raise _Refused(f"FakeIptables does not know {op}")
        touched.add(name)

    def _check_rule(self, table: str, work: dict[str, FakeChain], rule: str) -> None:
        words = _words(rule)
        jumps = [w for w in words if w in ("-j", "--jump", "-g", "--goto")]
        if len(jumps) > 1:
            raise _Refused(f"multiple -j/-g in {rule!r}")
        kind, target = _target(rule)
        if target is not None:
            if target in _builtins(work):
                raise _Refused(f"cannot jump to built-in chain {target}")
            if target not in work:
                known = TARGETS | TABLE_TARGETS.get(table, frozenset())
                if kind == "-g" or target not in known:
                    raise _Refused(f"Couldn't load target `{target}': No such file or directory")
        for flag in ("-i", "--in-interface", "-o", "--out-interface"):
            if flag in words[:-1]:
                ifname = words[words.index(flag) + 1]
                if len(ifname) >= IFNAMSIZ:
                    raise _Refused(f"interface name `{ifname}' must be shorter than IFNAMSIZ")
        for i, word in enumerate(words[:-1]):
            if (
                word == "--match-set"
                and self.ipsets is not None
                and words[i + 1] not in self.ipsets.sets
            ):
                raise _Refused(f"Set {words[i + 1]} doesn't exist.")


def _builtins(work: dict[str, FakeChain]) -> set[str]:
    return {name for name, chain in work.items() if chain.policy != "-"}


def _check_chain_name(name: str) -> None:
    if len(name) > MAX_CHAIN_NAME or not name or name[0] in "-!" or name in TARGETS:
        raise _Refused(f"Invalid chain name `{name}' ({MAX_CHAIN_NAME} chars max)")


def _words(rule: str) -> list[str]:
    try:
        return shlex.split(rule)
    except ValueError as exc:
        raise _Refused(f"cannot parse {rule!r}: {exc}") from None


def _target(rule: str) -> tuple[str | None, str | None]:
    """("-j" or "-g", target) of a rule, or (None, None) for a rule without one."""
    words = _words(rule)
    for i, word in enumerate(words[:-1]):
        if word in ("-j", "--jump"):
            return "-j", words[i + 1]
        if word in ("-g", "--goto"):
            return "-g", words[i + 1]
    return None, None


@dataclass
class FakeSet:
    kind: str
    maxelem: int
    members: set[str] = field(default_factory=set)


class FakeIpsets(Ipsets):
    """``Ipsets`` with the sets in memory: the fake stands in for the
    ``ipset`` binary (``_run``), so ``replace`` and ``destroy`` build their
    real scripts and this class interprets them.

    One ``ipset restore`` call is applied whole or not at all (the real one
    stops at the first bad line, keeping the lines before it; calicnm never
    relies on either).  Refused like the real one: ``create`` of an existing
    set without ``-exist`` or with another type, an unknown type, a name
    over 31 characters, ``add`` to a missing set, an element the type cannot
    hold (a /0 in ``hash:net``), a duplicate without ``-exist``, more than
    ``maxelem`` elements, ``flush`` or ``swap`` of a missing set, ``swap`` of
    sets of different types, ``destroy`` of a missing set or of one a rule
    of the linked ``FakeIptables`` still matches on.
    """

    def __init__(self, iptables: FakeIptables | None = None) -> None:
        # No super().__init__(): there is no binary to find.
        self._ipset = "ipset"
        self._timeout = 0.0
        self.sets: dict[str, FakeSet] = {}
        self.iptables = iptables
        if iptables is not None:
            iptables.ipsets = self
        self.fail_next_restore = False
        self._lock = threading.Lock()

    def members(self, name: str) -> set[str]:
        return set(self.sets[name].members)

    def _run(self, args: list[str], script: str | None = None) -> str:
        if args == ["list", "-n"]:
            with self._lock:
                return "".join(f"{name}\n" for name in sorted(self.sets))
        if args == ["restore"]:
            self.restore(script or "")
            return ""
        if args == ["save"]:
            with self._lock:
                return self._save()
        raise DataplaneError(f"FakeIpsets does not implement ipset {' '.join(args)}")

    def _save(self) -> str:
        """What ``ipset save`` prints: each set's ``create`` line, then its members
        (a ``hash:net`` /32 as a bare address, as the real one prints it)."""
        lines = []
        for name, fake in sorted(self.sets.items()):
            lines.append(f"create {name} {fake.kind} family inet maxelem {fake.maxelem}")
            for member in sorted(fake.members):
                shown = member[:-3] if member.endswith("/32") else member
                lines.append(f"add {name} {shown}")
        return "".join(f"{line}\n" for line in lines)

    def restore(self, script: str) -> None:
        """Interpret an ``ipset restore`` script atomically."""
        with self._lock:
            if self.fail_next_restore:
                self.fail_next_restore = False
                raise DataplaneError("ipset restore failed: test failure")
            work = {n: FakeSet(s.kind, s.maxelem, set(s.members)) for n, s in self.sets.items()}
            for lineno, line in enumerate(script.splitlines(), 1):
                words = line.split()
                if not words or words[0].startswith("#"):
                    continue
                try:
                    self._line(work, words)
                except _Refused as exc:
                    raise DataplaneError(
                        f"ipset restore failed: Error in line {lineno}: {exc}"
                    ) from None
            self.sets = work

    def _line(self, work: dict[str, FakeSet], words: list[str]) -> None:
        exist = "-exist" in words
        words = [w for w in words if w != "-exist"]
        cmd, args = words[0], words[1:]
        if not args:
            raise _Refused(f"{cmd} needs a set name (FakeIpsets does not do 'all sets')")
        name = args[0]
        if cmd == "create":
            self._create(work, name, args[1:], exist)
            return
        if name not in work:
            raise _Refused(f"The set with the given name does not exist: {name}")
        current = work[name]
        if cmd == "add" and len(args) == 2:
            for element in _elements(current.kind, args[1]):
                if element in current.members and not exist:
                    raise _Refused("Element cannot be added to the set: it's already added")
                current.members.add(element)
            if len(current.members) > current.maxelem:
                raise _Refused("Hash is full, cannot add more elements")
        elif cmd == "del" and len(args) == 2:
            for element in _elements(current.kind, args[1]):
                if element not in current.members and not exist:
                    raise _Refused("Element cannot be deleted from the set: it's not added")
                current.members.discard(element)
        elif cmd == "flush" and len(args) == 1:
            current.members.clear()
        elif cmd == "swap" and len(args) == 2:
            other = args[1]
            if other not in work:
                raise _Refused(f"The set with the given name does not exist: {other}")
            if work[other].kind != current.kind:
                raise _Refused("The sets cannot be swapped: their type does not match")
            work[name], work[other] = work[other], current
        elif cmd == "destroy" and len(args) == 1:
            if self.iptables is not None and name in self.iptables.referenced_sets():
                raise _Refused("Set cannot be destroyed: it is in use by a kernel component")
            del work[name]
        else:
            raise _Refused(f"FakeIpsets does not know {' '.join(words)!r}")

    @staticmethod
    def _create(work: dict[str, FakeSet], name: str, args: list[str], exist: bool) -> None:
        if len(name) > 31:
            raise _Refused(f"setname {name!r} is longer than 31 characters")
        if not args or args[0] not in ("hash:ip", "hash:net"):
            raise _Refused(f"Syntax error: typename {args[:1]} is unknown")
        options = dict(zip(args[1::2], args[2::2], strict=False))
        if options.get("family", "inet") != "inet" or set(options) - {
            "family",
            "maxelem",
            "hashsize",
        }:
            raise _Refused(f"FakeIpsets does not know the options {args[1:]}")
        wanted = FakeSet(args[0], int(options.get("maxelem", 65536)))
        current = work.get(name)
        if current is None:
            work[name] = wanted
        elif not exist or (current.kind, current.maxelem) != (wanted.kind, wanted.maxelem):
            raise _Refused("Set cannot be created: set with the same name already exists")


def _elements(kind: str, text: str) -> list[str]:
    try:
        net = ipaddress.IPv4Network(text, strict=False)
    except ValueError:
        raise _Refused(f"Syntax error: {text!r} is not an IPv4 address or network") from None
    if kind == "hash:net":
        if net.prefixlen == 0:
            raise _Refused("Syntax error: zero valued CIDR is not allowed")
        return [str(net)]
    if net.prefixlen < 16:
        raise _Refused(f"Syntax error: {text} is too large a range for hash:ip")
    return [str(ip) for ip in net]


class FakeRoutes:
    """The agent's ``Routes``: which links exist, and the /32 routes and
    permanent neighbour entries through them.  ``ensure_routes`` replaces
    (idempotent, repairs a route deleted by hand) and answers False for a
    link that does not exist; ``remove_link`` takes the link's routes and
    neighbours with it, as the kernel does."""

    def __init__(self, links: Iterable[str] = ()) -> None:
        self.links: set[str] = set(links)
        self.routes: dict[str, str] = {}
        """destination ("10.0.0.1/32") -> interface"""
        self.neighbours: dict[str, tuple[str, str]] = {}
        """address -> (interface, MAC)"""
        self.fail_next = False

    def add_link(self, name: str) -> None:
        self.links.add(name)

    def remove_link(self, name: str) -> None:
        self.links.discard(name)
        self.routes = {d: i for d, i in self.routes.items() if i != name}
        self.neighbours = {a: n for a, n in self.neighbours.items() if n[0] != name}

    def ensure_routes(self, host_if: str, ips: tuple[str, ...], mac: str) -> bool:
        if self.fail_next:
            self.fail_next = False
            raise DataplaneError(f"cannot route {','.join(ips)} via {host_if}: test failure")
        if host_if not in self.links:
            return False
        for ip in ips:
            self.routes[f"{ipaddress.IPv4Address(ip)}/32"] = host_if
            self.neighbours[ip] = (host_if, mac)
        return True


@dataclass
class FakeLink:
    """A tunnel or underlay link with what ``sync_tunnel`` programs through it."""

    kind: str
    mtu: int
    vni: int | None = None
    local: str | None = None
    mac: str | None = None
    underlay: str | None = None
    routes: set[tuple[str, str]] = field(default_factory=set)
    """(destination, via) onlink routes through the link"""
    fdb: set[tuple[str, str]] = field(default_factory=set)
    """(VTEP MAC, underlay address) forwarding entries"""
    neighbours: dict[str, str] = field(default_factory=dict)
    """address -> MAC, permanent"""


class FakeTunnels:
    """``route_sync.Tunnels`` in memory: the host's links and addresses.

    ``addresses`` maps an underlay interface to its address.  A kernel with
    IPIP has its ``tunl0`` fallback device, as loading the module creates it.
    ``ensure_vxlan`` refuses (``DataplaneError``) a missing underlay or a
    kernel without VXLAN and recreates a device whose VNI, local address or
    MAC differ (losing its routes, as the real one does); ``sync_tunnel``
    refuses a missing device and makes the device's routes (and, given
    ``peers``, its forwarding and neighbour entries) exactly what it is given.
    """

    def __init__(
        self,
        addresses: dict[str, str] | None = None,
        supported: Iterable[str] = ("vxlan", "ipip"),
        mtu: int = 1500,
    ) -> None:
        self.addresses = dict(addresses or {})
        self.supported = set(supported)
        self.links: dict[str, FakeLink] = {n: FakeLink("physical", mtu) for n in self.addresses}
        if "ipip" in self.supported:
            self.links["tunl0"] = FakeLink("ipip", mtu - 20)

    def kernel_supports(self, kind: str) -> bool:
        return kind in self.supported

    def host_addresses(self) -> list[tuple[str, str]]:
        return sorted(self.addresses.items())

    def link_mtu(self, ifname: str) -> int | None:
        link = self.links.get(ifname)
        return link.mtu if link else None

    def ensure_vxlan(
        self, device: str, vni: int, port: int, local_ip: str, underlay: str, mtu: int, mac: str
    ) -> None:
        if "vxlan" not in self.supported:
            raise DataplaneError(f"cannot set up {device}: vxlan not supported")
        current = self.links.get(device)
        if current is None or (current.vni, current.local, current.mac) != (vni, local_ip, mac):
            if underlay not in self.links:
                raise DataplaneError(f"underlay interface {underlay} does not exist")
            self.links[device] = FakeLink("vxlan", mtu, vni, local_ip, mac, underlay)
        self.links[device].mtu = mtu

    def sync_tunnel(
        self,
        device: str,
        routes: list[tuple[str, str]],
        peers: list[tuple[str, str]] | None = None,
    ) -> int:
        link = self.links.get(device)
        if link is None:
            raise DataplaneError(f"tunnel device {device} does not exist")
        changed = len(link.routes ^ set(routes))
        link.routes = set(routes)
        if peers is not None:
            fdb = {(mac, ip) for ip, mac in peers}
            changed += len(link.fdb ^ fdb)
            link.fdb = fdb
            link.neighbours.update(dict(peers))
        return changed

    def delete_link(self, ifname: str) -> bool:
        return self.links.pop(ifname, None) is not None


class FakeBird:
    """BIRD as its callers see it: the configuration it runs.

    ``apply`` answers whether anything changed, and refuses with
    ``DataplaneError`` (keeping the running configuration, like a failed
    ``bird -p``) a configuration whose braces do not balance, or any one
    while ``fail_next_apply`` is set.
    """

    def __init__(self, log: str | None = None) -> None:
        self.log = log
        self.config: str | None = None
        self.running = False
        self.fail_next_apply = False

    def apply(self, config: str) -> bool:
        if self.fail_next_apply:
            self.fail_next_apply = False
            raise DataplaneError("generated BIRD configuration rejected: test failure")
        if config.count("{") != config.count("}"):
            raise DataplaneError("generated BIRD configuration rejected: unbalanced braces")
        if config == self.config and self.running:
            return False
        self.config, self.running = config, True
        return True

    def stop(self) -> None:
        self.running = False


class FakeFastPath:
    """The same-host fast path's map, as ``host.fastpath.FastPath`` keeps it: address ->
    entry.  Each call records the ``FakeIptables.commits`` count it saw, so a test can
    tell which side of the chains' transaction it ran on."""

    def __init__(self, iptables: FakeIptables) -> None:
        self.iptables = iptables
        self.map: dict[str, Any] = {}
        self.calls: list[tuple[str, int, dict[str, Any]]] = []

    def withdraw(self, plan: Mapping[str, Any]) -> int:
        kept = {a: e for a, e in self.map.items() if plan.get(a) == e}
        removed = len(self.map) - len(kept)
        self.map = kept
        self.calls.append(("withdraw", self.iptables.commits, dict(self.map)))
        return removed

    def apply(self, plan: Mapping[str, Any], full: bool) -> int:
        written = sum(1 for a, e in plan.items() if self.map.get(a) != e)
        self.map = dict(plan)
        self.calls.append(("apply", self.iptables.commits, dict(self.map)))
        return written
