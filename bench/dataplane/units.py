"""Units for humans: Gbit/s, microseconds, message sizes."""

from __future__ import annotations

__all__ = ["MICRO_S", "gbit", "size_label", "usec"]

MICRO_S = "\u00b5s"


def gbit(bytes_per_s: float) -> str:
    """Bytes/s as Gbit/s, three significant figures."""
    return f"{bytes_per_s * 8 / 1e9:.3g}"


def usec(seconds: float) -> str:
    """Seconds as microseconds, one decimal."""
    return f"{seconds * 1e6:.1f}"


def size_label(n: int) -> str:
    """Message size for humans: 1, 512, 1K, 64K."""
    return f"{n // 1024}K" if n >= 1024 else str(n)
