"""Where commands run (:class:`Place`), the interfaces and ends of a path, and veth plumbing."""

from __future__ import annotations

import json
import subprocess
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from lab.netns import Netns

__all__ = ["Iface", "Pair", "Place", "add_veth", "container_ifaces", "ip_link", "veth_peer_name"]


@dataclass(frozen=True)
class Place:
    """A network namespace; commands run in it through ``nsenter`` (mounts stay the host's,
    so the host's qperf, ip and ethtool binaries are used everywhere, containers included)."""

    label: str
    enter: tuple[str, ...]

    @classmethod
    def of(cls, netns: Netns, label: str | None = None) -> Place:
        return cls(label or netns.name, ("nsenter", f"--net={netns.path}", "--"))

    @classmethod
    def of_pid(cls, pid: str, label: str) -> Place:
        return cls(label, ("nsenter", "-t", pid, "-n", "--"))

    def argv(self, cmd: Sequence[str]) -> list[str]:
        return [*self.enter, *cmd]

    def run(
        self, cmd: Sequence[str], timeout: float = 30, check: bool = True
    ) -> subprocess.CompletedProcess[str]:
        """Run ``cmd`` here; raises ``RuntimeError`` with its stderr if ``check`` and it fails."""
        proc = subprocess.run(
            self.argv(cmd),
            capture_output=True,
            text=True,
            timeout=timeout,
            stdin=subprocess.DEVNULL,
            check=False,
        )
        if check and proc.returncode != 0:
            raise RuntimeError(
                f"{' '.join(cmd)} in {self.label} exited {proc.returncode}: "
                f"{(proc.stderr or proc.stdout).strip()[-500:]}"
            )
        return proc

    def sh(self, *cmds: Sequence[str]) -> None:
        """Run each command in turn, stopping at the first failure."""
        for cmd in cmds:
            self.run(cmd)


@dataclass(frozen=True)
class Iface:
    """An interface on a measured path, whose MTU and offloads the report records."""

    role: str
    place: Place
    name: str


@dataclass(frozen=True)
class Pair:
    """The two ends of a case: qperf's client, its server and the address it listens on."""

    client: Place
    server: Place
    address: str
    ifaces: tuple[Iface, ...]


def add_veth(
    owner: Place, name: str, peer_ns: Netns, peer_name: str = "eth0", mtu: str | None = None
) -> None:
    """A veth pair: ``name`` in ``owner``, ``peer_name`` created directly in ``peer_ns``."""
    cmd = ["ip", "link", "add", name]
    if mtu is not None:
        cmd += ["mtu", mtu]
    cmd += ["type", "veth", "peer", "name", peer_name]
    if mtu is not None:
        cmd += ["mtu", mtu]
    owner.run([*cmd, "netns", peer_ns.name])


def ip_link(place: Place, name: str | None = None) -> list[dict[str, Any]]:
    """``ip -j -d link show [dev name]`` in ``place``, parsed."""
    cmd = ["ip", "-j", "-d", "link", "show", *(["dev", name] if name else [])]
    data: list[dict[str, Any]] = json.loads(place.run(cmd).stdout or "[]")
    return data


def veth_peer_name(inner: Place, outer: Place, name: str = "eth0") -> str:
    """The name, in ``outer``, of the other end of veth ``name`` in ``inner``."""
    index = ip_link(inner, name)[0].get("link_index")
    for link in ip_link(outer):
        if link.get("ifindex") == index:
            return str(link["ifname"])
    raise RuntimeError(f"no peer of {inner.label}:{name} in {outer.label}")


def container_ifaces(client: Place, host: Place) -> list[Iface]:
    """A container's eth0 and its host-side veth end."""
    return [
        Iface("client eth0", client, "eth0"),
        Iface("host side of client veth", host, veth_peer_name(client, host)),
    ]
