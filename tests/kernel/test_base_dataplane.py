"""Base chains through the host's own iptables backend, in a throwaway netns."""

from __future__ import annotations

import subprocess

import pytest

from calicnm.hostnet import FORWARD_CHAIN, BaseDataplane, ensure_forwarding
from calicnm.iptables import Iptables, detect_backend
from calicnm.plumbing import read_sysctl

pytestmark = pytest.mark.kernel


def rules(chain: str) -> list[str]:
    out = subprocess.run(
        ["iptables", "-w", "-S", chain], check=True, capture_output=True, text=True
    ).stdout
    return out.splitlines()


def test_chains_follow_the_hosts_backend_and_stay_single(netns):
    backend = detect_backend()
    version = subprocess.run(["iptables", "--version"], capture_output=True, text=True).stdout
    assert backend.name in version
    # Someone else's rules in FORWARD, as dockerd leaves them.
    subprocess.run(["iptables", "-w", "-N", "DOCKER-USER"], check=True)
    subprocess.run(["iptables", "-w", "-A", "FORWARD", "-j", "DOCKER-USER"], check=True)
    subprocess.run(["iptables", "-w", "-P", "FORWARD", "DROP"], check=True)

    dataplane = BaseDataplane(Iptables())
    dataplane.ensure()
    dataplane.ensure()
    forward = rules("FORWARD")
    assert forward.count(f"-A FORWARD -j {FORWARD_CHAIN}") == 1
    assert "-A FORWARD -j DOCKER-USER" in forward, "other chains are left alone"
    assert rules(FORWARD_CHAIN)[1:] == [
        f"-A {FORWARD_CHAIN} -i cali+ -j ACCEPT",
        f"-A {FORWARD_CHAIN} -o cali+ -j ACCEPT",
    ]

    # Drift: the jump deleted by hand comes back; a duplicate is removed.
    subprocess.run(["iptables", "-w", "-D", "FORWARD", "-j", FORWARD_CHAIN], check=True)
    subprocess.run(["iptables", "-w", "-A", "FORWARD", "-j", FORWARD_CHAIN], check=True)
    subprocess.run(["iptables", "-w", "-A", "FORWARD", "-j", FORWARD_CHAIN], check=True)
    dataplane.ensure()
    assert rules("FORWARD").count(f"-A FORWARD -j {FORWARD_CHAIN}") == 1


def test_forwarding_is_switched_on(netns):
    ensure_forwarding()
    assert read_sysctl("net/ipv4/ip_forward") == "1"
