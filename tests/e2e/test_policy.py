"""Profiles and ACLs with real traffic between containers on one emulated host.

Every check polls (bounded) because policy is applied asynchronously by the
agent; the benchmark, not these tests, measures how fast.
"""

from __future__ import annotations

import json
import signal
import subprocess
import time
from collections.abc import Iterator

import pytest

from lab.cluster import CalicnmHost, single_host, wait_until
from lab.images import DEFAULT_IMAGE as IMG
from tests.e2e.conftest import require_e2e
from tests.e2e.helpers import assert_nothing_left, fast_path_counts

POLL = 5.0
DATAPATHS = ("bpf", "iptables")


@pytest.fixture(scope="module", params=DATAPATHS)
def host(
    request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[CalicnmHost]:
    """Every test here runs on each data path the node offers: iptables policy with
    the tc/BPF same-host fast path (``bpf``, which fails to start rather than fall
    back), and iptables alone."""
    require_e2e()
    workdir = tmp_path_factory.mktemp(f"host-{request.param}")
    with single_host(workdir, extra_env={"CALICNM_DATAPATH": request.param}) as h:
        yield h


@pytest.fixture(scope="module")
def nets(host: CalicnmHost) -> Iterator[dict[str, str]]:
    """dataman: web (httpd on 80 and 8080) and peer; billing: outsider."""
    host.create_network("dataman")
    host.create_network("billing")
    serve = "echo hello > /www/index.html; httpd -p 8080 -h /www; exec httpd -f -v -p 80 -h /www"
    host.docker("run", "-d", "--net", "dataman", "--name", "web", IMG, "sh", "-c", serve)
    host.docker("run", "-d", "--net", "dataman", "--name", "peer", IMG, "sleep", "1000")
    host.docker("run", "-d", "--net", "billing", "--name", "outsider", IMG, "sh", "-c", serve)
    ips = {
        "web": host.ip_of("web", "dataman"),
        "peer": host.ip_of("peer", "dataman"),
        "outsider": host.ip_of("outsider", "billing"),
    }
    wait_until(
        lambda: host.calicnm("profile", "show", check=False).stdout.count("dataman"),
        15,
        "the dataman profile",
    )
    yield ips
    host.docker("rm", "-f", "web", "peer", "outsider", check=False)
    host.docker("network", "rm", "dataman", "billing", check=False)
    assert_nothing_left(host)


def ping(host: CalicnmHost, src: str, ip: str) -> bool:
    out = host.docker_run("exec", src, "ping", "-c", "1", "-W", "1", ip)
    return "1 packets received" in out.stdout


def http(host: CalicnmHost, src: str, ip: str, port: int = 80) -> bool:
    out = host.docker_run(
        "exec",
        src,
        "sh",
        "-c",
        f"rm -f /tmp/f; busybox timeout 2 wget -q -O /tmp/f http://{ip}:{port}/index.html"
        " && cat /tmp/f",
    )
    return out.stdout.strip() == "hello"


def eventually(check, expected: bool, what: str) -> None:
    """``check()`` settles on ``expected`` within POLL seconds."""
    wait_until(lambda: check() == expected, POLL, what, interval=0.1)


def never(check, what: str, seconds: float = 1.5) -> None:
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        assert not check(), what
        time.sleep(0.2)


def rules(host: CalicnmHost, profile: str, *args: str) -> str:
    return host.calicnm("profile", profile, "rule", *args).stdout


def test_network_profile_is_created_with_calico_defaults(host: CalicnmHost, nets) -> None:
    assert rules(host, "dataman", "show") == (
        "Inbound rules:\n   1 allow from tag dataman\nOutbound rules:\n   1 allow\n"
    )
    assert host.calicnm("profile", "dataman", "tag", "show").stdout.split() == ["dataman"]


def test_same_network_talks_other_network_is_denied(host: CalicnmHost, nets) -> None:
    assert ping(host, "peer", nets["web"]) and http(host, "peer", nets["web"])
    assert ping(host, "web", nets["peer"])
    never(lambda: ping(host, "outsider", nets["web"]), "billing pinged dataman")
    never(lambda: http(host, "outsider", nets["web"]), "billing reached dataman's web")
    never(lambda: ping(host, "web", nets["outsider"]), "dataman pinged billing")
    never(lambda: http(host, "web", nets["outsider"]), "dataman reached billing's web")


def test_rules_change_running_containers(host: CalicnmHost, nets) -> None:
    web, out = nets["web"], nets["outsider"]
    # allow tcp to ports 80,443: exactly those ports open from outside the tag.
    rules(host, "dataman", "add", "inbound", "allow", "tcp", "to", "ports", "80,443")
    eventually(lambda: http(host, "outsider", web), True, "port 80 opened to billing")
    assert not http(host, "outsider", web, 8080)
    assert not ping(host, "outsider", web)
    # ICMP type rules.
    rules(host, "dataman", "add", "inbound", "allow", "icmp", "type", "8")
    eventually(lambda: ping(host, "outsider", web), True, "echo requests allowed")
    # deny from cidr at position 1 beats the later allows.
    rules(host, "dataman", "add", "inbound", "--at=1", "deny", "from", "cidr", f"{out}/32")
    eventually(lambda: http(host, "outsider", web), False, "deny from cidr wins")
    assert not ping(host, "outsider", web)
    assert http(host, "peer", web), "the deny is only for the outsider"
    # remove it again: the allows apply once more.
    rules(host, "dataman", "remove", "inbound", "--at=1")
    eventually(lambda: http(host, "outsider", web), True, "deny removed")
    # rule json | rule update round trip back to the defaults.
    exported = json.loads(rules(host, "dataman", "json"))
    exported["inbound_rules"] = exported["inbound_rules"][:1]
    updated = host.calicnm("profile", "dataman", "rule", "update", input=json.dumps(exported))
    assert "Successfully updated rules on profile dataman" in updated.stdout
    eventually(lambda: http(host, "outsider", web), False, "rules back to the defaults")
    eventually(lambda: ping(host, "outsider", web), False, "icmp closed again")


def test_tag_membership_follows_endpoint_profiles(host: CalicnmHost, nets) -> None:
    web = nets["web"]
    host.calicnm("profile", "add", "WEB")
    rules(host, "dataman", "add", "inbound", "allow", "from", "tag", "WEB")
    eid = host.docker(
        "inspect", "-f", "{{.NetworkSettings.Networks.billing.EndpointID}}", "outsider"
    )
    never(lambda: http(host, "outsider", web), "not yet a WEB member", seconds=0.5)
    appended = host.calicnm("endpoint", eid, "profile", "append", "WEB")
    assert "Profile(s) WEB appended." in appended.stdout
    eventually(lambda: http(host, "outsider", web), True, "WEB member allowed")
    # The outsider keeps its own network's policy too: dataman can't reach it.
    assert not http(host, "web", nets["outsider"])
    host.calicnm("endpoint", eid, "profile", "remove", "WEB")
    eventually(lambda: http(host, "outsider", web), False, "no longer a WEB member")
    rules(host, "dataman", "remove", "inbound", "allow", "from", "tag", "WEB")
    host.calicnm("profile", "remove", "WEB")


def test_spoofed_source_addresses_are_dropped(host: CalicnmHost, nets) -> None:
    # The spoofed ping's ARP for the gateway carries the borrowed address too, and
    # is ignored by the host's reverse-path check; the honest ping then waits for
    # the neighbour entry to recover, so it gets a few tries.
    script = (
        f"ip addr add {nets['peer']}/32 dev eth0 && "
        f"ping -c 1 -W 1 -I {nets['peer']} {nets['web']}; "
        f"ping -c 3 -W 2 {nets['web']}"
    )
    out = host.docker_run(
        "run", "--rm", "--cap-add", "NET_ADMIN", "--net", "dataman", IMG, "sh", "-c", script
    )
    results = [line for line in out.stdout.splitlines() if "packets received" in line]
    assert results[0].startswith("1 packets transmitted, 0 packets received"), out.stdout
    assert results[1].startswith("3 packets transmitted, "), out.stdout
    assert not results[1].startswith("3 packets transmitted, 0 packets received"), out.stdout


def test_kill_9_keeps_policy_and_restart_converges(host: CalicnmHost, nets) -> None:
    def ruleset() -> list[str]:
        saved = host.netns.run(["iptables-save", "-t", "filter"]).stdout
        return sorted(line for line in saved.splitlines() if "calicnm" in line)

    before = ruleset()
    assert host.stop_node(sig=signal.SIGKILL) is not None
    wait_until(lambda: not host.answering(), 20, "the plugin to go")
    # While the node is down: connectivity and isolation are unchanged.
    assert ping(host, "peer", nets["web"]) and http(host, "peer", nets["web"])
    never(lambda: http(host, "outsider", nets["web"]), "isolation held while down")
    subprocess.run(["pkill", "-f", "--", f"--data-dir {host.state_dir}/etcd"], check=False)
    if host.socket.exists():
        host.socket.unlink()
    host.start_node()
    assert ruleset() == before, "no duplicate and no missing rule after the restart"
    assert http(host, "peer", nets["web"])
    never(lambda: http(host, "outsider", nets["web"]), "isolation after restart")


def test_open_pairs_take_the_fast_path_and_nothing_else_does(host: CalicnmHost, nets) -> None:
    """With the fast path, web and peer (one network, default profile: open to each
    other) skip the host's stack, while the denied outsider is never handed across;
    with iptables alone no program is attached at all."""
    web = nets["web"]
    eventually(lambda: http(host, "peer", web), True, "peer reaches web")
    filters = host.netns.run(["tc", "filter", "show", "dev", host_if(host, "web"), "ingress"])
    status = host.calicnm("status").stdout
    if host.extra_env["CALICNM_DATAPATH"] == "iptables":
        assert "data path: iptables\n" in status, status
        assert "calicnm_fast" not in filters.stdout
        assert fast_path_counts(host) is None
        return
    assert "data path: iptables, with the tc/BPF same-host fast path" in status, status
    assert "name calicnm_fast " in filters.stdout
    before = fast_path_counts(host)
    assert before is not None
    assert http(host, "peer", web) and ping(host, "peer", web)
    after = fast_path_counts(host)
    assert after is not None and after[0] >= before[0] + 4, (before, after)
    never(lambda: http(host, "outsider", web), "the outsider is still denied")
    assert fast_path_counts(host)[0] == after[0], "a denied pair is never handed across"


def host_if(host: CalicnmHost, container: str) -> str:
    """The host side of ``container``'s first calicnm interface."""
    networks = json.loads(
        host.docker("inspect", "-f", "{{json .NetworkSettings.Networks}}", container)
    )
    endpoint = next(iter(networks.values()))["EndpointID"]
    return "cali" + endpoint[:11]


def test_drift_is_repaired(host: CalicnmHost, nets) -> None:
    ns = host.netns
    ns.run(["iptables", "-w", "-D", "FORWARD", "-j", "calicnm-FORWARD"])
    ns.run(["ipset", "flush", "calicnm-t-dataman"])
    ns.run(["ip", "route", "del", f"{nets['web']}/32"])
    host.calicnm("profile", "dataman", "tag", "show")  # nothing to do with the repair
    wait_until(lambda: http(host, "peer", nets["web"]), 15, "drift repaired by resync")
    assert ns.run(["iptables", "-w", "-S", "FORWARD"]).stdout.count("calicnm-FORWARD") == 1
