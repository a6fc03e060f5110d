"""``calicnm``: the operator's command line (in the spirit of calicoctl).

The composition root for CLI commands: it parses arguments, builds the
store from the shared settings, runs one command and turns any
``CalicnmError`` into a one-line message on stderr with exit status 1
(argument errors exit 2, as argparse does).
"""

from __future__ import annotations

import argparse
import glob
import http.client
import importlib.metadata
import json
import logging
import os
import socket
import sys
import time
from collections.abc import Sequence
from typing import Any

from calicnm.cli import table
from calicnm.cli.context import Command, Context, emit_json, network_label, out
from calicnm.cli.profile_commands import ENDPOINT_USAGE, pull_remainder_options, rewrite_argv
from calicnm.config import (
    CONFIG_FILE_ENV,
    DEFAULT_CONFIG_FILE,
    SETTINGS,
    Config,
    add_arguments,
)
from calicnm.errors import CalicnmError, InvalidRequest, NotFound, Unsupported
from calicnm.host.markers import StatusFile
from calicnm.model import Pool, parse_address, parse_network
from calicnm.node.node_container import DEFAULT_IMAGE, DEFAULT_NAME, start_node_container
from calicnm.store import records
from calicnm.store.kv import Reader
from calicnm.wiring import setup_logging

ETCD_SETTINGS = ["etcd_endpoints", "etcd_trusted_ca_file", "etcd_cert_file", "etcd_key_file"]
NODE_SETTINGS = [
    *ETCD_SETTINGS,
    "hostname",
    "ip",
    "as_num",
    "socket",
    "log_level",
    "state_dir",
    "docker_host",
    "no_default_pools",
    "accept_new_datastore",
    "withdraw_on_exit",
    "resync_interval",
    "reconcile_interval",
    "liveness_ttl",
    "pending_max_age",
    "metrics_address",
    "endpoint_to_host_action",
    "iptables_backend",
    "driver_name",
]


# ---- node -----------------------------------------------------------------


def cmd_node_run(ctx: Context) -> int:
    if ctx.args.container:
        container_id = start_node_container(
            ctx.config, ctx.sources, image=ctx.args.image, name=ctx.args.name
        )
        out(
            f"calicnm node is running in container {ctx.args.name} ({container_id[:12]}, "
            f"image {ctx.args.image}), answering on {ctx.config.socket}; "
            f"logs: docker logs {ctx.args.name}"
        )
        return 0
    from calicnm.node.daemon import Node

    setup_logging(ctx.config.log_level)
    return Node(ctx.config).run()


# ---- status ----------------------------------------------------------------


def plugin_activate(path: str, timeout: float = 3.0) -> dict[str, Any]:
    """POST Plugin.Activate on the plugin socket, as Docker does."""

    class Conn(http.client.HTTPConnection):
        def connect(self) -> None:
            sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
            sock.settimeout(timeout)
            sock.connect(path)
            self.sock = sock

    conn = Conn("localhost", timeout=timeout)
    try:
        conn.request("POST", "/Plugin.Activate", body=b"")
        resp = conn.getresponse()
        data = json.loads(resp.read() or b"{}")
    finally:
        conn.close()
    return data if isinstance(data, dict) else {}


def plugin_socket(ctx: Context) -> str:
    """The socket ``status`` asks: the configured one, or, when that is the
    default and absent, the managed plugin's (Docker keeps it in a directory
    named after the plugin's id, ``/run/docker/plugins/<id>/calicnm.sock``)."""
    path = ctx.config.socket
    if ctx.sources.get("socket") != "default" or os.path.exists(path):
        return path
    directory, name = os.path.split(path)
    managed = sorted(glob.glob(os.path.join(glob.escape(directory), "*", name)))
    return managed[0] if len(managed) == 1 else path


