"""``calicnm network create|remove|show``: networks defined once for the
cluster, which every node keeps on its own Docker (``node.cluster_networks``)."""

from __future__ import annotations

import argparse
from collections.abc import Callable
from typing import Any

from calicnm.cli import table
from calicnm.cli.context import Command, Context, emit_json, out
from calicnm.errors import Conflict, InvalidRequest, NotFound
from calicnm.model import ClusterNetwork, parse_network
from calicnm.store import keys, records
from calicnm.store.kv import create
from calicnm.validation import check_name

Leaf = Callable[[Any, str, Command, str], argparse.ArgumentParser]


def cmd_network_create(ctx: Context) -> int:
    args = ctx.args
    subnet = parse_network(args.subnet, "--subnet") if args.subnet else None
    ip_range = parse_network(args.ip_range, "--ip-range") if args.ip_range else None
    if ip_range is not None and subnet is None:
        raise InvalidRequest("--ip-range needs --subnet")
    network = ClusterNetwork(
        name=check_name(args.name, "network name"),
        subnet=subnet,
        ip_range=ip_range,
        profile=check_name(args.profile, "profile") if args.profile else None,
        internal=args.internal,
    )
    if subnet is not None:
        ctx.ipam.request_pool(subnet, ip_range)  # refuses a subnet outside every pool
    if not create(ctx.store, keys.cluster_network(network.name), network.to_json()):
        raise Conflict(f"network {network.name} is already defined for the cluster")
    out(
        f"Network {network.name} defined; every calicnm node creates it on its Docker "
        "('calicnm network show' lists where it is)"
    )
    return 0


def cmd_network_remove(ctx: Context) -> int:
    name = check_name(ctx.args.name, "network name")
    if not ctx.store.delete(keys.cluster_network(name)):
        raise NotFound(f"network {name} is not defined for the cluster")
    out(
        f"Network {name} removed from the definitions; each node removes it from its Docker "
        "once no container uses it ('calicnm network show' lists where it is still in use)"
    )
    return 0


def cmd_network_show(ctx: Context) -> int:
    defined = records.cluster_networks(ctx.store)
    states = records.host_network_states(ctx.store)
    hosts = sorted(h.name for h in records.hosts(ctx.store))
    names = sorted(set(defined) | {s.name for s in states})
    rows: list[dict[str, Any]] = []
    for name in names:
        network = defined.get(name)
        per_host = {s.host: s for s in states if s.name == name}
        rows.append(
            {
                "name": name,
                "defined": network is not None,
                "subnet": str(network.subnet) if network and network.subnet else None,
                "profile": (network.profile or name) if network else None,
                "hosts": {
                    host: {
                        "state": per_host[host].state if host in per_host else "absent",
                        "detail": per_host[host].detail if host in per_host else "",
                    }
                    for host in hosts
                },
            }
        )
    if ctx.args.json:
        emit_json(rows)
        return 0
    body = []
    for row in rows:
        for host, state in row["hosts"].items():
            body.append(
                [
                    row["name"] if row["defined"] else f"{row['name']} (removed)",
                    row["subnet"] or "any pool",
                    host,
                    state["state"],
                    state["detail"],
                ]
            )
    out(table.render(["Network", "Subnet", "Host", "Docker has it", "Detail"], body))
    return 0


def register(sub: Any, leaf: Leaf) -> None:
    network = sub.add_parser("network", help="networks defined once for the cluster")
    network_sub = network.add_subparsers(dest="network_command", required=True, metavar="ACTION")
    create_cmd = leaf(
        network_sub, "create", cmd_network_create, "define a network every host's Docker gets"
    )
    create_cmd.add_argument("name")
    create_cmd.add_argument("--subnet", help="inside a calicnm pool (default: any pool)")
    create_cmd.add_argument("--ip-range", help="the part of --subnet containers get")
    create_cmd.add_argument("--profile", help="profile of its containers (default: its name)")
    create_cmd.add_argument("--internal", action="store_true", help="no traffic off the pools")
    remove = leaf(network_sub, "remove", cmd_network_remove, "remove it where no container uses it")
    remove.add_argument("name")
    show = leaf(network_sub, "show", cmd_network_show, "each network, and which hosts have it")
    show.add_argument("--json", action="store_true")
