"""The node under a service manager (systemd's ``Type=notify``): ``READY=1`` comes
only once the plugin answers on its socket and the first agent pass has run, and
``STOPPING=1`` when it stops.  A datagram socket of the test's own stands in for
systemd's notification socket."""

from __future__ import annotations

import json
import socket
from pathlib import Path

from lab.cluster import single_host


def test_ready_only_once_the_plugin_answers_and_stopping_on_sigterm(tmp_path: Path) -> None:
    path = tmp_path / "notify.sock"
    listener = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    listener.bind(str(path))
    listener.settimeout(90)
    try:
        with single_host(tmp_path / "host", extra_env={"NOTIFY_SOCKET": str(path)}) as host:
            # single_host waited for the socket; the READY datagram is queued by now.
            ready = listener.recv(4096).decode()
            assert ready.startswith("READY=1\n"), ready
            assert f"STATUS=serving Docker on {host.socket}" in ready
            assert host.answering()
            status = json.loads((host.state_dir / "agent-status.json").read_text())
            assert status["passes"] >= 1 or status["last_error"], status
            listener.settimeout(0.5)
            try:
                extra = listener.recv(4096)
            except TimeoutError:
                extra = b""
            assert extra == b"", "READY is sent once"
            listener.settimeout(60)
            host.stop_node()
            assert listener.recv(4096) == b"STOPPING=1"
            log = (host.workdir / "node.log").read_text()
            ready_at = log.index("node ready socket=")
            assert log.index("plugin listening socket=") < ready_at
            assert log.index("kernel converged with etcd") < ready_at
    finally:
        listener.close()
