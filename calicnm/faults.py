"""Fault injection for the crash tests: SIGKILL the node at a named point.

Off unless the environment variable ``CALICNM_FAULT`` names the point (a
comma-separated list may name several); production never sets it, and
then ``point`` is one dictionary lookup.  A point reached in the plugin
process kills the node (``CALICNM_NODE_PID``, which the node exports to
the plugin it starts) and then the plugin itself, so the call dies exactly
there, with no reply and no cleanup, as it would if the host lost power.
"""

from __future__ import annotations

import logging
import os
import signal

_log = logging.getLogger(__name__)

POINTS = (
    "after-assign-commit",
    "after-veth",
    "after-record",
    "after-set-handle",
    "after-join-write",
    "after-veth-removal",
    "before-record-delete",
    "after-release-commit",
)
"""The named points of a container's life (the plugin's calls), in the order it
reaches them."""

AGENT_POINTS = ("after-fast-path-withdraw",)
"""The agent's named points: a pass that took pairs out of the same-host fast path,
before it writes the chains."""

FAULT_ENV = "CALICNM_FAULT"
NODE_PID_ENV = "CALICNM_NODE_PID"


def point(name: str) -> None:
    """Die here (SIGKILL, node and self) if ``CALICNM_FAULT`` names ``name``."""
    wanted = os.environ.get(FAULT_ENV)
    if not wanted or name not in wanted.split(","):
        return
    _log.critical("fault injected at %s: killing the node", name)
    node = os.environ.get(NODE_PID_ENV, "")
    if node.isdigit() and int(node) != os.getpid():
        os.kill(int(node), signal.SIGKILL)
    os.kill(os.getpid(), signal.SIGKILL)
