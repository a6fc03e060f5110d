"""What the paths ran with: MTU, kind and offloads of their interfaces, a few sysctls, and
the versions of qperf, dockerd and calicnm."""

from __future__ import annotations

import re
import shutil
import subprocess
from typing import Any

from bench.dataplane.measure import Case, short_error
from bench.dataplane.places import Iface, Place, ip_link
from bench.dataplane.testbed import Testbed, host_place
from lab.paths import REPO

__all__ = ["OFFLOADS", "collect_interfaces", "collect_sysctls", "versions"]

OFFLOADS = {
    "tx-checksumming": "tx-csum",
    "rx-checksumming": "rx-csum",
    "tcp-segmentation-offload": "TSO",
    "generic-segmentation-offload": "GSO",
    "generic-receive-offload": "GRO",
}
"""ethtool -k features shown in the report (all of them are kept in the JSON)."""
SYSCTLS = ("net.ipv4.tcp_congestion_control", "net.bridge.bridge-nf-call-iptables")


def ethtool_features(place: Place, name: str) -> dict[str, str]:
    """``ethtool -k`` as ``{feature: "on" | "off" | "off [fixed]" ...}`` (empty if absent)."""
    if shutil.which("ethtool") is None:
        return {}
    proc = place.run(["ethtool", "-k", name], check=False)
    found = re.findall(r"^([\w-]+): (\w+(?: \[[\w ]+\])?)\s*$", proc.stdout, re.M)
    return dict(found)


def iface_settings(case: Case, iface: Iface) -> dict[str, Any]:
    """MTU, kind and offloads of one interface of one case."""
    entry: dict[str, Any] = {"case": case.key, "role": iface.role}
    entry |= {"place": iface.place.label, "ifname": iface.name}
    try:
        link = ip_link(iface.place, iface.name)[0]
        entry["mtu"] = link.get("mtu")
        entry["kind"] = link.get("linkinfo", {}).get("info_kind", "loopback")
        entry["offloads"] = ethtool_features(iface.place, iface.name)
    except Exception as exc:
        entry["error"] = short_error(exc)
    return entry


def collect_interfaces(cases: list[Case]) -> list[dict[str, Any]]:
    return [
        iface_settings(case, iface)
        for case in cases
        if case.pair is not None
        for iface in case.pair.ifaces
    ]


def collect_sysctls(bed: Testbed) -> dict[str, dict[str, str]]:
    """A few per-namespace settings that change a path's cost, where they apply."""
    places: list[Place] = []
    if bed.has_cluster:
        places = [Place.of(bed.cluster.fabric.netns, "fabric"), host_place(bed.hosts()[0])]
    out: dict[str, dict[str, str]] = {}
    for place in places:
        values = {}
        for key in SYSCTLS:
            proc = place.run(["sysctl", "-n", key], check=False)
            values[key] = proc.stdout.strip() if proc.returncode == 0 else "(absent)"
        out[place.label] = values
    return out


def versions(bed: Testbed) -> dict[str, str]:
    """qperf, dockerd and calicnm versions, and the repository's commit."""
    out: dict[str, str] = {}
    proc = subprocess.run(["qperf", "--version"], capture_output=True, text=True, check=False)
    out["qperf"] = (proc.stdout or proc.stderr).strip()
    if bed.has_cluster:
        server = bed.hosts()[0].docker("version", "-f", "{{.Server.Version}}", check=False)
        out["dockerd"] = server
    git = ["git", "-C", str(REPO), "describe", "--always", "--dirty"]
    out["calicnm commit"] = subprocess.run(git, capture_output=True, text=True).stdout.strip()
    return out
