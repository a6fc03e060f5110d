"""Helpers shared by the end-to-end tests (test modules import these, never each other)."""

from __future__ import annotations

import contextlib
import json
import math
import os
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from calicnm.wiring import EMBEDDED_ETCD_URL
from lab.cluster import CalicnmHost
from lab.images import DEFAULT_IMAGE
from lab.netns import Netns
from lab.paths import REPO
from lab.procs import run_bounded, run_command


def assert_nothing_left(host: CalicnmHost) -> None:
    """No veth, no /32 route, no allocation, no endpoint or network record."""
    assert host.links("cali", "tmp") == []
    assert [r for r in host.routes() if " dev cali" in r] == []
    stored = host.etcd_keys()
    assert [k for k in stored if "/endpoints/" in k] == []
    assert [k for k in stored if "/networks/" in k] == []
    for key, value in stored.items():
        if "/ipam/v4/blocks/" in key:
            assert json.loads(value)["allocations"] == {}, key


def http_ok(host: CalicnmHost, network: str, ip: str) -> bool:
    return host.fetch(network, f"http://{ip}/index.html").stdout.strip() == "hello"


def start_web(host: CalicnmHost, name: str, network: str, *extra: str) -> str:
    """A busybox httpd container ``name`` on ``network`` serving "hello"; its address."""
    host.docker(
        "run",
        "-d",
        "--net",
        network,
        "--name",
        name,
        *extra,
        DEFAULT_IMAGE,
        "sh",
        "-c",
        "echo hello > /www/index.html && exec httpd -f -v -p 80 -h /www",
    )
    return host.ip_of(name, network)


def is_number(value: Any) -> bool:
    """A finite int or float (not a bool): what a benchmark's report holds for a figure."""
    return isinstance(value, int | float) and not isinstance(value, bool) and math.isfinite(value)


def run_quick_bench_ok(module: str, out: str, timeout: float = 600) -> str:
    """:func:`run_quick_bench`, asserting it ended in time and with status 0; its output."""
    returncode, output = run_quick_bench(module, out, timeout)
    assert returncode is not None, f"timed out after {timeout} s:\n{output[-4000:]}"
    assert returncode == 0, output[-4000:]
    return output


def run_quick_bench(module: str, out: str, timeout: float = 600) -> tuple[int | None, str]:
    """Run ``python -m MODULE --quick --out OUT`` from the repository root; (exit status,
    output), or (None, output) if it timed out.  On a timeout it gets SIGTERM, which
    unwinds its teardown, and only then SIGKILL, so nothing it built outlives the test."""
    argv = [sys.executable, "-m", module, "--quick", "--out", out]
    return run_bounded(argv, timeout, cwd=REPO)


# ---- iptables and TCP probes on an emulated host (tests/e2e/test_docker_coexistence.py) ----


def chain_rules(host: CalicnmHost, table: str = "filter") -> dict[str, list[str]]:
    """Every chain of ``table`` in ``host``'s netns with its rules, as ``iptables-save``
    prints them (``-A CHAIN ...``); one process, so all chains are one consistent read."""
    saved = host.netns.run(["iptables-save", "-t", table], timeout=10).stdout
    chains: dict[str, list[str]] = {}
    for line in saved.splitlines():
        if line.startswith(":"):
            chains.setdefault(line[1:].split()[0], [])
        elif line.startswith("-A "):
            chains.setdefault(line.split()[1], []).append(line)
    return chains


def first_rule(host: CalicnmHost, chain: str, table: str = "filter") -> str | None:
    """``iptables -S CHAIN 1``: rule 1 of ``chain`` ("" if empty, None if no such chain)."""
    res = host.netns.run(
        ["iptables", "-w", "5", "-t", table, "-S", chain, "1"], check=False, timeout=10
    )
    return res.stdout.strip() if res.returncode == 0 else None


@dataclass(frozen=True)
class RuleSample:
    t: float
    """``time.monotonic()`` when the read started."""
    chains: dict[str, dict[str, list[str]]]
    """table -> chain -> rules."""

    def first(self, chain: str, table: str = "filter") -> str | None:
        rules = self.chains.get(table, {}).get(chain)
        if rules is None:
            return None
        return rules[0] if rules else ""


