"""calicnm next to a stock dockerd: one emulated host whose dockerd has its default bridge
``docker0``, and so its own filter rules (``FORWARD -j DOCKER-USER``, the isolation chains,
``-i docker0 ! -o docker0 -j ACCEPT``), which it puts back at the top of FORWARD on every
start and on every ``docker network create``.

Proven on the real kernel, with real traffic from a container on Docker's default bridge
(which dockerd's rules accept) to a calicnm container whose profile denies it:

* calicnm drops it; its jumps are rule 1 of FORWARD, INPUT, nat POSTROUTING and DOCKER-USER;
* after a dockerd restart, a ``docker network create`` or an operator's ``iptables -F
  FORWARD`` the jumps are rule 1 again within 1 s (:data:`RECOVERY`: the agent's
  half-second check, the full pass and our 100 ms sampling), and the time denied traffic can pass
  meanwhile is measured (at most :data:`WINDOW_LIMIT`);
* the check keeps running while the agent is busy with passes.

The node runs with the product's settings (30 s full resync, not the test settings' 3 s), so
what puts the jumps back within a second is the agent's check, never the resync.  The
measured figures are printed (``pytest -s`` shows them).
"""

from __future__ import annotations

import itertools
import os
import shlex
import shutil
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from calicnm.store import keys
from lab.cluster import CalicnmHost, single_host, wait_until
from lab.images import DEFAULT_IMAGE as IMG
from tests.e2e.helpers import (
    RuleSample,
    RuleSampler,
    assert_nothing_left,
    chain_rules,
    first_rule,
    out_of_place,
    start_web,
    tcp_probe,
)

IPT = ("iptables", "-w", "5")
FORWARD_CHAIN = "calicnm-FORWARD"
JUMP = f"-A FORWARD -j {FORWARD_CHAIN}"
INPUT_JUMP = "-A INPUT -j calicnm-INPUT"
GUEST_JUMP = "-A DOCKER-USER -j calicnm-FORWARD"
NAT_JUMP = "-A POSTROUTING -j calicnm-POSTROUTING"
EXPECTED = (
    ("filter", "FORWARD", JUMP),
    ("filter", "INPUT", INPUT_JUMP),
    ("filter", "DOCKER-USER", GUEST_JUMP),
    ("nat", "POSTROUTING", NAT_JUMP),
)
"""(table, chain, the calicnm jump that must be its rule 1)."""
DOCKER0_ACCEPT = "-A FORWARD -i docker0 ! -o docker0 -j ACCEPT"

RECOVERY = 1.0
"""How long a moved jump may be seen out of place (the issue's bound): the agent checks
every ``CHECK_SECONDS`` (0.5 s) and then re-asserts at once with a full pass (tens of ms,
~110 ms seen under a dockerd start); our reads come every 100 ms, so a span they measure is
at most 0.1 s longer than the real one."""
WINDOW_LIMIT = 2.0
"""How long denied traffic may pass after FORWARD was flushed under an ACCEPT policy."""
NAT_POOL = "10.250.0.0/24"
"""A disabled (never allocated from) nat-outgoing pool: it only makes the node keep its nat
POSTROUTING jump, so that jump can be watched too."""
PROBE_PERIOD = 0.1


@pytest.fixture(scope="module")
def dhost(tmp_path_factory: pytest.TempPathFactory) -> Iterator[CalicnmHost]:
    """Node first, then dockerd WITH docker0 (lab's start order); product node settings."""
    if os.geteuid() != 0:
        pytest.skip("end-to-end tests need root")
    for tool in ("dockerd", "etcd", "iptables"):
        if shutil.which(tool) is None:
            pytest.fail(f"{tool} is not installed; run 'make test', which installs it")
    workdir: Path = tmp_path_factory.mktemp("dhost")
    with single_host(workdir, node_settings="product", docker_bridge=True) as h:
        yield h


@pytest.fixture(scope="module")
def scene(dhost: CalicnmHost) -> Iterator[None]:
    """``cnet`` (default profile: only tag ``cnet`` members may connect) with ``target``
    (httpd on 80) and ``peer``; ``bclient`` on Docker's default bridge.  All three come back
    by themselves after a dockerd restart (``--restart always``; ``--stop-timeout 1`` keeps
    the daemon's stop short: busybox ``sleep``/``httpd`` as PID 1 ignore SIGTERM)."""
    h = dhost
    keep = ("--restart", "always", "--stop-timeout", "1")
    h.create_network("cnet")
    h.calicnm("pool", "add", "--disabled", "--nat-outgoing", NAT_POOL)
    start_web(h, "target", "cnet", *keep)
    h.docker("run", "-d", *keep, "--net", "cnet", "--name", "peer", IMG, "sleep", "100000")
    h.docker("run", "-d", *keep, "--net", "bridge", "--name", "bclient", IMG, "sleep", "100000")
    wait_until(lambda: jumps_in_place(h), 10, "calicnm's jumps at rule 1", interval=0.1)
    yield
    h.docker("rm", "-f", "target", "peer", "bclient", check=False)
    h.docker("network", "rm", "cnet", check=False)
    h.calicnm("pool", "remove", NAT_POOL, check=False)
    assert_nothing_left(h)