def status_data(ctx: Context) -> dict[str, Any]:
    """Everything ``status`` reports, as data: the plugin, etcd, the agent
    (and the invalid records it skipped), the cluster's hosts alive or not,
    and ``ok`` (this host's plugin, etcd and agent healthy; another host's
    death does not make this one unhealthy)."""
    data: dict[str, Any] = {"host": ctx.config.hostname}
    path = plugin_socket(ctx)
    try:
        implements = plugin_activate(path).get("Implements", [])
        data["plugin"] = {"socket": path, "answering": True, "implements": implements}
    except OSError as exc:
        data["plugin"] = {"socket": path, "answering": False, "error": exc.strerror or str(exc)}
    try:
        endpoints = records.host_counts(ctx.store).get(ctx.config.hostname, 0)
        data["etcd"] = {"endpoints": ctx.store.describe(), "reachable": True}
        data["local_endpoints"] = endpoints
        data["hosts"] = hosts_data(ctx.store)
    except CalicnmError as exc:
        data["etcd"] = {"endpoints": ctx.config.etcd_endpoints, "reachable": False}
        data["etcd"]["error"] = str(exc)
    data["agent"] = agent_data(ctx.config, time.time())
    try:
        with open(ctx.config.network_problems_path) as fh:
            data["problems"] = [line.strip() for line in fh if line.strip()]
    except OSError:
        data["problems"] = []
    data["ok"] = (
        data["plugin"]["answering"] and data["etcd"]["reachable"] and data["agent"]["healthy"]
    )
    return data


def hosts_data(store: Reader) -> dict[str, Any]:
    """The registered hosts and which of them have a running node (a live
    liveness record: ``node.liveness``)."""
    names = sorted(h.name for h in records.hosts(store))
    alive = records.liveness(store)
    return {
        "registered": len(names),
        "alive": sorted(n for n in names if n in alive),
        "dead": [n for n in names if n not in alive],
    }


def status_report(ctx: Context) -> tuple[bool, list[str]]:
    data = status_data(ctx)
    return data["ok"], status_lines(data)


def status_lines(data: dict[str, Any]) -> list[str]:
    plugin, etcd, agent = data["plugin"], data["etcd"], data["agent"]
    if plugin["answering"]:
        lines = [
            f"calicnm plugin is answering on {plugin['socket']} "
            f"(implements {', '.join(plugin['implements'])})"
        ]
    else:
        lines = [f"calicnm plugin is NOT answering on {plugin['socket']}: {plugin['error']}"]
    if etcd["reachable"]:
        lines.append(f"etcd is reachable at {etcd['endpoints']}")
        lines.append(f"host {data['host']}: {data['local_endpoints']} endpoint(s)")
        hosts = data["hosts"]
        line = f"hosts: {hosts['registered']} registered, {len(hosts['alive'])} alive"
        if hosts["dead"]:
            line += f"; NOT alive: {', '.join(hosts['dead'])}"
        lines.append(line)
    else:
        lines.append(f"etcd: {etcd['error']}")
    if agent["reported"] is False:
        lines.append("calicnm agent has NOT reported on this host (is the node running?)")
        return lines
    age = agent["last_good_seconds_ago"]
    ago = "never" if age is None else f"{age:.0f}s ago"
    if agent["healthy"]:
        lines.append(f"calicnm agent is healthy: last good pass {ago} ({agent['passes']} passes)")
    else:
        lines.append(f"calicnm agent is NOT healthy: {agent['problem']} (last good pass {ago})")
    if agent.get("datapath"):
        lines.append(f"data path: {agent['datapath']}")
    for key, reason in sorted(agent["invalid_records"].items()):
        lines.append(f"INVALID RECORD {key}: {reason}")
    lines += [f"PROBLEM: {problem}" for problem in data.get("problems", [])]
    return lines


def agent_data(config: Config, now: float) -> dict[str, Any]:
    """The agent's health from its status file, and the invalid records it
    skipped (each named by its key)."""
    status = StatusFile(config.agent_status_path).read()
    if status is None:
        return {"reported": False, "healthy": False, "invalid_records": {}}
    problem = status.problem(now)
    return {
        "reported": True,
        "healthy": problem is None,
        "problem": problem,
        "last_good_seconds_ago": None if status.last_good is None else now - status.last_good,
        "passes": status.passes,
        "last_error": status.last_error,
        "invalid_records": dict(status.invalid),
        "datapath": status.datapath,
    }