@dataclass
class RuleSampler:
    """Reads the given tables of ``host`` every ``period`` seconds in a thread, from
    ``start()`` until ``stop()`` or ``limit`` seconds (whichever is first)."""

    host: CalicnmHost
    tables: tuple[str, ...] = ("filter",)
    period: float = 0.1
    limit: float = 120.0
    samples: list[RuleSample] = field(default_factory=list)
    errors: list[str] = field(default_factory=list)
    _stop: threading.Event = field(default_factory=threading.Event)
    _thread: threading.Thread | None = None

    def _run(self) -> None:
        end = time.monotonic() + self.limit
        while not self._stop.is_set() and time.monotonic() < end:
            t = time.monotonic()
            try:
                chains = {table: chain_rules(self.host, table) for table in self.tables}
            except Exception as exc:  # reported by stop(); never kills the sampler quietly
                self.errors.append(f"{type(exc).__name__}: {exc}")
            else:
                self.samples.append(RuleSample(t, chains))
            self._stop.wait(max(0.0, t + self.period - time.monotonic()))

    def start(self) -> RuleSampler:
        self._thread = threading.Thread(target=self._run, name="rule-sampler", daemon=True)
        self._thread.start()
        return self

    def stop(self) -> list[RuleSample]:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=30)
            assert not self._thread.is_alive(), "the rule sampler did not stop"
        assert not self.errors, f"reading iptables failed: {self.errors[:3]}"
        return self.samples

    def since(self, t: float) -> list[RuleSample]:
        return [s for s in list(self.samples) if s.t >= t]

    def wait_for(
        self, check: Callable[[RuleSample], bool], after: float, timeout: float
    ) -> RuleSample | None:
        """The first sample taken at or after ``after`` for which ``check(sample)`` holds,
        waiting for it at most ``timeout`` seconds; None if there is none by then."""
        deadline = time.monotonic() + timeout
        seen = 0
        while True:
            fresh = self.since(after)
            for sample in fresh[seen:]:
                if check(sample):
                    return sample
            seen = len(fresh)
            if time.monotonic() >= deadline:
                return None
            time.sleep(self.period / 2)

    def __enter__(self) -> RuleSampler:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=30)


def out_of_place(
    samples: Iterable[RuleSample], chain: str, rule: str, table: str = "filter"
) -> list[tuple[float, float | None]]:
    """Spans in which rule 1 of ``chain`` was not ``rule``: (first sample that saw it
    gone, first later sample that saw it back, or None if it never came back)."""
    spans: list[tuple[float, float | None]] = []
    start: float | None = None
    for sample in samples:
        here = sample.first(chain, table) == rule
        if not here and start is None:
            start = sample.t
        elif here and start is not None:
            spans.append((start, sample.t))
            start = None
    if start is not None:
        spans.append((start, None))
    return spans


# Runs inside a container's network namespace (host mount namespace, this Python): ``count``
# TCP connects to ip:port, one every ``period`` seconds on a fixed schedule, each with a
# timeout just under ``period``; prints "<time.monotonic()> <1 if connected else 0>" per try.
# CLOCK_MONOTONIC is system-wide, so the times compare with the test's own.
_TCP_PROBE = r"""
import socket, sys, time
ip, port, count, period = sys.argv[1], int(sys.argv[2]), int(sys.argv[3]), float(sys.argv[4])
start = time.monotonic()
for i in range(count):
    delay = start + i * period - time.monotonic()
    if delay > 0:
        time.sleep(delay)
    t = time.monotonic()
    s = socket.socket()
    s.settimeout(period * 0.9)
    try:
        s.connect((ip, port))
        ok = 1
    except OSError:
        ok = 0
    finally:
        s.close()
    print(f"{t:.4f} {ok}", flush=True)
"""


def container_pid(host: CalicnmHost, container: str) -> int:
    pid = int(host.docker("inspect", "-f", "{{.State.Pid}}", container))
    assert pid > 0, f"{container} is not running"
    return pid