# ---- helpers ---------------------------------------------------------------------------------


def jumps_in_place(h: CalicnmHost) -> bool:
    return all(first_rule(h, chain, table) == rule for table, chain, rule in EXPECTED)


def target_ip(h: CalicnmHost) -> str:
    return h.ip_of("target", "cnet")


def fetch(h: CalicnmHost, src: str, ip: str) -> bool:
    """HTTP GET of target's page from container ``src`` (2 s limit)."""
    out = h.docker_run(
        "exec",
        src,
        "sh",
        "-c",
        f"rm -f /tmp/f; busybox timeout 2 wget -q -O /tmp/f http://{ip}/index.html && cat /tmp/f",
    )
    return out.stdout.strip() == "hello"


def assert_denied(h: CalicnmHost, ip: str, attempts: int = 3) -> None:
    for i in range(attempts):
        assert not fetch(h, "bclient", ip), f"bclient (default bridge) reached target, try {i}"


def running(h: CalicnmHost, *names: str) -> bool:
    states = h.docker_run("inspect", "-f", "{{.State.Running}}", *names).stdout.split()
    return states == ["true"] * len(names)


def forward_policy(h: CalicnmHost) -> str:
    saved = h.netns.run(["iptables-save", "-t", "filter"]).stdout
    line = next(x for x in saved.splitlines() if x.startswith(":FORWARD "))
    return line.split()[1]


def restore_forward(h: CalicnmHost, saved: list[str]) -> None:
    """Put dockerd's FORWARD rules back after a flush: wait (bounded, beyond the 30 s resync)
    for the node's jump at rule 1, then append whatever of ``saved`` is missing, in order."""
    wait_until(lambda: first_rule(h, "FORWARD") == JUMP, 40, "the FORWARD jump back", 0.1)
    now = chain_rules(h)["FORWARD"]
    for rule in saved:
        if rule not in now:
            h.netns.run([*IPT, *shlex.split(rule)])
    assert chain_rules(h)["FORWARD"] == saved, "FORWARD could not be restored"


def docker0_exposed(sample: RuleSample) -> bool:
    """Does FORWARD accept docker0's traffic before any jump to calicnm's verdict?"""
    for rule in sample.chains["filter"].get("FORWARD", []):
        if rule in (JUMP, "-A FORWARD -j DOCKER-USER"):
            return False
        if rule == DOCKER0_ACCEPT:
            return True
    return False


def spans_text(spans: list[tuple[float, float | None]], origin: float) -> str:
    if not spans:
        return "never seen out of place"
    return ", ".join(
        f"at +{a - origin:.2f}s for {'ever' if b is None else f'{b - a:.2f}s'}" for a, b in spans
    )


def assert_recovered(spans: list[tuple[float, float | None]], what: str) -> None:
    for start, end in spans:
        assert end is not None, f"{what}: never back at rule 1"
        assert end - start <= RECOVERY, (
            f"{what}: back at rule 1 only after {end - start:.2f}s (bound {RECOVERY:.1f}s)"
        )


@dataclass(frozen=True)
class Cut:
    """What :func:`cut_and_probe` saw; times are seconds after the cut."""

    back: float | None
    """When a read first showed the FORWARD jump at rule 1 again (None: not within 40 s)."""
    opened: list[float]
    """When a denied connect succeeded."""
    probed_until: float
    policy: str
    """The FORWARD policy found (and put back)."""

    @property
    def window(self) -> float:
        """From the cut to the end of the last probe period in which a denied connect
        succeeded (0 if none did)."""
        return max(self.opened) + PROBE_PERIOD if self.opened else 0.0

    def summary(self) -> str:
        back = "never" if self.back is None else f"after {self.back:.2f}s"
        return (
            f"jump back {back}, open window {self.window:.2f}s "
            f"({len(self.opened)} denied connects got through)"
        )

    def check(self, limit: float = 2.0) -> None:
        assert self.back is not None, "the FORWARD jump did not come back within 40 s"
        assert self.back <= limit, f"the FORWARD jump came back only after {self.back:.2f}s"
        assert self.window <= WINDOW_LIMIT, f"denied traffic passed for {self.window:.2f}s"
        late = [t for t in self.opened if t > self.back + 0.3]
        assert not late, f"denied connects succeeded after the jump was back: {late}"
        assert self.probed_until > self.back + 0.3, "probes ended before the jump was back"