def cmd_status(ctx: Context) -> int:
    from calicnm.cli.bgp_commands import bgp_status_lines

    data = status_data(ctx)
    if ctx.args.json:
        emit_json(data)
        return 0 if data["ok"] else 1
    for line in [*status_lines(data), *bgp_status_lines(ctx.config.state_dir)]:
        out(line)
    return 0 if data["ok"] else 1


def cmd_config_show(ctx: Context) -> int:
    """The effective settings: each value, and whether a flag, the
    environment, the configuration file or the default set it."""
    rows = [
        {
            "setting": SETTINGS[name].env,
            "value": getattr(ctx.config, name),
            "source": ctx.sources[name],
        }
        for name in SETTINGS
    ]
    if ctx.args.json:
        emit_json(rows)
        return 0
    out(table.render(["Setting", "Value", "Source"], [list(r.values()) for r in rows]))
    return 0


def package_version() -> str:
    try:
        return importlib.metadata.version("calicnm")
    except importlib.metadata.PackageNotFoundError:
        return "unknown (not installed)"


def cmd_diags(ctx: Context) -> int:
    from calicnm.node.diags import collect

    out_dir = ctx.args.out or os.getcwd()
    if not os.path.isdir(out_dir):
        raise InvalidRequest(f"--out {out_dir} is not a directory")
    path = collect(
        ctx.config,
        ctx.store,
        out_dir,
        lambda: "\n".join(status_report(ctx)[1]) + "\n",
        sources=ctx.sources,
    )
    out(f"Diagnostics written to {path}")
    return 0


# ---- pool ------------------------------------------------------------------


def cmd_pool_add(ctx: Context) -> int:
    if ctx.args.ipip or ctx.args.vxlan:
        from calicnm.host.netlink import kernel_supports

        kind = "ipip" if ctx.args.ipip else "vxlan"
        if not kernel_supports(kind):
            raise Unsupported(
                f"this kernel has no {kind.upper()} support (module {kind} missing), so "
                f"{kind} pools cannot be routed here"
                + ("; use --vxlan instead" if kind == "ipip" else "")
            )
    for text in ctx.args.cidrs:
        pool = Pool(
            parse_network(text, "pool"),
            nat_outgoing=ctx.args.nat_outgoing,
            disabled=ctx.args.disabled,
            ipip=ctx.args.ipip,
            vxlan=ctx.args.vxlan,
        )
        ctx.ipam.add_pool(pool)
        out(f"Added pool {pool.cidr}")
    return 0


def cmd_pool_remove(ctx: Context) -> int:
    for text in ctx.args.cidrs:
        cidr = parse_network(text, "pool")
        ctx.ipam.remove_pool(cidr)
        out(f"Removed pool {cidr}")
    return 0


def cmd_pool_show(ctx: Context) -> int:
    pools = sorted(ctx.ipam.pools(), key=lambda p: p.cidr)
    if ctx.args.json:
        emit_json([json.loads(p.to_json()) for p in pools])
        return 0
    out(table.render(["IPv4 CIDR", "Options"], [[str(p.cidr), ",".join(p.options)] for p in pools]))
    return 0


# ---- endpoint --------------------------------------------------------------


def cmd_endpoint_show(ctx: Context) -> int:
    endpoints = records.endpoints(ctx.store, ctx.args.host or None)
    networks = records.networks(ctx.store)
    if ctx.args.json:
        rows = []
        for ep in endpoints:
            data = json.loads(ep.to_json())
            net = networks.get(ep.network_id)
            data["network"] = net.docker_name if net else None
            data["profile"] = net.profile_name if net else None
            rows.append(data)
        emit_json(rows)
        return 0
    if ctx.args.detailed:
        headers = [
            "Hostname",
            "Network",
            "Profile",
            "Endpoint ID",
            "Interface",
            "IPv4",
            "MAC",
            "Gateway",
        ]
        rows2: list[list[object]] = []
        for ep in endpoints:
            net = networks.get(ep.network_id)
            rows2.append(
                [
                    ep.host,
                    network_label(net, ep.network_id),
                    (net.profile_name if net else "") or "",
                    ep.id,
                    ep.interface,
                    ",".join(f"{a}/32" for a in ep.ipv4),
                    ep.mac,
                    ep.gateway or "",
                ]
            )
        out(table.render(headers, rows2))
        return 0
    headers = ["Hostname", "Network", "Endpoint ID", "Interface", "IPv4", "MAC"]
    out(
        table.render(
            headers,
            [
                [
                    ep.host,
                    network_label(networks.get(ep.network_id), ep.network_id),
                    ep.id[:12],
                    ep.interface,
                    ",".join(f"{a}/32" for a in ep.ipv4),
                    ep.mac,
                ]
                for ep in endpoints
            ],
        )
    )
    return 0


