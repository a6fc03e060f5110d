"""The BGP part of the CLI: ``bgp ...``, ``node bgp peer ...``, ``node show``
and the BGP table of ``status`` (read live from BIRD's control socket)."""

from __future__ import annotations

import argparse
import dataclasses
import os
import sys
from collections.abc import Callable
from typing import Any

from calicnm.cli import table
from calicnm.cli.context import Context, emit_json
from calicnm.errors import CalicnmError, InvalidRequest, NotFound
from calicnm.model import DEFAULT_AS, Peer, check_as, check_bgp_password
from calicnm.routing.bgp import parse_protocols
from calicnm.routing.bird import Bird
from calicnm.store import keys, records
from calicnm.store.edits import update_bgp_config
from calicnm.store.registration import unregister_host

Leaf = Callable[[Any, str, Callable[[Context], int], str], argparse.ArgumentParser]


def bgp_status_lines(state_dir: str) -> list[str]:
    bird = Bird(state_dir)
    lines = []
    try:
        with open(os.path.join(state_dir, "problems")) as fh:
            lines += [f"PROBLEM: {line.strip()}" for line in fh if line.strip()]
    except OSError:
        pass
    lines += ["", "IPv4 BGP status"]
    if not Bird.available() or not bird.running():
        return [*lines, "BIRD is not running on this host (is 'calicnm node run' up?)"]
    try:
        rows = parse_protocols(bird.protocols())
    except CalicnmError as exc:
        return [*lines, f"cannot read BIRD's state: {exc}"]
    if not rows:
        return [*lines, "No BGP peers configured."]
    body = [[r["peer"], r["type"], r["state"], r["since"], r["info"]] for r in rows]
    return [*lines, table.render(["Peer address", "Peer type", "State", "Since", "Info"], body)]


def cmd_node_show(ctx: Context) -> int:
    config = records.bgp_config(ctx.store)
    counts = records.host_counts(ctx.store)
    peers = {
        name: [f"{p.ip} as {p.as_num}" for p in found]
        for name, found in records.node_peers(ctx.store).items()
    }
    listed = sorted(records.hosts(ctx.store), key=lambda h: h.name)
    alive = records.liveness(ctx.store)
    if ctx.args.json:
        emit_json(
            [
                {
                    "name": h.name,
                    "ip": h.ip,
                    "as_num": h.as_num or config.as_num,
                    "as_inherited": h.as_num is None,
                    "peers": peers.get(h.name, []),
                    "endpoints": counts.get(h.name, 0),
                    "alive": h.name in alive,
                }
                for h in listed
            ]
        )
        return 0
    rows: list[list[object]] = []
    for h in listed:
        as_text = str(h.as_num) if h.as_num is not None else f"{config.as_num} (inherited)"
        rows.append(
            [
                h.name,
                h.ip or "",
                as_text,
                ", ".join(peers.get(h.name, [])),
                counts.get(h.name, 0),
                "yes" if h.name in alive else "no",
            ]
        )
    headers = ["Hostname", "IPv4", "AS Num", "BGP Peers v4", "Endpoints", "Alive"]
    print(table.render(headers, rows))
    return 0


def cmd_node_mesh(ctx: Context) -> int:
    value = ctx.args.value
    if value is None:
        print("on" if records.bgp_config(ctx.store).node_mesh else "off")
        return 0
    if value not in ("on", "off"):
        raise InvalidRequest("node-mesh takes 'on' or 'off'")
    update_bgp_config(ctx.store, lambda c: dataclasses.replace(c, node_mesh=value == "on"))
    print(f"Node-to-node mesh turned {value}")
    return 0


def cmd_default_as(ctx: Context) -> int:
    if ctx.args.value is None:
        print(records.bgp_config(ctx.store).as_num)
        return 0
    number = check_as(ctx.args.value)
    update_bgp_config(ctx.store, lambda c: dataclasses.replace(c, as_num=number))
    print(f"Default node AS number set to {number}")
    return 0