def cut_and_probe(h: CalicnmHost, commands: list[list[str]], policy: str, probes: int = 50) -> Cut:
    """Under FORWARD policy ``policy``: probe target from bclient (raw TCP connects, one per
    100 ms), run ``commands`` in the host netns 0.5 s in, and wait (bounded) for the FORWARD
    jump at rule 1.  Asserts that no connect succeeded before the cut.  The policy and
    dockerd's FORWARD rules are put back as they were."""
    ip = target_ip(h)
    saved = chain_rules(h)["FORWARD"]
    assert saved[0] == JUMP, saved
    old_policy = forward_policy(h)
    h.netns.run([*IPT, "-P", "FORWARD", policy])
    try:
        with RuleSampler(h) as sampler, tcp_probe(h, "bclient", ip, 80, probes) as probe:
            time.sleep(0.5)
            t_cut = time.monotonic()
            for argv in commands:
                h.netns.run(argv)
            t_done = time.monotonic()
            back = sampler.wait_for(lambda s: s.first("FORWARD") == JUMP, t_done, timeout=40)
            results = probe.results()
    finally:
        h.netns.run([*IPT, "-P", "FORWARD", old_policy])
        restore_forward(h, saved)
    before = [t for t, ok in results if ok and t < t_cut]
    assert not before, f"denied connects succeeded before the cut: {len(before)}"
    return Cut(
        back=None if back is None else back.t - t_cut,
        opened=[t - t_cut for t, ok in results if ok and t >= t_cut],
        probed_until=results[-1][0] - t_cut,
        policy=old_policy,
    )


# ---- tests -----------------------------------------------------------------------------------


def test_default_bridge_container_is_denied_by_calicnm(dhost: CalicnmHost, scene: None) -> None:
    h = dhost
    ip = target_ip(h)
    wait_until(lambda: fetch(h, "peer", ip), 15, "peer (on cnet) fetching from target")
    assert_denied(h, ip)
    for table, chain, rule in EXPECTED:
        assert first_rule(h, chain, table) == rule, f"{table} {chain} rule 1"
    forward = chain_rules(h)["FORWARD"]
    assert "-A FORWARD -j DOCKER-USER" in forward and DOCKER0_ACCEPT in forward, forward
    # Control: with a rule allowing bclient the very same path works, so what denied it
    # above was calicnm's policy, not routing or dockerd.
    rule = ["inbound", "allow", "from", "cidr", f"{h.ip_of('bclient', 'bridge')}/32"]
    h.calicnm("profile", "cnet", "rule", "add", *rule)
    try:
        wait_until(lambda: fetch(h, "bclient", ip), 15, "bclient allowed by an explicit rule")
    finally:
        h.calicnm("profile", "cnet", "rule", "remove", *rule)
    wait_until(lambda: not fetch(h, "bclient", ip), 15, "bclient denied again")


def test_dockerd_restart_puts_calicnm_first_again(dhost: CalicnmHost, scene: None) -> None:
    h = dhost
    assert_denied(h, target_ip(h))
    sampler = RuleSampler(h, ("filter", "nat"), limit=180).start()
    try:
        t0 = time.monotonic()
        h.dockerd.stop_daemon()
        t_start = time.monotonic()
        h.dockerd.start_daemon()
        t_up = time.monotonic()
        wait_until(lambda: running(h, "target", "peer", "bclient"), 60, "containers restarted")
        ip = target_ip(h)
        wait_until(lambda: fetch(h, "peer", ip), 15, "peer fetching from target again")
        # Settled: every jump at rule 1 in one read, then 1.5 s more of samples.
        settled = sampler.wait_for(
            lambda s: all(s.first(c, t) == r for t, c, r in EXPECTED), time.monotonic(), 10
        )
        time.sleep(1.5)
    finally:
        samples = sampler.stop()
    assert settled is not None, "the jumps did not all settle at rule 1 after the restart"
    after = [s for s in samples if s.t >= t_start]
    print(
        f"\ndockerd restart: stop {t_start - t0:.1f}s, start {t_up - t_start:.1f}s; "
        f"{len(after)} reads of filter+nat, one per 100 ms"
    )
    for table, chain, rule in EXPECTED:
        spans = out_of_place(after, chain, rule, table)
        print(f"  {table} {chain}: rule 1 not calicnm's {spans_text(spans, t_start)}")
    exposed = [s for s in after if docker0_exposed(s)]
    print(f"  reads with a docker0 ACCEPT ahead of every calicnm jump: {len(exposed)}")
    for s in exposed[:1]:
        print(f"    at +{s.t - t_start:.2f}s FORWARD was: {s.chains['filter']['FORWARD']}")
    for table, chain, rule in EXPECTED:
        assert_recovered(out_of_place(after, chain, rule, table), f"{table} {chain}")
    assert_denied(h, ip)