# ---- ipam ------------------------------------------------------------------


def cmd_ipam_info(ctx: Context) -> int:
    info = ctx.ipam.info(parse_address(ctx.args.ip, "IP"))
    if info.pool is None:
        raise NotFound(f"{info.address} is not in any calicnm pool")
    if ctx.args.json:
        emit_json(
            {
                "address": str(info.address),
                "pool": str(info.pool.cidr),
                "block": str(info.block.cidr) if info.block else None,
                "affinity": info.block.affinity if info.block else None,
                "handle": info.holder.handle if info.holder else None,
                "kind": info.holder.kind if info.holder else None,
            }
        )
        return 0
    out(f"IP {info.address} is in pool {info.pool.cidr}")
    if info.block is None:
        out("Its block has not been claimed by any host: the address is free.")
    else:
        out(f"Block {info.block.cidr}, affinity {info.block.affinity or 'none'}")
        if info.holder is None:
            out("The address is free.")
        else:
            out(f"Assigned: {info.holder.kind}, owner (handle) {info.holder.handle}")
    return 0


def cmd_ipam_release(ctx: Context) -> int:
    addr = parse_address(ctx.args.ip, "IP")
    if not ctx.ipam.release(addr):
        raise NotFound(f"{addr} is not assigned")
    out(f"Address {addr} released")
    return 0


def cmd_ipam_show(ctx: Context) -> int:
    blocks = ctx.ipam.blocks()
    rows = []
    for pool in sorted(ctx.ipam.pools(), key=lambda p: p.cidr):
        mine = [b for b in blocks if b.cidr.subnet_of(pool.cidr)]
        used = sum(len(b.allocations) for b in mine)
        rows.append(
            {
                "pool": str(pool.cidr),
                "size": pool.cidr.num_addresses,
                "blocks": len(mine),
                "in_use": used,
            }
        )
    if ctx.args.json:
        emit_json(rows)
        return 0
    out(
        table.render(
            ["Pool", "Addresses", "Blocks claimed", "In use"],
            [[r["pool"], r["size"], r["blocks"], r["in_use"]] for r in rows],
        )
    )
    return 0


