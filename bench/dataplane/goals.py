"""The goals: where calicnm stands, from the medians of this run.  Each goal is a limit on
one case relative to another measured in the same run; a verdict is met, missed or not
measured, with the figures and (where the repetitions' spread straddles the limit) a note
that it is not firm."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

from bench.dataplane.measure import Case
from bench.dataplane.units import MICRO_S, gbit, usec
from bench.report import median

__all__ = ["Verdict", "evaluate_goals"]


@dataclass(frozen=True)
class Verdict:
    goal: str
    status: str
    """met, missed or not measured."""
    detail: str


def _spread_note(low: float, high: float, limit: float, reps: int) -> str:
    """Says so when the goal's limit lies within what the run-to-run spread allows."""
    if reps > 1 and low <= limit <= high:
        return (
            f" The limit lies inside the ratio's range over the repetitions "
            f"({low:.3f}-{high:.3f}), so the verdict is not firm."
        )
    return ""


def _reference_note(reference: Case | None, base: Case, values: str) -> str:
    """How a reference case does against the same base, e.g. the hand-built path."""
    if reference is None:
        return ""
    ref, base_values = getattr(reference, values), getattr(base, values)
    if not ref or not base_values:
        return ""
    r = median(ref) / median(base_values)
    return f" For reference, the {reference.spec.title} is at {r:.3f}x."


def _ratio_detail(
    case: Case,
    base: Case,
    values: str,
    limit: float,
    reference: Case | None,
    show: Callable[[float], str],
    unit: str,
) -> tuple[float, float, float, str]:
    """For a ratio goal on ``values`` ("bw" or "lat"): the medians of ``case`` and ``base``,
    their ratio, and the verdict's figures (with the spread and reference notes)."""
    mine, theirs = getattr(case, values), getattr(base, values)
    got, ref = median(mine), median(theirs)
    r = got / ref
    detail = f"{r:.3f}x: {show(got)} vs {show(ref)} {unit} ({base.spec.title})." + _spread_note(
        min(mine) / max(theirs), max(mine) / min(theirs), limit, len(mine)
    )
    detail += _reference_note(reference, base, values)
    return got, ref, r, detail


def bandwidth_goal(
    goal: str, case: Case, base: Case, limit: float, reference: Case | None = None
) -> Verdict:
    """``case`` has at least ``limit`` times ``base``'s bandwidth at 64 KiB."""
    if not case.bw or not base.bw:
        return Verdict(goal, "not measured", "a case produced no 64 KiB figures")
    got, ref, r, detail = _ratio_detail(case, base, "bw", limit, reference, gbit, "Gbit/s")
    if r >= limit:
        return Verdict(goal, "met", detail)
    need = limit * ref
    return Verdict(
        goal,
        "missed",
        f"missed by {limit - r:.3f} ({(need / got - 1) * 100:.1f}% more bandwidth needed, "
        f"{gbit(need - got)} Gbit/s short of {gbit(need)}); " + detail,
    )


def latency_ratio_goal(
    goal: str,
    case: Case,
    base: Case,
    limit: float,
    reference: Case | None = None,
    values: str = "lat",
    strict: bool = False,
) -> Verdict:
    """``case``'s latency (``values``: "lat" at 64 KiB, "lat1" at 1 B) is at most (or, if
    ``strict``, below) ``limit`` times ``base``'s."""
    if not getattr(case, values) or not getattr(base, values):
        return Verdict(goal, "not measured", "a case produced no latency figures")
    got, ref, r, detail = _ratio_detail(case, base, values, limit, reference, usec, MICRO_S)
    if r < limit or (r == limit and not strict):
        return Verdict(goal, "met", detail)
    return Verdict(
        goal,
        "missed",
        f"missed by {r - limit:.3f}x ({usec(got - limit * ref)} {MICRO_S} over "
        f"{usec(limit * ref)} {MICRO_S}); " + detail,
    )


