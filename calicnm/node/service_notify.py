"""Telling the service manager how the node is doing (systemd's ``Type=notify``).

systemd gives a notify-type service the address of a datagram socket in
``NOTIFY_SOCKET`` (a path, or ``@name`` for the abstract namespace).  The
node sends ``READY=1`` once its plugin answers on the Docker socket and its
first agent pass has run, so ``Before=docker.service`` really means Docker
starts with the plugin there; and ``STOPPING=1`` when it begins to stop.

Without ``NOTIFY_SOCKET`` (a node started by hand, or by ``make run``)
nothing is sent.  A notification that cannot be sent is logged and never
stops the node: the service manager then reports the start as timed out,
which is visible.
"""

from __future__ import annotations

import logging
import os
import socket
from collections.abc import Mapping

_log = logging.getLogger(__name__)

NOTIFY_ENV = "NOTIFY_SOCKET"


def notify(state: str, environ: Mapping[str, str] | None = None) -> bool:
    """Send ``state`` (``"READY=1\\nSTATUS=..."``) to the service manager;
    True if it was sent, False when there is none or it failed."""
    env = os.environ if environ is None else environ
    address = env.get(NOTIFY_ENV, "")
    if not address:
        return False
    if address.startswith("@"):
        address = "\0" + address[1:]
    elif not address.startswith("/"):
        _log.warning("ignoring %s=%r: not a socket path", NOTIFY_ENV, address)
        return False
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    try:
        sock.settimeout(2.0)
        sock.sendto(state.encode(), address)
    except OSError as exc:
        _log.warning("cannot notify the service manager at %s: %s", env[NOTIFY_ENV], exc)
        return False
    finally:
        sock.close()
    return True
