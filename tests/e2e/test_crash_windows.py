"""Crash windows: a node killed at every point of a container's life.

Each named fault point (``calicnm.faults.POINTS``) gets an emulated host of
its own; all of them share one etcd.  The host's node is killed there
(node and plugin, by SIGKILL, with no reply and no cleanup) while Docker
is in the call that reaches it, and started again: either soon enough that
Docker is still retrying its call, or a minute later, long after Docker
gave up on it.  The scenarios run at once, so the slow variant waits its
minute once for every point.

While the hosts recover no two endpoint records may name one address, and
each host must still start a container.  Once every container is removed
and the ownership collector has had its turn, nothing of any dead endpoint
is left on any host: no veth, no endpoint record, no allocation, no
per-endpoint chain or dispatch rule, no ipset member, no route;
``calicnm ipam check`` finds nothing, Docker has no container left and
removes the network.

Traffic: none beyond the fabric's own etcd and BGP sessions.
"""

from __future__ import annotations

import functools
import ipaddress
import json
import re
import subprocess
import threading
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Self

import pytest

from calicnm.faults import FAULT_ENV, POINTS
from lab.cluster import CalicnmHost, Cluster, wait_until
from lab.dockerd import DOCKER_CLIENT
from lab.etcd import fabric_etcd
from lab.images import DEFAULT_IMAGE as IMG
from lab.paths import CALICNM
from lab.procs import Cleanup
from tests.e2e.helpers import assert_nothing_left, chain_rules

NET = "crashnet"
VICTIM = "victim"
DELETE_POINTS = frozenset({"after-veth-removal", "before-record-delete", "after-release-commit"})
"""Points reached while Docker removes a container; the others while it starts one."""
CALL_OF = {
    "after-assign-commit": "IpamDriver.RequestAddress",
    "after-veth": "NetworkDriver.CreateEndpoint",
    "after-record": "NetworkDriver.CreateEndpoint",
    "after-set-handle": "NetworkDriver.CreateEndpoint",
    "after-join-write": "NetworkDriver.Join",
    "after-veth-removal": "NetworkDriver.DeleteEndpoint",
    "before-record-delete": "NetworkDriver.DeleteEndpoint",
    "after-release-commit": "IpamDriver.ReleaseAddress",
}
"""The Docker call that reaches each point."""
SOON = 2.0
"""Seconds the node stays dead in the quick variant: Docker retries a call
after 1, 2, 4 and 8 s, so the restarted node gets the retry.  Docker 20.10
sends that retry with an empty body (moby/moby#35459); calicnm refuses it
(400) and Docker goes on as after any failed call."""
LATE = 60.0
"""Seconds the node stays dead in the slow variant: Docker has given up."""
CLEANUP_TIMEOUT = 120.0
"""Longest wait for the collector once the containers are gone: the lab's
pending age (15 s) plus two sweeps a grace apart, with room for a loaded machine."""
CLI_TIMEOUT = 180.0
"""Longest one ``calicnm ipam check`` may take: a loaded 2-core machine runs
several at once next to eight nodes and dockerds."""
REPAIR_LINES = (
    "stale endpoint record removed",
    "its veth removed",
    "orphan veth removed",
    "address released ip=",
    "endpoint record removed on release",
    "could not repair",
)
"""What the node logs when it cleans up after a crash."""
_IP = re.compile(r"\b(192\.168\.\d{1,3}\.\d{1,3})\b")


class ParallelCluster(Cluster):
    """A :class:`Cluster` whose hosts start at once, host ``i`` with ``envs[i]``
    added to its node's environment."""

    def __init__(self, workdir: Path, envs: list[dict[str, str]]) -> None:
        super().__init__(workdir, len(envs))
        self.envs = envs

    def start(self) -> Self:
        try:
            self.fabric.create()
            self.etcd = fabric_etcd(self.fabric, self.workdir)
            for i, env in enumerate(self.envs):
                att = self.fabric.add_host()
                self.hosts.append(
                    CalicnmHost(
                        att.host,
                        att.address,
                        self.workdir / f"host{i + 1}",
                        f"host{i + 1}",
                        etcd_endpoints=self.etcd_url,
                        extra_env=env,
                    )
                )
            in_threads({h.hostname: h.start for h in self.hosts}, timeout=400)
        except BaseException:
            self.close(raise_errors=False)
            raise
        return self

    def close(self, raise_errors: bool = True) -> None:
        """As :meth:`Cluster.close`, with the hosts closed at once."""
        cleanup = Cleanup(f"cluster in {self.workdir}")
        jobs = {h.hostname: h.close for h in self.hosts}
        cleanup.step("closing the hosts", lambda: in_threads(jobs, timeout=400))
        if self.etcd is not None:
            cleanup.step("stopping the fabric etcd", self.etcd.stop)
        cleanup.step("closing the fabric", self.fabric.close)
        cleanup.finish(raise_errors)

    _open = start
    _close = close


