"""Edits of stored records: profiles, endpoint records and BGP settings.

Every read-modify-write here goes through ``kv.update`` (a compare-and-swap
on the key's revision, re-read and re-applied on conflict, at most
``kv.CAS_RETRIES`` times), so concurrent editors (two operators, a Join and
a ``profile set``) never lose each other's changes.  A ``change`` callback
may raise a ``CalicnmError`` to refuse an edit: nothing is written then.
Reads and decodes go through ``records``; nothing here prints.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from typing import TypeVar

from calicnm.errors import InvalidRequest, NotFound
from calicnm.model import BgpConfig, Endpoint, effective_profiles
from calicnm.policy import Profile
from calicnm.store import keys, records
from calicnm.store.kv import KV, Store, create, update
from calicnm.validation import check_name

R = TypeVar("R")

MIN_ID_PREFIX = 12
"""An endpoint may be named by a unique prefix of its id this long or longer
(what ``calicnm endpoint show`` prints)."""


# ---- profiles ------------------------------------------------------------------


def get_profile(store: Store, name: str) -> Profile:
    """NotFound when there is no profile ``name``."""
    kv = store.get(keys.profile(check_name(name, "profile name")))
    if kv is None:
        raise NotFound(f"Profile {name} not found.")
    return records.decode_profile(kv)


def profile_exists(store: Store, name: str) -> bool:
    return store.get(keys.profile(check_name(name, "profile name"))) is not None


def create_profile(store: Store, profile: Profile) -> bool:
    """Create ``profile`` if no profile of that name exists; True if created.
    An existing profile is left exactly as it is."""
    key = keys.profile(check_name(profile.name, "profile name"))
    return create(store, key, profile.to_json())


def ensure_profile(store: Store, name: str) -> bool:
    """Create Calico's default "security group" profile ``name`` unless it
    exists (whatever its rules are then); True if created."""
    return create_profile(store, Profile.default(name))


def delete_profile(store: Store, name: str) -> None:
    """Delete profile ``name`` (NotFound if absent).  Endpoints still listing
    it keep the name: it then matches nothing, which denies (fail closed)."""
    if not store.delete(keys.profile(check_name(name, "profile name"))):
        raise NotFound(f"Profile {name} not found.")


def update_profile(store: Store, name: str, change: Callable[[Profile], Profile]) -> Profile:
    """Apply ``change`` to the current profile and write the result if the
    profile is still at the revision read; re-read and re-apply on conflict.
    Returns the profile as written (no write when ``change`` changes nothing).
    NotFound if the profile is absent (or is deleted meanwhile)."""
    key = keys.profile(check_name(name, "profile name"))

    def renamed_never(current: Profile) -> Profile:
        updated = change(current)
        if updated.name != name:
            raise InvalidRequest(f"cannot rename profile {name} to {updated.name}")
        return updated

    return _update_record(
        store, key, records.decode_profile, renamed_never, Profile.to_json, f"Profile {name}"
    )


def _update_record(
    store: Store,
    key: str,
    decode: Callable[[KV], R],
    change: Callable[[R], R],
    encode: Callable[[R], str],
    what: str,
) -> R:
    """Compare-and-swap the record at ``key`` to ``change(current)`` (no write
    when nothing changes); NotFound naming ``what`` once the record is gone.
    Returns the record as it is afterwards."""
    result: list[R] = []

    def edit(kv: KV | None) -> str | None:
        if kv is None:
            raise NotFound(f"{what} not found.")
        current = decode(kv)
        updated = change(current)
        result[:] = [updated]
        return None if updated == current else encode(updated)

    update(store, key, edit, what)
    return result[0]


# ---- endpoints -----------------------------------------------------------------


def find_endpoint(store: Store, endpoint_id: str, host: str | None = None) -> tuple[KV, Endpoint]:
    """The endpoint with id ``endpoint_id`` (on ``host`` if given), or the only
    one whose id starts with it when it is at least ``MIN_ID_PREFIX`` long.
    NotFound when none matches; InvalidRequest when several do (the same id
    on two hosts, or a prefix shared by several ids)."""
    where = f" on host {host}" if host else ""
    if not endpoint_id or "/" in endpoint_id:
        raise InvalidRequest(f"{endpoint_id!r} is not an endpoint id")
    if host is not None and (not host or "/" in host):
        raise InvalidRequest(f"{host!r} is not a host name")
    candidates = [
        (parts, kv)
        for parts, kv in records.endpoint_kvs(store, host)
        if parts.name.startswith(endpoint_id)
    ]
    exact = [(parts, kv) for parts, kv in candidates if parts.name == endpoint_id]
    if exact:
        candidates = exact
    elif len(endpoint_id) < MIN_ID_PREFIX:
        candidates = []
    if not candidates:
        hint = (
            ""
            if len(endpoint_id) >= MIN_ID_PREFIX
            else f" (give at least {MIN_ID_PREFIX} characters of the id)"
        )
        raise NotFound(f"Endpoint {endpoint_id} not found{where}{hint}.")
    if len(candidates) > 1:
        found = ", ".join(
            f"{parts.name[:MIN_ID_PREFIX]} on {parts.host}" for parts, _kv in candidates
        )
        raise InvalidRequest(
            f"endpoint id {endpoint_id} is ambiguous: it matches {found}; "
            "give more of the id or --host"
        )
    kv = candidates[0][1]
    return kv, records.decode_endpoint(kv)


def update_endpoint(
    store: Store, key: str, change: Callable[[Endpoint], Endpoint], what: str
) -> Endpoint:
    """Compare-and-swap the endpoint record at ``key`` to ``change(current)``;
    NotFound once it is gone.  Returns the endpoint as it is afterwards."""
    return _update_record(store, key, records.decode_endpoint, change, Endpoint.to_json, what)


def write_endpoint(store: Store, key: str, endpoint: Endpoint) -> Endpoint:
    """Create the endpoint record at ``key``, or, when one is there already
    (Docker repeated a CreateEndpoint), replace it with ``endpoint`` while
    keeping the explicit profile list an operator gave it (unless
    ``endpoint`` has its own).  A stored record that does not decode is
    replaced whole.  Compare-and-swap (``kv.update``): an edit made between
    the read and the write is re-read and kept, never overwritten.  Returns
    the endpoint as stored afterwards."""
    result: list[Endpoint] = [endpoint]

    def edit(kv: KV | None) -> str | None:
        new = endpoint
        if kv is not None and endpoint.profiles is None:
            try:
                current: Endpoint | None = records.decode_endpoint(kv)
            except InvalidRequest:
                current = None
            if current is not None and current.profiles is not None:
                new = dataclasses.replace(endpoint, profiles=current.profiles)
        result[:] = [new]
        text = new.to_json()
        return None if kv is not None and kv.value == text else text

    update(store, key, edit, f"Endpoint {endpoint.id[:MIN_ID_PREFIX]}")
    return result[0]


def update_endpoint_profiles(
    store: Store,
    endpoint_id: str,
    change: Callable[[tuple[str, ...]], tuple[str, ...]],
    host: str | None = None,
) -> Endpoint:
    """Set the endpoint's explicit profile list to ``change(effective)``,
    where ``effective`` is the list that governs it now (its network's
    profile while it has no list of its own).  The endpoint is resolved once
    (see ``find_endpoint``); its record is then compare-and-swapped.  An
    empty result is written as an explicit empty list, which denies all
    traffic.  Profile names are validated, not looked up: the caller decides
    whether a name must exist.  Returns the endpoint as written."""
    kv, _ = find_endpoint(store, endpoint_id, host)

    def edit(endpoint: Endpoint) -> Endpoint:
        network = records.network(store, endpoint.network_id)
        wanted = tuple(change(effective_profiles(endpoint, network)))
        for name in wanted:
            check_name(name, "profile name")
        return dataclasses.replace(endpoint, profiles=wanted)

    return update_endpoint(store, kv.key, edit, f"Endpoint {endpoint_id}")


def memberships(store: Store) -> list[tuple[Endpoint, tuple[str, ...]]]:
    """Every endpoint with its effective profiles (networks read once)."""
    nets = records.networks(store)
    return [
        (ep, effective_profiles(ep, nets.get(ep.network_id))) for ep in records.endpoints(store)
    ]


def profile_members(store: Store, name: str) -> list[Endpoint]:
    """The endpoints, on every host, whose effective profiles include ``name``."""
    return [ep for ep, names in memberships(store) if name in names]


# ---- BGP -----------------------------------------------------------------------


def update_bgp_config(store: Store, change: Callable[[BgpConfig], BgpConfig]) -> BgpConfig:
    """Compare-and-swap the global BGP settings to ``change(current)``."""
    result: list[BgpConfig] = []

    def edit(kv: KV | None) -> str | None:
        new = change(records.decode_bgp_config(kv))
        result[:] = [new]
        return new.to_json()

    update(store, keys.BGP_CONFIG, edit, "BGP configuration")
    return result[0]
