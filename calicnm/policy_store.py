"""Profiles and endpoint profile lists in the datastore; no printing.

One profile is one key (``keys.profile(name)``) holding ``Profile.to_json()``;
an endpoint's explicit profile list lives in its own endpoint record.  Every
read-modify-write here is a compare-and-swap on the key's revision that
re-reads and re-applies the change on conflict, so concurrent editors never
lose each other's changes; after ``CAS_RETRIES`` conflicts it gives up with
``DatastoreConflict`` having written nothing.  A ``change`` callback may raise
(a ``CalicnmError``) to refuse an edit: nothing is written then either.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable

from calicnm import keys
from calicnm.datastore import KV, Store, create, replace
from calicnm.errors import DatastoreConflict, InvalidRequest, NotFound
from calicnm.model import Endpoint, Network, effective_profiles
from calicnm.policy import Profile, check_name

CAS_RETRIES = 20
MIN_ID_PREFIX = 12
"""An endpoint may be named by a unique prefix of its id this long or longer
(what ``calicnm endpoint show`` prints)."""


def _decode(kv: KV) -> Profile:
    """The stored profile; the key, not the stored ``id``, names it."""
    try:
        return Profile.from_json(kv.value, keys.last_segment(kv.key))
    except InvalidRequest as exc:
        raise InvalidRequest(f"stored profile {kv.key} is unreadable: {exc}") from exc


def list_profiles(store: Store) -> list[Profile]:
    """Every profile, sorted by name."""
    return sorted((_decode(kv) for kv in store.list(keys.PROFILES)), key=lambda p: p.name)


def get_profile(store: Store, name: str) -> Profile:
    """NotFound when there is no profile ``name``."""
    kv = store.get(keys.profile(check_name(name, "profile name")))
    if kv is None:
        raise NotFound(f"Profile {name} not found.")
    return _decode(kv)


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
    for _ in range(CAS_RETRIES):
        kv = store.get(key)
        if kv is None:
            raise NotFound(f"Profile {name} not found.")
        current = _decode(kv)
        updated = change(current)
        if updated.name != name:
            raise InvalidRequest(f"cannot rename profile {name} to {updated.name}")
        if updated == current:
            return current
        if replace(store, key, updated.to_json(), kv.revision):
            return updated
    raise DatastoreConflict(f"profile {name} kept changing; gave up after {CAS_RETRIES} tries")


# ---- endpoints ---------------------------------------------------------------


def _endpoint_kvs(store: Store, host: str | None = None) -> list[KV]:
    prefix = keys.endpoints_prefix(host) if host else keys.HOSTS
    return [kv for kv in store.list(prefix) if "/endpoints/" in kv.key]


def networks(store: Store) -> dict[str, Network]:
    """Every network record by id."""
    found = (Network.from_json(kv.value) for kv in store.list(keys.NETWORKS))
    return {n.id: n for n in found}


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
        kv for kv in _endpoint_kvs(store, host) if keys.last_segment(kv.key).startswith(endpoint_id)
    ]
    exact = [kv for kv in candidates if keys.last_segment(kv.key) == endpoint_id]
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
            f"{keys.last_segment(kv.key)[:MIN_ID_PREFIX]} on {keys.host_of_endpoint_key(kv.key)}"
            for kv in candidates
        )
        raise InvalidRequest(
            f"endpoint id {endpoint_id} is ambiguous: it matches {found}; "
            "give more of the id or --host"
        )
    kv = candidates[0]
    return kv, Endpoint.from_json(kv.value)


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
    for _ in range(CAS_RETRIES):
        current = store.get(kv.key)
        if current is None:
            raise NotFound(f"Endpoint {endpoint_id} was removed meanwhile.")
        endpoint = Endpoint.from_json(current.value)
        network_kv = store.get(keys.network(endpoint.network_id))
        network = Network.from_json(network_kv.value) if network_kv else None
        wanted = tuple(change(effective_profiles(endpoint, network)))
        for name in wanted:
            check_name(name, "profile name")
        if endpoint.profiles == wanted:
            return endpoint
        updated = dataclasses.replace(endpoint, profiles=wanted)
        if replace(store, kv.key, updated.to_json(), current.revision):
            return updated
    raise DatastoreConflict(
        f"endpoint {endpoint_id} kept changing; gave up after {CAS_RETRIES} tries"
    )


def memberships(store: Store) -> list[tuple[Endpoint, tuple[str, ...]]]:
    """Every endpoint with its effective profiles (networks read once)."""
    nets = networks(store)
    result = []
    for kv in _endpoint_kvs(store):
        endpoint = Endpoint.from_json(kv.value)
        result.append((endpoint, effective_profiles(endpoint, nets.get(endpoint.network_id))))
    return result


def profile_members(store: Store, name: str) -> list[Endpoint]:
    """The endpoints, on every host, whose effective profiles include ``name``."""
    return [ep for ep, names in memberships(store) if name in names]