def in_threads(jobs: Mapping[str, Callable[[], Any]], timeout: float) -> dict[str, Any]:
    """Run each job in a thread of its own; their results by name.  Bounded:
    raises if any job is still running after ``timeout`` seconds, and with
    every failure listed if any failed (chained to the first one)."""
    results: dict[str, Any] = {}
    errors: dict[str, BaseException] = {}

    def run(name: str, job: Callable[[], Any]) -> None:
        try:
            results[name] = job()
        except BaseException as exc:
            errors[name] = exc

    threads = [
        threading.Thread(target=run, args=(name, job), name=name, daemon=True)
        for name, job in jobs.items()
    ]
    for thread in threads:
        thread.start()
    deadline = time.monotonic() + timeout
    for thread in threads:
        thread.join(max(0.0, deadline - time.monotonic()))
    stuck = [t.name for t in threads if t.is_alive()]
    if stuck:
        raise AssertionError(f"still running after {timeout:.0f}s: {stuck}")
    if errors:
        listed = "\n".join(f"{name}: {type(e).__name__}: {e}" for name, e in errors.items())
        raise AssertionError(f"{len(errors)} of {len(jobs)} failed:\n{listed}") from next(
            iter(errors.values())
        )
    return results


@dataclass
class Crash:
    """One host's crash: what was done, and what Docker made of it."""

    point: str
    host: CalicnmHost
    trigger: tuple[str, ...] = ()
    died_after: float = 0.0
    """Seconds from the Docker command's start to the node's death."""
    down_for: float = 0.0
    """Seconds from the node's death until it answered again."""
    took: float = 0.0
    """Seconds the Docker command ran."""
    rc: int | None = None
    output: str = ""
    victim_state: str = ""
    retried_here: str = ""
    """How the restarted node answered Docker's retry of the killed call
    (its status codes), or "" if the retry never reached it."""

    @property
    def removes(self) -> bool:
        return self.point in DELETE_POINTS


def crash(c: Crash, delay: float) -> None:
    """Kill ``c.host``'s node at ``c.point`` and start it again ``delay``
    seconds after its death, without the fault; wait for Docker's command.

    A delete-path point needs a running container first: it is started with
    the fault unset, then the node restarts with the fault set.  Create-path
    hosts carry the fault from their first start."""
    host = c.host
    if c.removes:
        host.docker("run", "-d", "--net", NET, "--name", VICTIM, IMG, "sleep", "600")
        host.extra_env[FAULT_ENV] = c.point
        assert host.stop_node() == 0
        host.start_node()
        c.trigger = ("rm", "-f", VICTIM)
    else:
        assert host.extra_env.get(FAULT_ENV) == c.point
        c.trigger = ("run", "-d", "--net", NET, "--name", VICTIM, IMG, "sleep", "600")
    node = host.node
    assert node is not None
    started = time.monotonic()
    proc = subprocess.Popen(
        [DOCKER_CLIENT, "-H", f"unix://{host.dockerd.sock}", *c.trigger],
        stdin=subprocess.DEVNULL,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        env=host.dockerd.client_env(),
    )
    try:
        wait_until(
            lambda: not node.is_running() or proc.poll() is not None,
            120,
            f"{c.point}: the node's death or the end of docker {c.trigger[0]}",
        )
        if node.is_running():
            out, _ = proc.communicate(timeout=10)
            raise AssertionError(
                f"{c.point}: docker {' '.join(c.trigger)} ended ({proc.returncode}: "
                f"{out.strip()}) and the node is still alive: the point was never reached"
            )
        died = time.monotonic()
        c.died_after = died - started
        del host.extra_env[FAULT_ENV]
        time.sleep(max(0.0, died + delay - time.monotonic()))  # the window under test
        host.start_node()
        c.down_for = time.monotonic() - died
        c.output, _ = proc.communicate(timeout=240)
        c.rc = proc.returncode
        c.took = time.monotonic() - started
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.communicate(timeout=10)
    state = host.docker_run("inspect", "-f", "{{.State.Status}} {{.State.Error}}", VICTIM)
    c.victim_state = state.stdout.strip() if state.returncode == 0 else "gone"
    since_restart = (host.workdir / "node.log").read_text(errors="replace").rsplit("\n=== ", 1)[-1]
    call = re.escape(CALL_OF[c.point])
    c.retried_here = " ".join(re.findall(rf"call={call} .*?status=(\d+)", since_restart))


