"""Host registration: a host's record and the claim on its address, written
together in one compare-and-swap transaction.

Invariants (for records written by this release):
- one address, one host: a host record names address A only while the claim
  ``keys.host_address(A)`` names that host;
- the record and the claims it needs change in one etcd transaction that
  compares every key it reads (the record, the claim taken or kept, the claim
  released), so two hosts registering one address at the same moment cannot
  both succeed: the loser's compare fails, it reads again, finds the winner's
  claim and is refused;
- a host that changes its address releases its old claim in that same
  transaction, so the old address is free the moment the new one is taken;
- the check of an address reads one key, whatever the cluster's size.

Migration from clusters registered before claims existed: their host records
have no claim.  When the claim on an address is missing, registration falls
back to reading the host records (``records.hosts``, a listing of ``hosts/``,
endpoints included: etcd has no range of host records alone) and refuses an
address another host's record names.  That listing happens only when a host
takes an address nobody has claimed (a host's first start on this release, a
new host, a changed address), never in the node's periodic check of its
record.  The transaction still compares the claim, so hosts of this release
cannot race each other; a host of an older release registering at the same
moment is not covered (it writes no claim): upgrade every host before adding
new ones.

Failure behaviour: a refused address raises ``Conflict`` having written
nothing; etcd errors propagate (``DatastoreUnavailable``); a compare lost
``kv.CAS_RETRIES`` times raises ``DatastoreConflict``.
"""

from __future__ import annotations

from calicnm.errors import Conflict, InvalidRequest
from calicnm.model import Host
from calicnm.store import keys, records
from calicnm.store.kv import ABSENT, KV, Store, Txn, retry_cas
from calicnm.validation import check_hostname


def _refusal(ip: str, holder: str) -> Conflict:
    return Conflict(
        f"address {ip} is already registered by host {holder}; "
        f"give this host another --ip or remove the old one ('calicnm node remove "
        f"--hostname {holder}')"
    )


def _claim(store: Store, ip: str) -> tuple[KV, str] | None:
    """The claim on ``ip`` and its holder; a claim that does not decode is
    refused (``Conflict``) rather than taken over."""
    try:
        return records.address_holder(store, ip)
    except InvalidRequest as exc:
        raise Conflict(
            f"the claim on address {ip} ({keys.host_address(ip)}) is unreadable: {exc}; "
            "remove that key if no host uses the address"
        ) from exc


def _stored(store: Store, name: str) -> tuple[KV | None, Host | None]:
    """A host's record as stored, and as decoded (None when malformed: it is
    then replaced)."""
    kv = store.get(keys.host_meta(name))
    if kv is None:
        return None, None
    try:
        return kv, records.decode_host(kv)
    except InvalidRequest:
        return kv, None


def _unclaimed_holder(store: Store, host: Host) -> str | None:
    """Another host whose record names ``host.ip`` though no claim does (a
    record from before claims): the migration's one listing."""
    for other in records.hosts(store):
        if other.name != host.name and other.ip == host.ip:
            return other.name
    return None


def register_host(store: Store, host: Host) -> bool:
    """Make ``host``'s record and its address claim what ``host`` says.

    True if it wrote anything; False when the record and the claim were
    already so (no revision).  Raises ``Conflict`` when another host holds
    the address."""
    check_hostname(host.name, "the host's name")
    meta = keys.host_meta(host.name)

    def attempt() -> bool | None:
        current, old = _stored(store, host.name)
        txn = Txn(compare=[(meta, current.revision if current else ABSENT)])
        if host.ip:
            claim = _claim(store, host.ip)
            if claim is None:
                holder = _unclaimed_holder(store, host)
                if holder is not None:
                    raise _refusal(host.ip, holder)
                txn.compare.append((keys.host_address(host.ip), ABSENT))
                txn.puts.append((keys.host_address(host.ip), host.name))
            elif claim[1] != host.name:
                raise _refusal(host.ip, claim[1])
            else:
                txn.compare.append((claim[0].key, claim[0].revision))
        if old is not None and old.ip and old.ip != host.ip:
            released = _claim(store, old.ip)
            if released is not None and released[1] == host.name:
                txn.compare.append((released[0].key, released[0].revision))
                txn.deletes.append(released[0].key)
        if old != host:
            txn.puts.append((meta, host.to_json()))
        elif not txn.puts and not txn.deletes:
            return False
        return True if store.commit(txn) else None

    return retry_cas(attempt, f"host {host.name}'s registration")


def unregister_host(store: Store, name: str) -> bool:
    """Delete host ``name``'s record and the claim on its address (if the
    claim names it), in one transaction.  False if it had no record."""
    meta = keys.host_meta(name)

    def attempt() -> bool | None:
        current, old = _stored(store, name)
        if current is None:
            return False
        txn = Txn(compare=[(meta, current.revision)], deletes=[meta])
        if old is not None and old.ip:
            try:
                claim = records.address_holder(store, old.ip)
            except InvalidRequest:
                claim = None  # not provably this host's: left for the operator
            if claim is not None and claim[1] == name:
                txn.compare.append((claim[0].key, claim[0].revision))
                txn.deletes.append(claim[0].key)
        return True if store.commit(txn) else None

    return retry_cas(attempt, f"host {name}'s record")
