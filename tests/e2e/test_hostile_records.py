"""Hostile records written straight into etcd, on a real host.

One emulated host (node with its embedded etcd, dockerd, busybox containers).
Records no calicnm command would write are put with ``etcdctl`` as an
attacker with write access to etcd (or a buggy other release) would: a
profile with a non-ASCII protocol, one that is not UTF-8, one with 100 000
ports, affinity keys that are not CIDRs or whose host part walks up the
tree, endpoints whose interface carries an ``iptables-restore`` line or
whose id is a file path, a host whose address is BIRD syntax.

What must hold while they are stored: the node stays up and healthy and
names each bad key in ``calicnm status``; valid changes still reach the
kernel at once; nothing of the injected text reaches iptables, ipsets,
``bird.conf`` or the file system; the host keeps starting containers.

The extra tests at the top put one invalid record of another kind each
(a network, a pool) and check the host still serves what that record does
not concern.  Traffic only goes between this host's containers.
"""

from __future__ import annotations

import json
import re
import secrets
import statistics
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import pytest

from calicnm.endpoint import host_ifname
from lab.cluster import CalicnmHost, wait_until
from lab.images import DEFAULT_IMAGE as IMG
from tests.e2e.helpers import assert_nothing_left, endpoint_id, etcdctl, fetch_from

ROOT = "/calicnm/v1"
NET = "pz"
MARK = "POISONED"
"""Text inside every injected rule: must never show up in the kernel."""
LATENCY_LIMIT = 2.0
ID_RE = re.compile(r"\A[0-9a-f]{64}\Z")


def put(host: CalicnmHost, key: str, value: str | bytes) -> None:
    etcdctl(host, "put", key, value)


def put_stdin(host: CalicnmHost, key: str, value: str) -> None:
    """For values larger than one command-line argument may be (128 KiB)."""
    etcdctl(host, "put", key, input=value)


def delete(host: CalicnmHost, *keys: str) -> None:
    for key in keys:
        etcdctl(host, "del", key, check=False)


def stored(host: CalicnmHost, key: str) -> bytes:
    return etcdctl(host, "get", "--print-value-only", key).stdout


def status(host: CalicnmHost) -> tuple[int, str]:
    got = host.calicnm("status", check=False)
    return got.returncode, got.stdout + got.stderr


def invalid_keys(text: str) -> set[str]:
    """Keys of the ``INVALID RECORD <key>: <reason>`` lines of ``calicnm status``."""
    return {m.group(1) for m in re.finditer(r"^INVALID RECORD (.*?): ", text, flags=re.MULTILINE)}


def kernel_state(host: CalicnmHost) -> tuple[list[str], set[str], str]:
    """(every ``-A`` rule of every table, every chain as table/name, ``ipset save``)."""
    saved = host.netns.run(["iptables-save"]).stdout
    rules: list[str] = []
    chains: set[str] = set()
    table = ""
    for line in saved.splitlines():
        if line.startswith("*"):
            table = line[1:]
        elif line.startswith(":"):
            chains.add(f"{table}/{line[1:].split()[0]}")
        elif line.startswith("-A "):
            rules.append(f"{table} {line}")
    return sorted(rules), chains, ipsets(host)


def ipsets(host: CalicnmHost) -> str:
    """``ipset save`` without what changes on every rewrite (a set's hash seed,
    the order of its members)."""
    lines = []
    for line in host.netns.run(["ipset", "save"]).stdout.splitlines():
        words = line.split()
        if words[:1] == ["create"]:
            lines.append(" ".join(words[:3]))
        else:
            lines.append(line)
    return "\n".join(sorted(lines))


def state_files(host: CalicnmHost) -> set[str]:
    """Paths under the node's state dir, except etcd's data and transient files."""
    out = set()
    for path in host.state_dir.rglob("*"):
        rel = str(path.relative_to(host.state_dir))
        if rel.startswith("etcd/") or rel.endswith((".tmp", ".new")):
            continue
        out.add(rel)
    return out