# ---- what is left ------------------------------------------------------------------------


def stored(host: CalicnmHost) -> tuple[dict[str, list[str]], dict[str, str]]:
    """(endpoint key -> its addresses, address -> handle) of the whole datastore."""
    endpoints: dict[str, list[str]] = {}
    held: dict[str, str] = {}
    for key, value in host.etcd_keys().items():
        if "/endpoints/" in key:
            nets = json.loads(value).get("ipv4_nets", [])
            endpoints[key] = [n.split("/")[0] for n in nets]
        elif "/ipam/v4/blocks/" in key:
            block = json.loads(value)
            base = ipaddress.IPv4Network(block["cidr"]).network_address
            for ordinal, allocation in block["allocations"].items():
                held[str(base + int(ordinal))] = allocation["handle"]
    return endpoints, held


def shared_addresses(endpoints: dict[str, list[str]]) -> dict[str, list[str]]:
    named: dict[str, list[str]] = {}
    for key, ips in endpoints.items():
        for ip in ips:
            named.setdefault(ip, []).append(key)
    return {ip: keys for ip, keys in named.items() if len(keys) > 1}


def addresses_in_logs(host: CalicnmHost) -> set[str]:
    """Every container address the host's node log names."""
    text = (host.workdir / "node.log").read_text(errors="replace")
    return set(_IP.findall(text))


def findings(host: CalicnmHost) -> list[str]:
    """What ``calicnm ipam check`` reports on ``host`` now."""
    argv = [CALICNM, "ipam", "check", "--json"]
    check = host.netns.run(argv, check=False, env=host.env(), timeout=CLI_TIMEOUT)
    try:
        report = json.loads(check.stdout)
    except ValueError:
        return [f"ipam check exited {check.returncode}: {check.stderr.strip()[-400:]}"]
    found = [f"{f['kind']} {f['subject']}: {f['detail']}" for f in report.get("findings", [])]
    if check.returncode != 0 or not report.get("ok"):
        found.append(f"ipam check exited {check.returncode}, ok={report.get('ok')}")
    return found


def left_on(host: CalicnmHost, dead: set[str]) -> list[str]:
    """What ``host`` still has of any endpoint (empty: clean).  ``dead``: every
    address a container was given during the run."""
    problems = findings(host)
    if links := host.links("cali", "tmp"):
        problems.append(f"links {links}")
    chains = chain_rules(host)
    if own := [n for n in chains if n.startswith(("calicnm-from-", "calicnm-to-"))]:
        problems.append(f"per-endpoint chains {own}")
    dispatch = [
        rule
        for name, rules in chains.items()
        if name.startswith(("calicnm-FROM-EP", "calicnm-TO-EP"))
        for rule in rules
        if re.search(r" -[io] cali", rule)
    ]
    if dispatch:
        problems.append(f"dispatch rules {dispatch}")
    saved = host.netns.run(["ipset", "save"], timeout=10).stdout.splitlines()
    members = [
        line
        for line in saved
        if line.startswith("add ")
        and (line.split()[1].startswith("calicnm-t-") or line.split()[2] in dead)
    ]
    if members:
        problems.append(f"ipset members {members}")
    routes = host.netns.run(["ip", "-4", "route", "show", "table", "all"], timeout=10).stdout
    if stale := [r for r in routes.splitlines() if " dev cali" in r or r.split()[0] in dead]:
        problems.append(f"routes {stale}")
    return problems


def repairs(host: CalicnmHost) -> list[str]:
    """The node's log lines about cleaning up, without their time stamps."""
    text = (host.workdir / "node.log").read_text(errors="replace")
    found = []
    for line in text.splitlines():
        if any(marker in line for marker in REPAIR_LINES) and "handle=-" not in line:
            found.append(re.sub(r"^.*?(WARNING|INFO|ERROR)", r"\1", line)[:220])
    return found


def docker_retries(host: CalicnmHost) -> int:
    """How often this host's dockerd retried a call to an absent plugin."""
    return host.dockerd.log_path.read_text(errors="replace").count("Unable to connect to plugin")