@contextlib.contextmanager
def tcp_probe(
    host: CalicnmHost, container: str, ip: str, port: int, count: int = 50, period: float = 0.1
) -> Iterator[TcpProbe]:
    """Raw TCP connects from ``container``'s network namespace to ``ip:port`` (see
    ``_TCP_PROBE``), running in the background; :meth:`TcpProbe.results` waits for them.
    The probe process is killed on the way out if it is still running."""
    pid = container_pid(host, container)
    argv = [
        "nsenter",
        f"--net=/proc/{pid}/ns/net",
        "--",
        sys.executable,
        "-I",
        "-c",
        _TCP_PROBE,
        ip,
        str(port),
        str(count),
        str(period),
    ]
    proc = subprocess.Popen(argv, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    probe = TcpProbe(proc, count * period + 15)
    try:
        yield probe
    finally:
        if proc.poll() is None:
            proc.kill()
        if not probe.collected:
            proc.communicate(timeout=10)


class TcpProbe:
    def __init__(self, proc: subprocess.Popen[str], timeout: float) -> None:
        self._proc = proc
        self._timeout = timeout
        self._results: list[tuple[float, bool]] | None = None
        self.collected = False
        """Its output was read (so the caller must not read it again)."""

    def results(self) -> list[tuple[float, bool]]:
        """(time, connected) per try, once all have run (bounded wait)."""
        if self._results is None:
            out, err = self._proc.communicate(timeout=self._timeout)
            self.collected = True
            assert self._proc.returncode == 0, f"probe failed ({self._proc.returncode}): {err}"
            self._results = [
                (float(t), ok == "1") for t, ok in (line.split() for line in out.splitlines())
            ]
        return self._results


# ---- hand-made packets, etcdctl and status on an emulated host (test_hostile_records.py,
# test_host_protection.py, test_internal_networks.py) ----

RAWPACKETS = Path(__file__).with_name("rawpackets.py")
"""The frame-crafting script, run with this Python inside a network namespace."""


def container_netns(host: CalicnmHost, container: str) -> str:
    """The path of ``container``'s network namespace (``/proc/<pid>/ns/net``)."""
    return f"/proc/{container_pid(host, container)}/ns/net"


def raw_packets(netns_path: str, command: str, args: dict[str, Any], timeout: float = 30) -> Any:
    """Run ``rawpackets.py COMMAND ARGS`` inside the network namespace at
    ``netns_path``; its JSON answer."""
    argv = ["nsenter", f"--net={netns_path}", "--", sys.executable, "-I", str(RAWPACKETS)]
    out = run_command([*argv, command, json.dumps(args)], timeout=timeout).stdout
    return json.loads(out.strip().splitlines()[-1])


@contextlib.contextmanager
def sniffing(
    netns_path: str, ifnames: list[str], src: str, dst: str, seconds: float, marker: str = ""
) -> Iterator[dict[str, int]]:
    """Count IPv4 frames from ``src`` to ``dst`` (holding ``marker``) on ``ifnames`` of
    the namespace at ``netns_path`` for ``seconds`` from entering the block; the dict
    yielded is filled in on leaving it (after the sniffer has run its full time).  The
    sniffer is listening before the block starts, and killed if it overruns."""
    args = {"ifnames": ifnames, "src": src, "dst": dst, "seconds": seconds, "marker": marker}
    argv = ["nsenter", f"--net={netns_path}", "--", sys.executable, "-I", str(RAWPACKETS)]
    proc = subprocess.Popen(
        [*argv, "sniff", json.dumps(args)],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        stdin=subprocess.DEVNULL,
        text=True,
    )
    counts: dict[str, int] = {}
    try:
        assert proc.stdout is not None
        ready = proc.stdout.readline().strip()  # bounded: the sniffer prints it or exits
        assert ready == "ready", f"sniffer did not start: {ready!r} {proc.stderr.read()}"
        yield counts
    finally:
        try:
            out, err = proc.communicate(timeout=seconds + 15)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.communicate(timeout=10)
            raise
    assert proc.returncode == 0, f"sniffer failed: {err}"
    counts.update(json.loads(out.strip().splitlines()[-1]))


def link_mac(netns: Netns, ifname: str) -> str:
    """The MAC address of ``ifname`` in ``netns`` (``/sys`` shows the caller's
    namespace, so this asks ``ip``)."""
    out = netns.run(["ip", "-o", "link", "show", "dev", ifname]).stdout
    return out.split("link/ether ")[1].split()[0]


def endpoint_id(host: CalicnmHost, container: str, network: str) -> str:
    return host.docker(
        "inspect",
        "-f",
        f'{{{{(index .NetworkSettings.Networks "{network}").EndpointID}}}}',
        container,
    )


def etcdctl(
    host: CalicnmHost, *args: str | bytes, input: str | None = None, check: bool = True
) -> subprocess.CompletedProcess[bytes]:
    """``etcdctl ARGS`` against the node's etcd, run in the host's namespace (the
    embedded etcd listens on the namespace's loopback).  Arguments may be bytes (a
    value that is not valid UTF-8); output is bytes."""
    argv: list[str | bytes] = [
        *host.netns.wrap(["etcdctl", "--endpoints", host.etcd_endpoints or EMBEDDED_ETCD_URL]),
        *args,
    ]
    return subprocess.run(
        argv,
        input=input.encode() if input is not None else None,
        stdin=None if input is not None else subprocess.DEVNULL,
        capture_output=True,
        env={**os.environ, "ETCDCTL_API": "3"},
        timeout=60,
        check=check,
    )


def fetch_from(host: CalicnmHost, container: str, ip: str, port: int = 80, seconds: int = 3) -> str:
    """HTTP GET ``/index.html`` from inside ``container``: the body, or "" when the
    connection failed (at most ``seconds``)."""
    out = host.docker_run(
        "exec",
        container,
        "sh",
        "-c",
        f"rm -f /tmp/f; busybox timeout {seconds} wget -q -O /tmp/f "
        f"http://{ip}:{port}/index.html && cat /tmp/f",
    )
    return out.stdout.strip() if out.returncode == 0 else ""


def fast_path_counts(host: CalicnmHost) -> tuple[int, int] | None:
    """(packets redirected, packets passed to the stack) by ``host``'s fast path, or
    None when it has no program pinned."""
    pins = sorted(host.bpf_dir.glob("*/calicnm_stats")) if host.bpf_dir.exists() else []
    if not pins:
        return None
    out = host.netns.run(["bpftool", "-j", "map", "dump", "pinned", str(pins[0])]).stdout
    totals = [0, 0]
    for entry in json.loads(out):
        index = int(entry["formatted"]["key"])
        totals[index] = sum(int(v["value"]) for v in entry["formatted"]["values"])
    return totals[0], totals[1]
