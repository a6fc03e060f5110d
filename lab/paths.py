"""Where the repository is, and the ``calicnm`` of its virtualenv (``make deps`` makes it)."""

from __future__ import annotations

from pathlib import Path

__all__ = ["CALICNM", "REPO", "VENV_BIN"]

REPO = Path(__file__).resolve().parents[1]
"""The repository's root: the directory holding ``calicnm/``, ``lab/``, ``tests/``, ``bench/``."""
VENV_BIN = REPO / ".venv" / "bin"
CALICNM = str(VENV_BIN / "calicnm")
"""The ``calicnm`` command the emulated hosts run (the editable install of this checkout)."""