def summary(crashes: list[Crash], before: dict[str, list[str]]) -> str:
    lines = []
    for c in crashes:
        lines.append(
            f"{c.host.hostname} {c.point}: docker {c.trigger[0]} -> rc {c.rc} in {c.took:.0f}s "
            f"(node died after {c.died_after:.1f}s, down {c.down_for:.1f}s, "
            f"{docker_retries(c.host)} docker retries, the restarted node answered "
            f"{CALL_OF[c.point]} with [{c.retried_here}]); victim: {c.victim_state}; "
            f"output: {c.output.strip()[-300:]!r}"
        )
        for line in before.get(c.host.hostname, []):
            lines.append(f"    found before removal: {line}")
        for line in repairs(c.host):
            lines.append(f"    node log: {line}")
    return "\n".join(lines)


# ---- the sweep ---------------------------------------------------------------------------


@pytest.mark.parametrize(
    "delay", [SOON, LATE], ids=["restart-while-docker-retries", "restart-late"]
)
def test_a_kill_at_every_point_leaves_nothing_behind(tmp_path: Path, delay: float) -> None:
    assert set(CALL_OF) == set(POINTS)
    envs = [{} if point in DELETE_POINTS else {FAULT_ENV: point} for point in POINTS]
    with ParallelCluster(tmp_path, envs) as cluster:
        hosts = cluster.hosts
        crashes = [Crash(point, host) for point, host in zip(POINTS, hosts, strict=True)]
        in_threads({h.hostname: functools.partial(h.create_network, NET) for h in hosts}, 120)

        in_threads({c.point: functools.partial(crash, c, delay) for c in crashes}, delay + 400)
        report = tmp_path / "crashes.txt"

        # Every host serves again, and no address is handed out twice.
        fresh = ("run", "-d", "--net", NET, "--name", "fresh", IMG, "sleep", "600")
        in_threads({h.hostname: functools.partial(h.docker, *fresh) for h in hosts}, 180)
        endpoints, held = stored(hosts[0])
        assert shared_addresses(endpoints) == {}, "two endpoint records name one address"
        for host in hosts:
            ip = host.ip_of("fresh", NET)
            owners = [
                k for k in endpoints if f"/hosts/{host.hostname}/" in k and ip in endpoints[k]
            ]
            assert len(owners) == 1, f"{host.hostname}: fresh's {ip} is named by {owners}"
            assert held.get(ip) == owners[0].rsplit("/", 1)[1], f"{host.hostname}: {ip} not held"
        before = in_threads(
            {h.hostname: functools.partial(findings, h) for h in hosts}, CLI_TIMEOUT + 60
        )
        report.write_text(summary(crashes, before) + "\n")

        dead = set(held) | {ip for ips in endpoints.values() for ip in ips}
        for host in hosts:
            dead |= addresses_in_logs(host)

        # Docker removes every container; the collector then leaves nothing.
        def remove_all(host: CalicnmHost) -> None:
            ids = host.docker("ps", "-aq").split()
            if ids:
                host.docker("rm", "-f", *ids, timeout=180)
            assert host.docker("ps", "-aq") == "", f"{host.hostname}: a container is stuck"

        in_threads({h.hostname: functools.partial(remove_all, h) for h in hosts}, 240)

        def everything_left() -> dict[str, list[str]]:
            endpoints, held = stored(hosts[0])
            shared = shared_addresses(endpoints)
            assert shared == {}, f"two endpoint records name one address: {shared}"
            left = in_threads(
                {h.hostname: functools.partial(left_on, h, dead) for h in hosts}, CLI_TIMEOUT + 120
            )
            left["datastore"] = [f"records {endpoints}"] if endpoints else []
            left["datastore"] += [f"allocations {held}"] if held else []
            return {name: problems for name, problems in left.items() if problems}

        last: dict[str, list[str]] = {}

        def clean() -> bool:
            last.clear()
            last.update(everything_left())
            return not last

        def datastore_clean() -> bool:
            endpoints, held = stored(hosts[0])
            last["datastore"] = [f"records {endpoints}", f"allocations {held}"]
            return not endpoints and not held

        try:
            # The datastore first (one cheap read a round), then every host's kernel.
            wait_until(datastore_clean, CLEANUP_TIMEOUT, "no record, no allocation", 1)
            wait_until(clean, CLEANUP_TIMEOUT, "every host clean", interval=2)
        except AssertionError as exc:
            raise AssertionError(f"{exc}\nleft: {json.dumps(last, indent=1)}") from None
        finally:
            report.write_text(summary(crashes, before) + "\n")

        # Docker's own view is sane: the network goes, nothing is left anywhere.
        for host in hosts:
            host.docker("network", "rm", NET)
            assert NET not in host.docker("network", "ls", "--format", "{{.Name}}").split()
            assert host.docker("ps", "-aq") == ""
        for host in hosts:
            assert_nothing_left(host)
        assert everything_left() == {}
        print(f"\n{report.read_text()}")
