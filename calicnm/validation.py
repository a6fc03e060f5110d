"""The checks every name and id passes before calicnm stores or uses it.

One copy of each rule: the plugin, the CLI and the records layer all call
these, so a name refused at one door is refused at every door.  Patterns
end in ``\\Z``, never ``$``: ``$`` also matches before a trailing newline,
which would let ``"web\\n"`` through into a key, a chain name or a file
path.  Pure; raises ``InvalidRequest`` naming what was wrong.
"""

from __future__ import annotations

import re
from typing import TypeGuard

from calicnm.errors import InvalidRequest

_NAME_RE = re.compile(r"\A[A-Za-z0-9][A-Za-z0-9_.-]{0,63}\Z")
_ID_RE = re.compile(r"\A[0-9a-z]{12,64}\Z")


def is_name(value: object) -> TypeGuard[str]:
    """Profile, tag and network names: 1-64 letters, digits, ``_.-``."""
    return isinstance(value, str) and _NAME_RE.match(value) is not None


def check_name(value: object, what: str) -> str:
    if not is_name(value):
        raise InvalidRequest(
            f"{what} {value!r} must be 1-64 letters, digits, '_', '.' or '-', "
            "starting with a letter or digit"
        )
    return value


def check_id(value: object, what: str) -> str:
    """Docker ids are 64 hex chars (25 base36 chars for swarm networks)."""
    if not isinstance(value, str) or not _ID_RE.match(value):
        raise InvalidRequest(f"{what} must be a Docker id (12-64 lowercase hex/base36 chars)")
    return value
