"""How long and how often each case is measured (:class:`Settings`), and progress logging."""

from __future__ import annotations

import argparse
import os
import sys
import time
from dataclasses import dataclass

__all__ = ["FIXED_BYTES", "FIXED_SIZE", "Settings", "cpus", "log"]

FIXED_SIZE = "64K"
FIXED_BYTES = 64 * 1024
_started = time.monotonic()


def log(message: str) -> None:
    """Progress on stderr, stamped with the time since start."""
    print(f"[{time.monotonic() - _started:6.1f}s] {message}", file=sys.stderr, flush=True)


@dataclass(frozen=True)
class Settings:
    """How long and how often each case is measured."""

    reps: int
    fixed_seconds: int
    """qperf -t at 64 KiB (qperf only takes whole seconds)."""
    sweep_seconds: int
    sweep_factor: int
    """Message sizes of the sweep: 1, factor, factor**2, ... up to 64 KiB."""
    quick: bool
    pin: str = "same"
    """CPU placement of qperf's ends: same (both on the last CPU), split or off."""

    @property
    def server_prefix(self) -> list[str]:
        """``taskset`` prefix for the qperf server: the last CPU (empty when not pinned)."""
        return [] if self.pin == "off" else ["taskset", "-c", str(max(cpus()))]

    @property
    def client_prefix(self) -> list[str]:
        """``taskset`` prefix for the qperf client: the server's CPU, or the first if split."""
        if self.pin == "off":
            return []
        return ["taskset", "-c", str(min(cpus()) if self.pin == "split" else max(cpus()))]

    @property
    def sweep_sizes(self) -> list[int]:
        sizes, size = [], 1
        while size <= FIXED_BYTES:
            sizes.append(size)
            size *= self.sweep_factor
        return sizes

    @property
    def sweep_spec(self) -> str:
        return f"msg_size:1:{FIXED_SIZE}:*{self.sweep_factor}"

    @classmethod
    def from_args(cls, args: argparse.Namespace) -> Settings:
        if args.quick:
            base = cls(reps=1, fixed_seconds=1, sweep_seconds=1, sweep_factor=256, quick=True)
        else:
            base = cls(reps=5, fixed_seconds=2, sweep_seconds=1, sweep_factor=2, quick=False)
        reps = args.reps if args.reps is not None else base.reps
        return cls(
            reps, base.fixed_seconds, base.sweep_seconds, base.sweep_factor, base.quick, args.pin
        )


def cpus() -> set[int]:
    """The CPUs this process may run on."""
    return os.sched_getaffinity(0)