def cmd_password(ctx: Context) -> int:
    """The TCP MD5 secret of every BGP session.  Never printed back: showing
    it says only whether one is set."""
    value, clear = ctx.args.value, ctx.args.clear
    if value is not None and clear:
        raise InvalidRequest("give a password or --clear, not both")
    if value is None and not clear:
        print("set" if records.bgp_config(ctx.store).password is not None else "not set")
        return 0
    if clear:
        update_bgp_config(ctx.store, lambda c: dataclasses.replace(c, password=None))
        print("BGP password cleared: sessions no longer use TCP MD5")
        return 0
    if value == "-":
        value = sys.stdin.readline().rstrip("\r\n")
    secret = check_bgp_password(value)
    update_bgp_config(ctx.store, lambda c: dataclasses.replace(c, password=secret))
    print(
        "BGP password set: every session now uses TCP MD5 "
        "(routers peering with these hosts need the same password)"
    )
    return 0


def cmd_ttl_security(ctx: Context) -> int:
    value = ctx.args.value
    if value is None:
        print("on" if records.bgp_config(ctx.store).ttl_security else "off")
        return 0
    if value not in ("on", "off"):
        raise InvalidRequest("ttl-security takes 'on' or 'off'")
    update_bgp_config(ctx.store, lambda c: dataclasses.replace(c, ttl_security=value == "on"))
    print(f"TTL security turned {value}")
    if value == "on":
        print(
            "Every BGP peer must now be one hop away and enable TTL security (GTSM) as well; "
            "sessions are direct, not multihop."
        )
    return 0


def _peer_key(ctx: Context, ip: str) -> str:
    if ctx.args.scope == "global":
        return keys.global_peer(ip)
    return keys.node_peer(ctx.config.hostname, ip)


def cmd_peer_add(ctx: Context) -> int:
    if ctx.args.as_word != "as":
        raise InvalidRequest("usage: peer add <PEER_IP> as <AS_NUM>")
    peer = Peer.parse(ctx.args.ip, ctx.args.as_num)
    if ctx.args.scope == "node" and not any(
        h.name == ctx.config.hostname for h in records.hosts(ctx.store)
    ):
        raise NotFound(f"host {ctx.config.hostname} is not registered (run its node first)")
    ctx.store.put(_peer_key(ctx, peer.ip), peer.to_json())
    where = "global" if ctx.args.scope == "global" else f"host {ctx.config.hostname}"
    print(f"BGP peer {peer.ip} as {peer.as_num} added to the {where} configuration")
    return 0


def cmd_peer_remove(ctx: Context) -> int:
    ip = str(Peer.parse(ctx.args.ip, str(DEFAULT_AS)).ip)
    if not ctx.store.delete(_peer_key(ctx, ip)):
        raise NotFound(f"BGP peer {ip} is not configured")
    where = "global" if ctx.args.scope == "global" else "node"
    print(f"BGP peer removed from {where} configuration")
    return 0


def cmd_peer_show(ctx: Context) -> int:
    found = (
        records.global_peers(ctx.store)
        if ctx.args.scope == "global"
        else records.node_peers(ctx.store, ctx.config.hostname).get(ctx.config.hostname, [])
    )
    peers = sorted(found, key=lambda p: p.ip)
    if ctx.args.json:
        emit_json([{"ip": p.ip, "as_num": p.as_num} for p in peers])
        return 0
    title = "Global IPv4 BGP Peer" if ctx.args.scope == "global" else "Node specific IPv4 BGP Peer"
    print(table.render([title, "AS Num"], [[p.ip, p.as_num] for p in peers]))
    return 0


def cmd_node_remove(ctx: Context) -> int:
    from calicnm.ipam import Allocator

    name = ctx.config.hostname
    store = ctx.store
    if store.get(keys.host_meta(name)) is None:
        raise NotFound(f"host {name} is not registered")
    endpoints = records.endpoints(store, name)
    if endpoints and not ctx.args.remove_endpoints:
        raise InvalidRequest(
            f"host {name} still has {len(endpoints)} endpoint(s); pass --remove-endpoints "
            "to release their addresses too (only for a host that is gone)"
        )
    ipam = Allocator(store, name)
    for ep in endpoints:
        for ip in ep.ipv4:
            ipam.release(ip)
        store.delete(keys.endpoint(name, ep.id))
    for peer in records.node_peers(store, name).get(name, []):
        store.delete(keys.node_peer(name, peer.ip))
    deleted, kept = ipam.release_affinity(name)
    unregister_host(store, name)
    print(
        f"Node configuration removed: host {name}, {len(endpoints)} endpoint(s), "
        f"{deleted + kept} block(s) released"
    )
    return 0