# ---- parser ----------------------------------------------------------------


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="calicnm", description="calicnm container networking")
    parser.add_argument("--version", action="version", version=f"%(prog)s {package_version()}")
    parser.add_argument(
        "--config",
        help=f"settings file (default {DEFAULT_CONFIG_FILE}) [env {CONFIG_FILE_ENV}]",
    )
    add_arguments(parser, [*ETCD_SETTINGS, "hostname", "socket"])
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    def leaf(parent: Any, name: str, fn: Command, help_text: str) -> argparse.ArgumentParser:
        p: argparse.ArgumentParser = parent.add_parser(name, help=help_text)
        p.set_defaults(fn=fn)
        return p

    config = sub.add_parser("config", help="the settings in effect")
    config_sub = config.add_subparsers(dest="config_command", required=True, metavar="ACTION")
    cshow = leaf(config_sub, "show", cmd_config_show, "every setting, its value and its source")
    cshow.add_argument("--json", action="store_true")
    status = leaf(sub, "status", cmd_status, "is this host's calicnm up? BGP peers")
    status.add_argument("--json", action="store_true")
    add_arguments(status, ["state_dir"], subcommand=True)
    diags = leaf(sub, "diags", cmd_diags, "collect diagnostics into a tarball")
    diags.add_argument("--out", help="directory for the tarball (default: current)")
    add_arguments(diags, ["state_dir"], subcommand=True)

    node = sub.add_parser("node", help="run or inspect calicnm nodes")
    node_sub = node.add_subparsers(dest="node_command", required=True, metavar="ACTION")
    run = leaf(node_sub, "run", cmd_node_run, "run this host's node in the foreground")
    add_arguments(run, NODE_SETTINGS, subcommand=True)
    run.add_argument(
        "--container",
        action="store_true",
        help="start the node image as a container on this host's Docker instead, "
        "with these settings, and return once its plugin answers",
    )
    run.add_argument("--image", default=DEFAULT_IMAGE, help="with --container: the node image")
    run.add_argument("--name", default=DEFAULT_NAME, help="with --container: the container's name")
    from calicnm.cli.bgp_commands import register

    register(sub, node_sub, leaf)

    pool = sub.add_parser("pool", help="address pools")
    pool_sub = pool.add_subparsers(dest="pool_command", required=True, metavar="ACTION")
    add = leaf(pool_sub, "add", cmd_pool_add, "add pools")
    add.add_argument("cidrs", nargs="+", metavar="CIDR")
    add.add_argument(
        "--disabled", action="store_true", help="only for addresses asked for explicitly (--ip)"
    )
    add.add_argument(
        "--vxlan", action="store_true", help="route between hosts over VXLAN instead of BGP"
    )
    add.add_argument(
        "--ipip", action="store_true", help="route between hosts over IPIP (kernels with ipip)"
    )
    add.add_argument(
        "--nat-outgoing",
        action="store_true",
        help="masquerade its containers' traffic to addresses outside every pool",
    )
    rm = leaf(pool_sub, "remove", cmd_pool_remove, "remove pools with no address in use")
    rm.add_argument("cidrs", nargs="+", metavar="CIDR")
    pshow = leaf(pool_sub, "show", cmd_pool_show, "list pools")
    pshow.add_argument("--json", action="store_true")

    endpoint = sub.add_parser(
        "endpoint",
        help="container endpoints",
        usage=ENDPOINT_USAGE.replace("calicnm", parser.prog),
    )
    ep_sub = endpoint.add_subparsers(dest="endpoint_command", required=True, metavar="ACTION")
    eshow = leaf(ep_sub, "show", cmd_endpoint_show, "list endpoints")
    eshow.add_argument("--host", help="only this host's endpoints")
    eshow.add_argument("--detailed", action="store_true")
    eshow.add_argument("--json", action="store_true")

    from calicnm.cli.profile_commands import register as register_policy

    register_policy(sub, leaf, parser.prog)

    ipam = sub.add_parser("ipam", help="address assignments")
    ipam_sub = ipam.add_subparsers(dest="ipam_command", required=True, metavar="ACTION")
    info = leaf(ipam_sub, "info", cmd_ipam_info, "who holds an address")
    info.add_argument("ip")
    info.add_argument("--json", action="store_true")
    rel = leaf(ipam_sub, "release", cmd_ipam_release, "free an address by hand")
    rel.add_argument("ip")
    ishow = leaf(ipam_sub, "show", cmd_ipam_show, "pool usage")
    ishow.add_argument("--json", action="store_true")
    from calicnm.cli.ipam_check import register as register_ipam_check
    from calicnm.cli.network_commands import register as register_networks

    register_networks(sub, leaf)

    register_ipam_check(ipam_sub, leaf)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(rewrite_argv(parser, sys.argv[1:] if argv is None else argv))
    pull_remainder_options(args)
    ctx: Context | None = None
    if args.fn is not cmd_node_run:
        # Commands speak through their output and one-line errors; library
        # warnings (a failed-over etcd endpoint, say) stay quiet.
        logging.basicConfig(level=logging.ERROR, format="%(message)s")
    try:
        ctx = Context(args)
        fn: Command = args.fn
        return fn(ctx)
    except CalicnmError as exc:
        print(f"calicnm: error: {exc}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        return 130
    except BrokenPipeError:
        os._exit(0)
    except Exception as exc:  # one line, never a traceback, whatever went wrong
        print(f"calicnm: internal error: {type(exc).__name__}: {exc}", file=sys.stderr)
        return 1
    finally:
        if ctx is not None:
            ctx.close()


if __name__ == "__main__":
    sys.exit(main())


__all__ = ["InvalidRequest", "main"]