def settled(host: CalicnmHost) -> tuple[list[str], set[str], str]:
    """The kernel state once two reads a full resync apart agree."""

    def same() -> tuple[list[str], set[str], str] | None:
        first = kernel_state(host)
        time.sleep(3.5)
        return first if kernel_state(host) == first else None

    settled_state: tuple[list[str], set[str], str] = wait_until(
        same, 40, "the kernel state to settle", interval=0
    )
    return settled_state


@dataclass
class Poisoned:
    host: CalicnmHost
    ips: dict[str, str]
    eids: dict[str, str]
    profile_json: str
    """The network's valid profile as stored before any rule change."""
    before: tuple[list[str], set[str], str]
    bird_before: str
    files_before: set[str]
    escape_paths: list[Path]
    tmp_x_before: tuple[int, list[str]] | None
    """``/tmp/x`` (the brief's own id) before: (mtime, entries) if it exists."""
    bad: dict[str, str | bytes] = field(default_factory=dict)
    """Every injected key and its value."""


def endpoint_record(host: CalicnmHost, eid: str) -> dict[str, object]:
    record: dict[str, object] = json.loads(
        stored(host, f"{ROOT}/hosts/{host.hostname}/endpoints/{eid}")
    )
    return record


def hostile_records(
    host: CalicnmHost, template: dict[str, object], tag: str
) -> dict[str, str | bytes]:
    """The records of the brief, keyed by where they go."""
    me = host.hostname
    nl_id = secrets.token_hex(32)
    newline_ep = dict(
        template,
        id=nl_id,
        interface=f"cali{nl_id[:11]}\n-A INPUT -m comment --comment {MARK} -j ACCEPT",
        peer=f"tmp{nl_id[:11]}",
    )
    path_id = f"/tmp/calicnm-{tag}"
    path_ep = dict(template, id=path_id, interface="cali/tmp/x", peer="tmp/tmp/x")
    tmp_x_ep = dict(template, id="/tmp/x", interface="cali/tmp/x", peer="tmp/tmp/x")
    up_id = f"../../../../tmp/calicnm-{tag}-up"
    up_ep = dict(template, id=up_id)
    ports = {
        "inbound_rules": [
            {"action": "allow", "protocol": "tcp", "dst_ports": list(range(1, 100001))}
        ],
        "outbound_rules": [],
        "tags": [],
    }
    return {
        f"{ROOT}/profiles/poison1": json.dumps(
            {
                "inbound_rules": [{"action": "allow", "protocol": "\u00b2"}],
                "outbound_rules": [],
                "tags": [],
            }
        ),
        f"{ROOT}/profiles/poison2": b"\xff\xfe",
        f"{ROOT}/profiles/poison3": json.dumps(ports),
        f"{ROOT}/ipam/v4/affinity/{me}/nonsense": "",
        f"{ROOT}/ipam/v4/affinity/../x": "",
        f"{ROOT}/ipam/v4/affinity/../x/192.168.0.0-26": "",
        f"{ROOT}/hosts/{me}/endpoints/{nl_id}": json.dumps(newline_ep),
        f"{ROOT}/hosts/{me}/endpoints/{path_id}": json.dumps(path_ep),
        f"{ROOT}/hosts/{me}/endpoints//tmp/x": json.dumps(tmp_x_ep),
        f"{ROOT}/hosts/{me}/endpoints/{up_id}": json.dumps(up_ep),
        f"{ROOT}/hosts/evil/meta": json.dumps({"name": "evil", "ip": "1;", "as_num": None}),
    }


def start_containers(host: CalicnmHost) -> dict[str, str]:
    host.create_network(NET)
    serve = "echo hello > /www/index.html; exec httpd -f -v -p 80 -h /www"
    for name in ("pz1", "pz3"):
        host.docker("run", "-d", "--net", NET, "--name", name, IMG, "sh", "-c", serve)
    host.docker("run", "-d", "--net", NET, "--name", "pz2", IMG, "sleep", "1000")
    return {n: host.ip_of(n, NET) for n in ("pz1", "pz2", "pz3")}


