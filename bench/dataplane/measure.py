"""Running the cases: set each up, take the 64 KiB repetitions round-robin, then one sweep
each; a failure is recorded on its case (or on the :class:`Run`) and the others go on."""

from __future__ import annotations

import contextlib
from collections.abc import Callable
from contextlib import AbstractContextManager
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from bench.dataplane.cases import Spec
from bench.dataplane.places import Pair, Place
from bench.dataplane.qperf import Sample, run_qperf, wait_reachable
from bench.dataplane.settings import FIXED_BYTES, FIXED_SIZE, Settings, cpus, log
from bench.dataplane.testbed import Testbed
from bench.dataplane.units import MICRO_S, gbit, usec

if TYPE_CHECKING:
    from bench.dataplane.cpu_profile import Profile

__all__ = ["Case", "Run", "measure", "set_up", "short_error", "wakeup_calibration"]


@dataclass
class Case:
    """A case's setup and everything measured on it."""

    spec: Spec
    pair: Pair | None = None
    bw: list[float] = field(default_factory=list)
    """tcp_bw at 64 KiB per repetition, bytes/s."""
    lat: list[float] = field(default_factory=list)
    """tcp_lat at 64 KiB per repetition, seconds (one way)."""
    lat1: list[float] = field(default_factory=list)
    """tcp_lat at 1 B per repetition, seconds (one way)."""
    hold: Callable[[], AbstractContextManager[None]] | None = None
    """What ``spec.around`` holds while the case is measured, bound to the testbed."""
    fixed_raw: list[list[Sample]] = field(default_factory=list)
    sweep: list[Sample] = field(default_factory=list)
    errors: list[str] = field(default_factory=list)

    @property
    def key(self) -> str:
        return self.spec.key

    def sweep_values(self, test: str) -> dict[int, float]:
        return {s.msg_size: s.value for s in self.sweep if s.test == test}


def short_error(exc: BaseException) -> str:
    """An error as ``Type: message``, cut to 1,500 characters (for the report)."""
    return f"{type(exc).__name__}: {exc}"[:1500]


def set_up(bed: Testbed, spec: Spec, settings: Settings) -> Case:
    """Build a case, start its qperf server and wait until its path works.

    A failure is recorded on the case (the other cases still run)."""
    case = Case(spec)
    log(f"setting up {spec.key}")
    try:
        pair = spec.build(bed)
        bed.serve(spec.key, pair.server, settings.server_prefix)
        wait_reachable(pair)
        case.pair = pair
        around = spec.around
        if around is not None:
            case.hold = lambda: around(bed)
    except Exception as exc:
        case.errors.append(f"setup: {short_error(exc)}")
        log(f"  {spec.key}: setup failed: {short_error(exc)[:300]}")
    return case


def held(case: Case) -> AbstractContextManager[None]:
    """The case's hold (see ``Spec.around``), or nothing."""
    return case.hold() if case.hold is not None else contextlib.nullcontext()


def measure_fixed(case: Case, settings: Settings) -> None:
    """One repetition: tcp_bw and tcp_lat at 64 KiB, then tcp_lat at 1 B, ``fixed_seconds``
    each."""
    if case.pair is None:
        return
    opts = ["-m", FIXED_SIZE, "-t", str(settings.fixed_seconds)]
    small = ["-m", "1", "-t", str(settings.fixed_seconds)]
    try:
        timeout = 4 * settings.fixed_seconds + 30
        with held(case):
            samples = run_qperf(case.pair, opts, timeout, settings.client_prefix)
            samples += run_qperf(case.pair, small, timeout, settings.client_prefix, ("tcp_lat",))
        bw = next(s.value for s in samples if s.test == "tcp_bw")
        lat = next(s.value for s in samples if s.test == "tcp_lat" and s.msg_size == FIXED_BYTES)
        lat1 = next(s.value for s in samples if s.test == "tcp_lat" and s.msg_size == 1)
    except (Exception, StopIteration) as exc:
        case.errors.append(f"repetition {len(case.fixed_raw) + 1}: {short_error(exc)}")
        log(f"  {case.key}: {short_error(exc)[:300]}")
        return
    case.fixed_raw.append(samples)
    case.bw.append(bw)
    case.lat.append(lat)
    case.lat1.append(lat1)
    log(f"  {case.key:24} {gbit(bw):>7} Gbit/s  {usec(lat):>6} us  1 B {usec(lat1):>5} us")