def cmd_route_reflector_run(ctx: Context) -> int:
    from calicnm.routing import reflector
    from calicnm.wiring import setup_logging

    setup_logging(ctx.config.log_level)
    ip = str(Peer.parse(ctx.args.ip, str(DEFAULT_AS)).ip)
    as_num = check_as(ctx.args.as_num) if ctx.args.as_num else None
    store = ctx.store
    return reflector.run(
        store, ip, as_num, ctx.args.cluster_id or ip, ctx.config.state_dir, changes=store
    )


def _peer_commands(parent: Any, leaf: Leaf, scope: str) -> None:
    peer = parent.add_parser("peer", help=f"{scope} BGP peers")
    peer_sub = peer.add_subparsers(dest="peer_command", required=True, metavar="ACTION")
    add = leaf(peer_sub, "add", cmd_peer_add, "add a peer: add <PEER_IP> as <AS_NUM>")
    add.add_argument("ip")
    add.add_argument("as_word", metavar="as")
    add.add_argument("as_num", metavar="AS_NUM")
    rm = leaf(peer_sub, "remove", cmd_peer_remove, "remove a peer")
    rm.add_argument("ip")
    show = leaf(peer_sub, "show", cmd_peer_show, "list peers")
    show.add_argument("--json", action="store_true")
    for p in (add, rm, show):
        p.set_defaults(scope=scope)


def register(sub: Any, node_sub: Any, leaf: Leaf) -> None:
    show = leaf(
        node_sub, "show", cmd_node_show, "hosts, addresses, AS numbers, peers, alive or not"
    )
    show.add_argument("--json", action="store_true")
    node_bgp = node_sub.add_parser("bgp", help="this host's own BGP peers")
    _peer_commands(
        node_bgp.add_subparsers(dest="node_bgp", required=True, metavar="WHAT"), leaf, "node"
    )
    remove = leaf(
        node_sub,
        "remove",
        cmd_node_remove,
        "remove a dead host (--hostname): its blocks, peers, endpoints",
    )
    remove.add_argument("--remove-endpoints", action="store_true")
    rr = sub.add_parser("route-reflector", help="run a BGP route reflector")
    rr_sub = rr.add_subparsers(dest="rr_command", required=True, metavar="ACTION")
    rr_run = leaf(rr_sub, "run", cmd_route_reflector_run, "run it in the foreground")
    rr_run.add_argument("--ip", required=True, help="the reflector's address (router id)")
    rr_run.add_argument("--as", dest="as_num", help="its AS (default: default-node-as)")
    rr_run.add_argument("--cluster-id", help="route-reflector cluster id (default: --ip)")
    from calicnm.config import add_arguments

    add_arguments(rr_run, ["state_dir", "log_level"], subcommand=True)
    bgp = sub.add_parser("bgp", help="global BGP settings and peers")
    bgp_sub = bgp.add_subparsers(dest="bgp_command", required=True, metavar="ACTION")
    mesh = leaf(bgp_sub, "node-mesh", cmd_node_mesh, "show or set the node-to-node mesh")
    mesh.add_argument("value", nargs="?", metavar="on|off")
    das = leaf(bgp_sub, "default-node-as", cmd_default_as, "show or set the default AS")
    das.add_argument("value", nargs="?", metavar="AS_NUM")
    password = leaf(
        bgp_sub,
        "password",
        cmd_password,
        "show whether the TCP MD5 password of every session is set, set it or --clear it",
    )
    password.add_argument(
        "value",
        nargs="?",
        metavar="SECRET",
        help="1-80 printable ASCII characters, no quotes or backslashes; '-' reads it from stdin",
    )
    password.add_argument("--clear", action="store_true", help="remove the password")
    ttl = leaf(
        bgp_sub,
        "ttl-security",
        cmd_ttl_security,
        "show or set TTL security (GTSM): only peers one hop away",
    )
    ttl.add_argument("value", nargs="?", metavar="on|off")
    _peer_commands(bgp_sub, leaf, "global")