@pytest.fixture(scope="module")
def poisoned(host: CalicnmHost) -> Iterator[Poisoned]:
    tag = secrets.token_hex(6)
    ips = start_containers(host)
    bad: dict[str, str | bytes] = {}
    try:
        eids = {n: endpoint_id(host, n, NET) for n in ips}
        wait_until(lambda: fetch_from(host, "pz2", ips["pz1"]) == "hello", 20, "pz2 -> pz1")
        wait_until(lambda: (host.state_dir / "bird.conf").exists(), 20, "bird.conf to be written")
        profile_json = stored(host, f"{ROOT}/profiles/{NET}").decode()
        before = settled(host)
        files_before = state_files(host)
        bird_before = (host.state_dir / "bird.conf").read_text()
        tmp_x_before = path_state(TMP_X)
        bad = hostile_records(host, endpoint_record(host, eids["pz1"]), tag)
        for key, value in bad.items():
            if key.endswith("/poison3"):
                assert isinstance(value, str)
                put_stdin(host, key, value)
            else:
                put(host, key, value)
        assert stored(host, f"{ROOT}/profiles/poison2").startswith(b"\xff\xfe"), (
            "etcd did not keep the invalid UTF-8 as it was written"
        )
        wait_until(
            lambda: invalid_keys(status(host)[1]) >= set(bad),
            20,
            "every bad key in calicnm status",
        )
        time.sleep(3.5)  # at least one full resync with all of them in
        yield Poisoned(
            host,
            ips,
            eids,
            profile_json,
            before,
            bird_before,
            files_before,
            [Path(f"/tmp/calicnm-{tag}"), Path(f"/tmp/calicnm-{tag}-up")],
            tmp_x_before,
            bad,
        )
    finally:
        delete(host, *bad)
        host.docker("rm", "-f", "pz1", "pz2", "pz3", "pz4", check=False)
        host.docker("network", "rm", NET, check=False)
    wait_until(
        lambda: not invalid_keys(status(host)[1]), 20, "the invalid records to clear from status"
    )
    assert_nothing_left(host)


# ---- one invalid record of another kind each, before the big set goes in -----------------


def test_invalid_network_record_does_not_stop_new_containers(host: CalicnmHost) -> None:
    """A network record nobody can read (another host's, say) concerns no
    container of this host's own networks: they still start."""
    key = f"{ROOT}/networks/{'f' * 64}"
    host.create_network("pzn")
    try:
        put(host, key, json.dumps({"id": "not-a-docker-id"}))
        wait_until(lambda: key in invalid_keys(status(host)[1]), 20, "the bad network in status")
        got = host.docker_run("run", "-d", "--net", "pzn", "--name", "pzn1", IMG, "sleep", "100")
        assert got.returncode == 0, (
            f"a container on a healthy network did not start because of {key}: {got.stderr.strip()}"
        )
    finally:
        delete(host, key)
        host.docker("rm", "-f", "pzn1", check=False)
        host.docker("network", "rm", "pzn", check=False)
    assert_nothing_left(host)


def test_invalid_pool_record_does_not_stop_network_creation(host: CalicnmHost) -> None:
    """A pool record nobody can read does not stop networks in the other
    (valid) pools from being created."""
    key = f"{ROOT}/ipam/v4/pools/10.9.0.0-16"
    try:
        put(host, key, json.dumps({"cidr": "10.9.0.0/16", "ipip": "yes"}))
        wait_until(lambda: key in invalid_keys(status(host)[1]), 20, "the bad pool in status")
        rc, text = status(host)
        assert rc == 0 and "calicnm agent is healthy" in text, text
        made = host.dockerd.docker(
            "network", "create", "-d", "calicnm", "--ipam-driver", "calicnm", "pzp", check=False
        )
        assert made.returncode == 0, (
            f"docker network create failed because of {key}: {made.stderr.strip()}"
        )
    finally:
        delete(host, key)
        host.docker("network", "rm", "pzp", check=False)
    assert_nothing_left(host)