def measure_sweep(case: Case, settings: Settings) -> None:
    """One message-size sweep: tcp_bw at every size, then tcp_lat at every size."""
    if case.pair is None or not case.spec.sweep:
        return
    n = len(settings.sweep_sizes)
    opts = ["-oo", settings.sweep_spec, "-t", str(settings.sweep_seconds)]
    try:
        timeout = 2 * n * (settings.sweep_seconds + 2) + 60
        with held(case):
            case.sweep = run_qperf(case.pair, opts, timeout, settings.client_prefix)
    except Exception as exc:
        case.errors.append(f"sweep: {short_error(exc)}")
        log(f"  {case.key}: sweep failed: {short_error(exc)[:300]}")
        return
    missing = set(settings.sweep_sizes) - set(case.sweep_values("tcp_bw"))
    missing |= set(settings.sweep_sizes) - set(case.sweep_values("tcp_lat"))
    if missing:
        case.errors.append(f"sweep: no result for message sizes {sorted(missing)}")
    log(f"  {case.key}: sweep done ({len(case.sweep)} results)")


def measure(cases: list[Case], settings: Settings) -> None:
    """All repetitions round-robin over the cases, then one sweep per case that has one."""
    for rep in range(settings.reps):
        log(f"64 KiB, repetition {rep + 1}/{settings.reps}")
        for case in cases:
            measure_fixed(case, settings)
    log(f"message-size sweep {settings.sweep_spec}")
    for case in cases:
        measure_sweep(case, settings)


def wakeup_calibration(bed: Testbed) -> dict[str, str]:
    """Loopback 1 B one-way latency with qperf's ends on one CPU and on two CPUs.

    The difference is what a wake-up across CPUs costs on this machine (in a VM: an IPI
    and a vCPU wake-up through the hypervisor), which explains the pinning choice."""
    if len(cpus()) < 2:
        return {}
    ns = Place.of(bed.netns(), "calibration")
    last, first = str(max(cpus())), str(min(cpus()))
    bed.serve("calibration", ns, ["taskset", "-c", last])
    pair = Pair(ns, ns, "127.0.0.1", ())
    out: dict[str, str] = {}
    try:
        wait_reachable(pair)
        for label, cpu in (("same CPU", last), ("across CPUs", first)):
            samples = run_qperf(
                pair, ["-m", "1", "-t", "1"], 30, ["taskset", "-c", cpu], ("tcp_lat",)
            )
            out[f"loopback 1 B one-way latency, {label}"] = f"{usec(samples[0].value)} {MICRO_S}"
    except Exception as exc:
        out["wake-up calibration"] = f"failed: {short_error(exc)}"
    return out


@dataclass
class Run:
    """One whole run: what was measured, on what, and how long it took."""

    settings: Settings
    cases: list[Case]
    system: dict[str, Any]
    interfaces: list[dict[str, Any]] = field(default_factory=list)
    sysctls: dict[str, dict[str, str]] = field(default_factory=dict)
    timing: dict[str, float] = field(default_factory=dict)
    measured_at: float = 0.0
    """``time.monotonic()`` when measuring ended and teardown began."""
    errors: list[str] = field(default_factory=list)
    profiles: list[Profile] = field(default_factory=list)
    """perf profiles of some cases (see :mod:`.cpu_profile`)."""
    profile_note: str = ""
    """Why there are no profiles, if there are none."""

    def by_key(self) -> dict[str, Case]:
        return {case.key: case for case in self.cases}