def latency_offset_goal(goal: str, case: Case, base: Case, limit_us: float) -> Verdict:
    """``case``'s latency at 64 KiB is at most ``base``'s plus ``limit_us``."""
    if not case.lat or not base.lat:
        return Verdict(goal, "not measured", "a case produced no 64 KiB figures")
    got, ref = median(case.lat), median(base.lat)
    extra_us = (got - ref) * 1e6
    detail = f"+{extra_us:.1f} {MICRO_S}: {usec(got)} vs {usec(ref)} {MICRO_S} ({base.spec.title})."
    if len(case.lat) > 1:
        low = (min(case.lat) - max(base.lat)) * 1e6
        high = (max(case.lat) - min(base.lat)) * 1e6
        if low <= limit_us <= high:
            detail += (
                f" The limit lies inside the difference's range over the repetitions "
                f"({low:+.1f} to {high:+.1f} {MICRO_S}), so the verdict is not firm."
            )
    if extra_us <= limit_us:
        return Verdict(goal, "met", detail)
    return Verdict(goal, "missed", f"missed by {extra_us - limit_us:.1f} {MICRO_S}; " + detail)


def sweep_goal(goal: str, case: Case, base: Case) -> Verdict:
    """``case``'s latency is below ``base``'s at every message size of the sweep (one
    sweep per case, so each size is a single 1-second figure)."""
    mine, theirs = case.sweep_values("tcp_lat"), base.sweep_values("tcp_lat")
    sizes = sorted(set(mine) & set(theirs))
    if not sizes:
        return Verdict(goal, "not measured", "a case produced no sweep")
    ratios = {size: mine[size] / theirs[size] for size in sizes}
    worst = max(sizes, key=lambda size: ratios[size])
    over = [size for size in sizes if ratios[size] >= 1.0]
    detail = (
        f"{len(sizes) - len(over)} of {len(sizes)} sizes below; worst {ratios[worst]:.3f}x at "
        f"{worst} B ({usec(mine[worst])} vs {usec(theirs[worst])} {MICRO_S}, "
        f"{base.spec.title})."
    )
    if not over:
        return Verdict(goal, "met", detail)
    return Verdict(goal, "missed", f"not below at {', '.join(f'{s} B' for s in over)}; " + detail)


def evaluate_goals(cases: dict[str, Case]) -> list[Verdict]:
    """calicnm's goals, each against the case it is defined relative to."""
    same, routed, vxlan = cases["calicnm-same"], cases["calicnm-routed"], cases["calicnm-vxlan"]
    veth, hand = cases["veth"], cases["handbuilt"]
    bridge, overlay = cases["docker-bridge"], cases["overlay"]
    ipt = cases["calicnm-same-iptables"]
    return [
        latency_ratio_goal(
            "same-host latency at 1 B <= Docker bridge", same, bridge, 1.0, values="lat1"
        ),
        latency_ratio_goal("same-host latency at 64 KiB <= Docker bridge", same, bridge, 1.0),
        latency_ratio_goal(
            "same-host latency at 64 KiB <= 1.15x a bare veth", same, veth, 1.15, hand
        ),
        sweep_goal("routed latency < the VXLAN overlay, every size 1 B-64 KiB", routed, overlay),
        latency_ratio_goal(
            "routed latency at 1 B < the VXLAN overlay", routed, overlay, 1.0, None, "lat1", True
        ),
        latency_ratio_goal(
            "routed latency at 64 KiB < the VXLAN overlay", routed, overlay, 1.0, strict=True
        ),
        latency_ratio_goal(
            "calicnm VXLAN latency at 1 B <= the VXLAN overlay", vxlan, overlay, 1.0, None, "lat1"
        ),
        latency_ratio_goal(
            "calicnm VXLAN latency at 64 KiB <= the VXLAN overlay", vxlan, overlay, 1.0
        ),
        bandwidth_goal("calicnm VXLAN bandwidth >= 0.95x the VXLAN overlay", vxlan, overlay, 0.95),
        bandwidth_goal("same-host bandwidth >= Docker bridge", same, bridge, 1.0),
        bandwidth_goal("same-host bandwidth >= 0.97x the hand-built path", same, hand, 0.97),
        bandwidth_goal("routed bandwidth >= 0.95x host to host", routed, cases["host"], 0.95),
        # The same-host goals again for a node without the fast path (CALICNM_DATAPATH=
        # iptables), so the report shows where each data path stands.
        latency_ratio_goal(
            "iptables alone: same-host latency at 1 B <= Docker bridge",
            ipt,
            bridge,
            1.0,
            values="lat1",
        ),
        latency_ratio_goal(
            "iptables alone: same-host latency at 64 KiB <= Docker bridge", ipt, bridge, 1.0
        ),
        latency_ratio_goal(
            "iptables alone: same-host latency at 64 KiB <= 1.15x a bare veth", ipt, veth, 1.15
        ),
        bandwidth_goal("iptables alone: same-host bandwidth >= Docker bridge", ipt, bridge, 1.0),
    ]
