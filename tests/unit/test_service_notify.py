"""``service_notify.notify``: datagrams to the service manager's socket."""

from __future__ import annotations

import socket
from pathlib import Path

from calicnm.node.service_notify import notify


def test_no_socket_sends_nothing() -> None:
    assert notify("READY=1", {}) is False
    assert notify("READY=1", {"NOTIFY_SOCKET": "relative/path"}) is False


def test_a_path_and_an_abstract_socket_get_the_state(tmp_path: Path) -> None:
    path = tmp_path / "notify"
    for address, bind in (
        (str(path), str(path)),
        ("@calicnm-test-notify", "\0calicnm-test-notify"),
    ):
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        try:
            sock.bind(bind)
            sock.settimeout(5)
            assert notify("READY=1\nSTATUS=ok", {"NOTIFY_SOCKET": address}) is True
            assert sock.recv(100) == b"READY=1\nSTATUS=ok"
        finally:
            sock.close()


def test_a_manager_that_is_gone_is_reported_not_raised(tmp_path: Path) -> None:
    assert notify("READY=1", {"NOTIFY_SOCKET": str(tmp_path / "gone")}) is False
