"""Running qperf between a :class:`~bench.dataplane.places.Pair`'s ends and parsing its
``-v`` output into :class:`Sample` s."""

from __future__ import annotations

import re
import time
from collections.abc import Sequence
from dataclasses import dataclass

from bench.dataplane.places import Pair

__all__ = ["QPERF_PORT", "READY_TIMEOUT", "Sample", "parse_qperf", "run_qperf", "wait_reachable"]

QPERF_PORT = 19765
"""qperf's control port (its default); one server per namespace, so no clashes."""
READY_TIMEOUT = 90.0
"""Bound on waiting for a path to carry qperf's handshake (BGP convergence included)."""


@dataclass(frozen=True)
class Sample:
    """One qperf result: a test at one message size."""

    test: str
    """tcp_bw or tcp_lat."""
    msg_size: int
    value: float
    """Bytes per second for tcp_bw; seconds, one way, for tcp_lat."""
    fields: dict[str, str]
    """Every field qperf printed for it (CPU use, message rate, ...), as printed."""


_RATE = {"bytes/sec": 1.0, "KB/sec": 1e3, "MB/sec": 1e6, "GB/sec": 1e9, "TB/sec": 1e12}
_TIME = {"ns": 1e-9, "us": 1e-6, "ms": 1e-3, "sec": 1.0}
_SIZE = {"bytes": 1, "KiB": 1024, "MiB": 1024**2}


def _quantity(text: str, units: dict[str, float]) -> float:
    """``"2.41 GB/sec"`` -> 2.41e9 with ``units`` mapping the unit to its multiplier."""
    number, _, unit = text.partition(" ")
    return float(number.replace(",", "")) * units[unit.strip()]


def _msg_size(text: str) -> int:
    """``"64 KiB (65,536)"`` or ``"1 bytes"`` -> bytes."""
    exact = re.search(r"\(([\d,]+)\)", text)
    if exact:
        return int(exact.group(1).replace(",", ""))
    number, _, unit = text.partition(" ")
    return int(float(number) * _SIZE[unit.strip()])


def parse_qperf(output: str) -> list[Sample]:
    """Samples from ``qperf -v`` output: blocks of ``test:`` then ``key = value`` lines."""
    blocks: list[tuple[str, dict[str, str]]] = []
    for line in output.splitlines():
        header = re.fullmatch(r"(\w+):\s*", line)
        pair = re.fullmatch(r"\s+(\w+)\s+=\s+(.*?)\s*", line)
        if header:
            blocks.append((header.group(1), {}))
        elif pair and blocks:
            blocks[-1][1][pair.group(1)] = pair.group(2)
    samples = []
    for test, fields in blocks:
        if test == "tcp_bw" and "bw" in fields:
            value = _quantity(fields["bw"], _RATE)
        elif test == "tcp_lat" and "latency" in fields:
            value = _quantity(fields["latency"], _TIME)
        else:
            continue
        samples.append(Sample(test, _msg_size(fields.get("msg_size", "0 bytes")), value, fields))
    return samples


def run_qperf(
    pair: Pair,
    options: Sequence[str],
    timeout: float,
    prefix: Sequence[str] = (),
    tests: Sequence[str] = ("tcp_bw", "tcp_lat"),
) -> list[Sample]:
    """``qperf -v OPTIONS ADDRESS TESTS`` from the client end (under ``prefix``, e.g.
    taskset); raises ``RuntimeError`` if qperf fails or prints no result."""
    cmd = [*prefix, "qperf", "--listen_port", str(QPERF_PORT), "-v", *options, pair.address]
    proc = pair.client.run([*cmd, *tests], timeout=timeout, check=False)
    samples = parse_qperf(proc.stdout)
    if proc.returncode != 0 or not samples:
        raise RuntimeError(
            f"qperf exited {proc.returncode}: {(proc.stderr or proc.stdout).strip()[-400:]}"
        )
    return samples


def wait_reachable(pair: Pair) -> None:
    """Poll qperf's ``conf`` exchange until the path carries it (bounded)."""
    deadline = time.monotonic() + READY_TIMEOUT
    cmd = ["qperf", "--listen_port", str(QPERF_PORT), "-to", "3", pair.address, "conf"]
    last = ""
    while time.monotonic() < deadline:
        proc = pair.client.run(cmd, timeout=10, check=False)
        if proc.returncode == 0 and "rem_" in proc.stdout:
            return
        last = (proc.stderr or proc.stdout).strip()[-200:]
        time.sleep(1)
    raise RuntimeError(f"{pair.address} not reachable by qperf in {READY_TIMEOUT:.0f}s: {last}")
