"""``calicnm ipam check [--json] [--repair [--grace S]]``: the node's
ownership collector (``node.collector``), run by hand on one host.

``check`` observes once and reports; it changes nothing.  ``--repair``
observes twice, ``--grace`` seconds apart, and repairs only what both
observations found unchanged, exactly as the node's own sweep would.  It
refuses (one line, exit 1) when this host's node never recorded which
datastore it serves, so a repair never runs against an etcd this host did
not serve.  Exit status: 0 when nothing is left to report, 1 otherwise.
"""

from __future__ import annotations

import argparse
import time
from collections.abc import Callable
from typing import Any

from calicnm.cli import table
from calicnm.cli.context import Command, Context, emit_json, out
from calicnm.config import add_arguments
from calicnm.errors import InvalidRequest
from calicnm.host.markers import InFlight
from calicnm.host.netlink import HostPlumbing
from calicnm.node.collector import MIN_GRACE_SECONDS, OwnershipCollector, SweepReport
from calicnm.node.docker_api import DockerAPI
from calicnm.ownership import Grace
from calicnm.wiring import datastore_guard

DEFAULT_GRACE = 10.0


def cmd_ipam_check(ctx: Context) -> int:
    args = ctx.args
    guard = datastore_guard(ctx.config, ctx.store)
    if args.repair and guard is None:
        raise InvalidRequest(
            f"no node has run with state directory {ctx.config.state_dir} on this host, so "
            "which datastore it serves is unknown; run the repair where the node runs "
            "(or pass its --state-dir)"
        )
    collector = OwnershipCollector(
        ctx.store,
        ctx.config.hostname,
        HostPlumbing(),
        DockerAPI(ctx.config.docker_host),
        pending_max_age=ctx.config.pending_max_age_seconds,
        guard=guard,
        busy=InFlight(ctx.config.in_flight_dir).active,
    )
    if not args.repair:
        report = collector.check()
    else:
        grace = Grace(_grace(args.grace))
        grace.due(collector.check().findings, time.time())  # first look: nothing is due
        time.sleep(grace.seconds)
        report = collector.sweep(grace)
    left = [f for f in report.findings if f not in report.repaired]
    if args.json:
        emit_json(_json(ctx.config.hostname, report, left))
    else:
        _print(ctx.config.hostname, report, left, args.repair)
    return 1 if left else 0


def _grace(text: str | None) -> float:
    if text is None:
        return DEFAULT_GRACE
    try:
        value = float(text)
    except ValueError:
        value = -1.0
    if not MIN_GRACE_SECONDS <= value <= 3600:
        raise InvalidRequest(
            f"--grace must be between {MIN_GRACE_SECONDS:.0f} and 3600 seconds, not {text!r}"
        )
    return value


def _json(host: str, report: SweepReport, left: list[Any]) -> dict[str, Any]:
    return {
        "host": host,
        "docker": "answering" if report.docker_answered else "not answering",
        "counts": report.counts(),
        "findings": [f.to_json() for f in left],
        "repaired": [f.to_json() for f in report.repaired],
        "failed": [{**f.to_json(), "error": err} for f, err in report.failed],
        "ok": not left,
    }


def _print(host: str, report: SweepReport, left: list[Any], repairing: bool) -> None:
    counts = report.counts()
    docker = "answering" if report.docker_answered else "NOT answering"
    out(
        f"host {host}: {counts['endpoints']} endpoint records, {counts['links']} cali links, "
        f"{counts['allocations']} allocations in the blocks it looks after; Docker {docker}"
    )
    for finding in report.repaired:
        out(f"repaired {finding.kind} {finding.subject}: {finding.detail}")
    if left:
        out(
            table.render(
                ["Kind", "Subject", "Detail"],
                [[f.kind, f.subject[:15], f.detail] for f in left],
            )
        )
    fixable = sum(1 for f in left if f.repairable)
    if not left:
        out("no problems found")
    elif repairing:
        out(f"{len(left)} problem(s) left ({fixable} repairable ones changed during the grace)")
    else:
        out(
            f"{len(left)} problem(s), {fixable} repairable: run 'calicnm ipam check --repair' "
            "to fix them"
        )


def register(
    ipam_sub: Any, leaf: Callable[[Any, str, Command, str], argparse.ArgumentParser]
) -> None:
    check = leaf(
        ipam_sub,
        "check",
        cmd_ipam_check,
        "find (and with --repair, remove) what no live container holds",
    )
    check.add_argument("--json", action="store_true")
    check.add_argument(
        "--repair",
        action="store_true",
        help="remove what two looks, --grace seconds apart, both found",
    )
    check.add_argument(
        "--grace",
        help=f"seconds between the two looks of --repair (default {DEFAULT_GRACE:.0f})",
    )
    add_arguments(check, ["state_dir", "docker_host", "pending_max_age"], subcommand=True)