# ---- the records of the brief, all at once -----------------------------------------------


def test_node_stays_up_and_status_names_every_bad_key(poisoned: Poisoned) -> None:
    host = poisoned.host
    assert host.node is not None and host.node.is_running(), host.node and host.node.log_tail(40)
    assert host.answering()
    rc, text = status(host)
    print(text)
    named = invalid_keys(text)
    missing = sorted(set(poisoned.bad) - named)
    assert not missing, f"calicnm status does not name {missing}:\n{text}"
    assert "calicnm agent is healthy" in text and rc == 0, text
    # The status file says the same, and keeps saying it pass after pass.
    agent = json.loads((host.state_dir / "agent-status.json").read_text())
    assert set(poisoned.bad) <= set(agent["invalid"])
    passes = agent["passes"]
    time.sleep(3.5)
    rc, text = status(host)
    assert rc == 0 and "calicnm agent is healthy" in text, text
    again = json.loads((host.state_dir / "agent-status.json").read_text())
    assert again["passes"] > passes and again["last_error"] is None, again


def test_each_invalid_record_is_logged_once(poisoned: Poisoned) -> None:
    """Many passes have seen them (a full resync every 3 s, and a pass per
    change); each is logged once, not once per pass."""
    log = (poisoned.host.workdir / "node.log").read_text(errors="replace")
    counts = {key: log.count(f"skipping invalid record {key}:") for key in poisoned.bad}
    print("log lines per key:", counts)
    assert all(n == 1 for n in counts.values()), counts


def test_no_injected_text_or_foreign_chain_in_the_kernel(poisoned: Poisoned) -> None:
    host = poisoned.host
    rules, chains, sets = kernel_state(host)
    rules_before, chains_before, sets_before = poisoned.before
    print(f"-A rules: {len(rules_before)} before the records, {len(rules)} with them")
    assert MARK not in "\n".join(rules) and MARK not in sets
    assert not [r for r in rules if "poison" in r.lower() or "/tmp" in r]
    assert chains == chains_before, f"chains changed: {chains ^ chains_before}"
    assert rules == rules_before, f"rules changed: {set(rules) ^ set(rules_before)}"
    assert sets == sets_before
    # The valid containers are untouched: routes, neighbours and traffic.
    for name, ip in poisoned.ips.items():
        route = host.netns.run(["ip", "-4", "route", "show", f"{ip}/32"]).stdout
        assert f"dev {host_ifname(poisoned.eids[name])}" in route, route
    assert fetch_from(host, "pz2", poisoned.ips["pz1"]) == "hello"


def test_nothing_escapes_the_state_dir(poisoned: Poisoned) -> None:
    host = poisoned.host
    for path in poisoned.escape_paths:
        assert not path.exists(), f"{path} was created from an endpoint id"
    # /tmp/x may exist on a shared machine (not ours): then it must be untouched.
    assert path_state(TMP_X) == poisoned.tmp_x_before
    marked = set(os_listdir(host.state_dir / "programmed"))
    assert all(ID_RE.match(name) for name in marked), marked
    assert marked == set(poisoned.eids.values())
    assert state_files(host) == poisoned.files_before


TMP_X = Path("/tmp/x")


def path_state(path: Path) -> tuple[int, list[str]] | None:
    """(mtime, sorted entries or []) of ``path``; None if it does not exist."""
    try:
        mtime = path.lstat().st_mtime_ns
    except FileNotFoundError:
        return None
    return mtime, sorted(os_listdir(path)) if path.is_dir() else []


def os_listdir(path: Path) -> list[str]:
    return [p.name for p in path.iterdir()]


def test_bird_conf_keeps_the_evil_host_out(poisoned: Poisoned) -> None:
    conf = (poisoned.host.state_dir / "bird.conf").read_text()
    assert not re.search(r"(?<![\w.])1;", conf), "an address '1;' reached bird.conf"
    assert "evil" not in conf
    assert conf == poisoned.bird_before


