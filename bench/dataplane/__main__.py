"""``python -m bench.dataplane``: build every case, measure, write the report, tear down."""

from __future__ import annotations

import argparse
import contextlib
import os
import shutil
import signal
import sys
import tempfile
import time
from collections.abc import Sequence
from pathlib import Path
from types import FrameType

import bench.dataplane
from bench import report
from bench.dataplane.cases import SPECS
from bench.dataplane.cpu_profile import profile_cases
from bench.dataplane.inventory import collect_interfaces, collect_sysctls, versions
from bench.dataplane.measure import Run, measure, set_up, short_error, wakeup_calibration
from bench.dataplane.settings import Settings, cpus, log
from bench.dataplane.testbed import Testbed
from bench.dataplane.writeup import write_report
from lab.paths import CALICNM, REPO


def preflight() -> str | None:
    """Why the benchmark cannot run here, or None."""
    if os.geteuid() != 0:
        return "needs root (network namespaces, dockerd)"
    for tool in ("qperf", "dockerd", "etcd", "nsenter", "taskset", "ip", "iptables", "bridge"):
        if shutil.which(tool) is None:
            return f"{tool} is not installed; run 'sh scripts/install-deps.sh'"
    if not Path(CALICNM).exists():
        return "the venv has no calicnm; run 'make deps'"
    return None


def execute(settings: Settings, workdir: Path, stack: contextlib.ExitStack) -> Run:
    """Build every case, measure them, and record what they ran on."""
    bed = Testbed(stack, workdir)
    run = Run(settings, [], report.system_info())
    t0 = time.monotonic()
    run.cases = [set_up(bed, spec, settings) for spec in SPECS]
    run.system |= wakeup_calibration(bed)
    run.interfaces = collect_interfaces(run.cases)
    run.sysctls = collect_sysctls(bed)
    run.system |= versions(bed)
    t1 = time.monotonic()
    measure(run.cases, settings)
    run.profiles, run.profile_note = profile_cases(run.cases, settings)
    run.timing = {"setup": t1 - t0, "measurement": time.monotonic() - t1}
    run.measured_at = time.monotonic()
    return run


def _sigterm(signum: int, _frame: FrameType | None) -> None:
    """SIGTERM unwinds like Ctrl-C, so everything built is torn down."""
    raise SystemExit(128 + signum)


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    doc = bench.dataplane.__doc__ or ""
    parser = argparse.ArgumentParser(
        prog="python -m bench.dataplane", description=doc.split("\n\n")[0]
    )
    parser.add_argument("--quick", action="store_true", help="one short iteration per case")
    parser.add_argument("--out", type=Path, help="report directory (bench/results/<UTC time>/)")
    parser.add_argument("--reps", type=int, help="repetitions per case (default 5)")
    parser.add_argument(
        "--pin",
        choices=("same", "split", "off"),
        default="same",
        help="CPU placement of qperf's client and server: both on the last CPU (default; "
        "stable on VMs, where a cross-CPU wake-up is costly), on two CPUs, or unpinned",
    )
    args = parser.parse_args(argv)
    if args.reps is not None and args.reps < 1:
        parser.error("--reps must be at least 1")
    if args.pin == "split" and len(cpus()) < 2:
        parser.error("--pin split needs two CPUs")
    return args


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    settings = Settings.from_args(args)
    out: Path = args.out or REPO / "bench" / "results" / report.utc_stamp()
    problem = preflight()
    if problem:
        print(f"dataplane: {problem}", file=sys.stderr)
        return 2
    signal.signal(signal.SIGTERM, _sigterm)
    started = time.monotonic()
    run: Run | None = None
    try:
        with (
            tempfile.TemporaryDirectory(prefix="cnmt-bench-", ignore_cleanup_errors=True) as tmp,
            contextlib.ExitStack() as stack,
        ):
            run = execute(settings, Path(tmp), stack)
            log("tearing down")
    except Exception as exc:
        if run is None:
            raise
        run.errors.append(f"teardown: {short_error(exc)}")
    run.timing["teardown"] = time.monotonic() - run.measured_at
    run.timing["total"] = time.monotonic() - started
    write_report(run, out)
    log(f"report in {out}")
    failed = [c.key for c in run.cases if not c.bw or (c.spec.sweep and not c.sweep) or c.errors]
    if failed or run.errors:
        log(f"incomplete: {', '.join(failed) or 'teardown'}")
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
