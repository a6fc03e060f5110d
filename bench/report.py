"""Report helpers shared by the benchmarks in ``bench/`` (standard library only).

Stable API (other benchmarks import it; extend, do not change):

- :func:`system_info` -> ``dict``: what the machine was (kernel, CPU, cores, memory, OS),
  recorded so a figure can be read against the machine that produced it.
- :func:`median_spread` -> ``(median, low, high)`` of repeated measurements, and
  :func:`median` alone.
- :func:`write_markdown` writes ``(heading, body)`` sections to a Markdown file.

Formatting helpers used with them: :func:`format_spread`, :func:`ratio`,
:func:`format_ratio`, :func:`markdown_table`, :func:`system_info_markdown`,
:func:`utc_stamp` and :func:`write_json`.
"""

from __future__ import annotations

import json
import os
import platform
import statistics
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

EN_DASH = "\u2013"
"""Separates the low and high end of a spread, and stands for a missing figure."""
TIMES = "\u00d7"
"""Suffix of a ratio ("0.97x" with the multiplication sign)."""

__all__ = [
    "EN_DASH",
    "TIMES",
    "format_ratio",
    "format_spread",
    "markdown_table",
    "median",
    "median_spread",
    "ratio",
    "system_info",
    "system_info_markdown",
    "utc_stamp",
    "write_json",
    "write_markdown",
]


def _read(path: str) -> str:
    try:
        return Path(path).read_text()
    except OSError:
        return ""


def _cpu_model() -> str:
    for line in _read("/proc/cpuinfo").splitlines():
        key, _, value = line.partition(":")
        if key.strip() == "model name":
            return value.strip()
    return platform.processor() or "unknown"


def _mem_total_mib() -> int | None:
    for line in _read("/proc/meminfo").splitlines():
        if line.startswith("MemTotal:"):
            return int(line.split()[1]) // 1024
    return None


def _os_name() -> str:
    for line in _read("/etc/os-release").splitlines():
        if line.startswith("PRETTY_NAME="):
            return line.split("=", 1)[1].strip().strip('"')
    return platform.system()


def system_info() -> dict[str, Any]:
    """The machine a benchmark ran on: kernel, CPU model, cores, memory, OS, Python."""
    return {
        "kernel": platform.release(),
        "cpu_model": _cpu_model(),
        "cores": os.cpu_count(),
        "memory_mib": _mem_total_mib(),
        "os": _os_name(),
        "machine": platform.machine(),
        "python": platform.python_version(),
    }


def system_info_markdown(info: dict[str, Any]) -> str:
    """``info`` (from :func:`system_info`, possibly extended) as a Markdown bullet list."""
    return "\n".join(f"- **{key}**: {value}" for key, value in info.items())


def median_spread(values: Sequence[float]) -> tuple[float, float, float]:
    """``(median, min, max)`` of ``values``; raises ``ValueError`` if there are none."""
    if not values:
        raise ValueError("median_spread of no values")
    return statistics.median(values), min(values), max(values)


def median(values: Sequence[float]) -> float:
    """The median of ``values``; raises ``ValueError`` if there are none."""
    return median_spread(values)[0]


def format_spread(
    values: Sequence[float], fmt: Callable[[float], str] = lambda v: f"{v:.3g}"
) -> str:
    """``"median [min-max]"`` (en dash) with ``fmt`` per number; a dash if no values.

    A single value is shown alone: it has no spread.
    """
    if not values:
        return EN_DASH
    median, low, high = median_spread(values)
    if len(values) == 1:
        return fmt(median)
    return f"{fmt(median)} [{fmt(low)}{EN_DASH}{fmt(high)}]"


def ratio(value: float | None, baseline: float | None) -> float | None:
    """``value / baseline``, or ``None`` if either is missing or the baseline is zero."""
    if value is None or baseline is None or baseline == 0:
        return None
    return value / baseline


def format_ratio(value: float | None, digits: int = 2) -> str:
    """A ratio as ``"0.97x"`` (multiplication sign); a dash when there is none."""
    return EN_DASH if value is None else f"{value:.{digits}f}{TIMES}"


def markdown_table(
    header: Sequence[str], rows: Sequence[Sequence[str]], align: str | None = None
) -> str:
    """A GitHub-flavoured Markdown table.

    ``align`` has one letter per column, ``l`` or ``r``; by default the first column is
    left-aligned and the others (numbers) right-aligned.
    """
    letters = align or "l" + "r" * (len(header) - 1)
    rule = [":--" if letter == "l" else "--:" for letter in letters]
    lines = ["| " + " | ".join(header) + " |", "|" + "|".join(rule) + "|"]
    lines += ["| " + " | ".join(row) + " |" for row in rows]
    return "\n".join(lines)


def write_markdown(
    path: str | os.PathLike[str],
    sections: Sequence[tuple[str, str]],
    *,
    title: str | None = None,
) -> Path:
    """Write ``sections`` (``(heading, body)`` pairs, as ``## heading``) to ``path``.

    ``title``, if given, becomes the ``#`` heading.  Parent directories are created.
    Returns the path written.
    """
    out = Path(path)
    out.parent.mkdir(parents=True, exist_ok=True)
    parts = [f"# {title}\n"] if title else []
    parts += [f"## {heading}\n\n{body.strip()}\n" for heading, body in sections]
    out.write_text("\n".join(parts))
    return out


def write_json(path: str | os.PathLike[str], data: Any) -> Path:
    """Write ``data`` as indented JSON to ``path`` (parents created); returns the path."""
    out = Path(path)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(data, indent=2, sort_keys=False) + "\n")
    return out


def utc_stamp() -> str:
    """The current UTC time as ``20240131T235959Z``, for result directory names."""
    return time.strftime("%Y%m%dT%H%M%SZ", time.gmtime())