def test_a_profile_that_cannot_be_read_fails_closed(poisoned: Poisoned) -> None:
    """pz3 is given the 100 000-port profile: its chains drop everything
    (a handful of rules, not 100 000), and pz1 is unaffected."""
    host = poisoned.host
    eid = poisoned.eids["pz3"]
    key = f"{ROOT}/hosts/{host.hostname}/endpoints/{eid}"
    record = endpoint_record(host, eid)
    original = json.dumps(record)
    try:
        put(host, key, json.dumps(dict(record, profiles=["poison3"])))
        wait_until(
            lambda: fetch_from(host, "pz2", poisoned.ips["pz3"], seconds=1) == "",
            10,
            "pz3 to be closed by its unreadable profile",
        )
        rules = kernel_state(host)[0]
        mine = [r for r in rules if "calicnm-pi-poison3" in r or "calicnm-po-poison3" in r]
        print(f"{len(rules)} -A rules with the 100 000-port profile in use")
        assert [r for r in mine if r.startswith("filter -A calicnm-pi-poison3")] == [
            'filter -A calicnm-pi-poison3 -m comment --comment "profile unreadable or missing"'
            " -j DROP"
        ]
        assert len(rules) < len(poisoned.before[0]) + 20
        assert fetch_from(host, "pz2", poisoned.ips["pz1"]) == "hello"
    finally:
        put(host, key, original)
    wait_until(
        lambda: fetch_from(host, "pz2", poisoned.ips["pz3"]) == "hello", 10, "pz3 open again"
    )


def test_rule_changes_reach_the_kernel_within_2s(poisoned: Poisoned) -> None:
    host = poisoned.host
    key = f"{ROOT}/profiles/{NET}"
    profile = json.loads(poisoned.profile_json)
    took: list[float] = []
    try:
        for port in (7101, 7102, 7103, 7104, 7105):
            changed = dict(
                profile,
                inbound_rules=[
                    *profile["inbound_rules"],
                    {"action": "allow", "protocol": "tcp", "dst_ports": [port]},
                ],
            )
            put(host, key, json.dumps(changed))
            start = time.monotonic()
            seen = None
            while time.monotonic() - start < 5:
                saved = host.netns.run(["iptables-save", "-t", "filter"]).stdout
                if f"--dports {port} " in saved:
                    seen = time.monotonic() - start
                    break
                time.sleep(0.05)
            assert seen is not None, f"the rule for port {port} never reached the kernel"
            took.append(seen)
    finally:
        put(host, key, poisoned.profile_json)
    print(
        f"rule change -> iptables with {len(poisoned.bad)} invalid records stored: "
        f"min {min(took):.3f}s median {statistics.median(took):.3f}s max {max(took):.3f}s"
    )
    assert max(took) <= LATENCY_LIMIT, took


def test_host_keeps_starting_and_removing_containers(poisoned: Poisoned) -> None:
    host = poisoned.host
    started = time.monotonic()
    got = host.docker_run("run", "-d", "--net", NET, "--name", "pz4", IMG, "sleep", "1000")
    print(f"docker run with the invalid records stored: {time.monotonic() - started:.2f}s")
    assert got.returncode == 0, f"a new container did not start: {got.stderr.strip()}"
    eid = endpoint_id(host, "pz4", NET)
    assert fetch_from(host, "pz4", poisoned.ips["pz1"]) == "hello"
    host.docker("rm", "-f", "pz4")
    assert not [k for k in stored_keys(host) if k.endswith(f"/endpoints/{eid}")]
    # The agent drops the endpoint's marker on its next pass.
    marker = host.state_dir / "programmed" / eid
    wait_until(lambda: not marker.exists(), 5, "the removed endpoint's marker gone")


def stored_keys(host: CalicnmHost) -> list[str]:
    out = etcdctl(host, "get", "--prefix", "--keys-only", ROOT + "/").stdout
    return [k for k in out.decode(errors="replace").splitlines() if k]