def test_flushed_forward_is_reasserted_and_the_open_window_is_short(
    dhost: CalicnmHost, scene: None
) -> None:
    h = dhost
    # The jump deleted, dockerd's rules left: DOCKER-USER still sends everything to
    # calicnm's verdict first, so no denied connect may get through at all.
    cut = cut_and_probe(h, [[*IPT, "-D", "FORWARD", "-j", FORWARD_CHAIN]], "ACCEPT")
    print(f"\nFORWARD policy in the emulated host: {cut.policy}")
    print(f"  -D FORWARD -j {FORWARD_CHAIN} (policy ACCEPT): {cut.summary()}")
    cut.check()
    assert not cut.opened, "denied traffic passed although DOCKER-USER jumps to calicnm"
    # FORWARD flushed under a DROP policy: everything is dropped meanwhile.
    cut = cut_and_probe(h, [[*IPT, "-F", "FORWARD"]], "DROP")
    print(f"  -F FORWARD (policy DROP): {cut.summary()}")
    cut.check()
    # FORWARD flushed under an ACCEPT policy: the case that matters.
    cut = cut_and_probe(h, [[*IPT, "-F", "FORWARD"]], "ACCEPT")
    print(f"  -F FORWARD (policy ACCEPT): {cut.summary()}")
    cut.check()
    assert_denied(h, target_ip(h), attempts=1)


def test_docker_network_create_does_not_keep_calicnm_second(
    dhost: CalicnmHost, scene: None
) -> None:
    h = dhost
    sampler = RuleSampler(h).start()
    try:
        t0 = time.monotonic()
        h.docker("network", "create", "cnmt-br2")
        created = time.monotonic()
        wait_until(lambda: first_rule(h, "FORWARD") == JUMP, 10, "jump back", interval=0.1)
        time.sleep(1.5)
        forward = chain_rules(h)["FORWARD"]
    finally:
        h.docker("network", "rm", "cnmt-br2", check=False)
        time.sleep(1.5)
        samples = sampler.stop()
    spans = out_of_place(samples, "FORWARD", JUMP)
    guest = [s.t - t0 for s in samples if s.first("DOCKER-USER") != GUEST_JUMP]
    print(
        f"\ndocker network create: {created - t0:.2f}s; FORWARD rule 1 not calicnm's "
        f"{spans_text(spans, t0)}; DOCKER-USER rule 1 not calicnm's in {len(guest)} of "
        f"{len(samples)} reads"
    )
    assert forward[:2] == [JUMP, "-A FORWARD -j DOCKER-USER"], forward
    assert not guest, f"DOCKER-USER's rule 1 was not calicnm's jump at {guest}"
    assert_recovered(spans, "FORWARD")


def test_the_check_runs_while_the_agent_is_busy(dhost: CalicnmHost, scene: None) -> None:
    """Every etcd change wakes a pass on every host: a container started anywhere in the
    cluster, a profile edited, and each node's own host-record refresh (every 10 s, so a
    20-host cluster makes two a second even when nothing changes at all).  Such a steady
    stream, emulated here by rewriting this host's record with its own value every 0.5 s,
    must not hold off the half-second check: FORWARD flushed under an ACCEPT policy is
    repaired within 2 s all the same, not at the next 30 s resync."""
    h = dhost
    key = keys.host_meta(h.hostname)
    value = h.etcd_keys(key)[key]
    stop = threading.Event()
    writes: list[float] = []

    def rewrite() -> None:
        deadline = time.monotonic() + 12
        for _ in range(30):
            if stop.wait(0.5) or time.monotonic() > deadline:
                return
            h.netns.run(
                ["etcdctl", "--endpoints", "http://127.0.0.1:2379", "put", key, value],
                env={**os.environ, "ETCDCTL_API": "3"},
                timeout=10,
            )
            writes.append(time.monotonic())

    worker = threading.Thread(target=rewrite, name="rewrite", daemon=True)
    worker.start()
    try:
        time.sleep(1.0)
        cut = cut_and_probe(h, [[*IPT, "-F", "FORWARD"]], "ACCEPT", probes=100)
    finally:
        stop.set()
        worker.join(timeout=30)
    assert h.etcd_keys(key)[key] == value
    gaps = [b - a for a, b in itertools.pairwise(writes)]
    print(
        f"\nhost record rewritten (same value) every {sum(gaps) / max(1, len(gaps)):.2f}s, "
        f"{len(writes)} times; FORWARD flushed (policy ACCEPT): {cut.summary()}"
    )
    cut.check()
