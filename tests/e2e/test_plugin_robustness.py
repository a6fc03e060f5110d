"""The plugin under bad input, a frozen etcd and node restarts, through the real socket."""

from __future__ import annotations

import http.client
import json
import os
import signal
import socket
import stat
import subprocess
import time

from lab.cluster import CalicnmHost, wait_until
from lab.images import DEFAULT_IMAGE as IMG
from tests.e2e.helpers import assert_nothing_left


def post(path: str, method: str, body: bytes) -> tuple[int, dict]:
    class Conn(http.client.HTTPConnection):
        def connect(self) -> None:
            self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
            self.sock.settimeout(20)
            self.sock.connect(path)

    conn = Conn("plugin.moby.localhost", timeout=20)
    try:
        # Docker sends no Content-Type.
        conn.request(
            "POST",
            f"/{method}",
            body=body,
            headers={"Accept": "application/vnd.docker.plugins.v1.2+json"},
        )
        resp = conn.getresponse()
        return resp.status, json.loads(resp.read() or b"null")
    finally:
        conn.close()


def etcd_pid(host: CalicnmHost) -> int:
    out = subprocess.run(
        ["pgrep", "-f", "--", f"--data-dir {host.state_dir}/etcd"], capture_output=True, text=True
    ).stdout.split()
    assert len(out) == 1, out
    return int(out[0])


def test_socket_is_root_only(host: CalicnmHost) -> None:
    mode = os.stat(host.socket).st_mode
    assert stat.S_ISSOCK(mode)
    assert stat.S_IMODE(mode) == 0o600


def test_bad_requests_get_err_and_the_daemon_stays_up(host: CalicnmHost) -> None:
    sock = str(host.socket)
    cases = [
        ("IpamDriver.RequestPool", b"{oops", 400),
        ("IpamDriver.RequestAddress", b'{"PoolID": 12}', 400),
        ("IpamDriver.RequestAddress", b'{"PoolID": "calicnm:any", "Address": "nonsense"}', 400),
        (
            "NetworkDriver.CreateEndpoint",
            b'{"NetworkID": "'
            + b"a" * 64
            + b'", "EndpointID": "'
            + b"b" * 64
            + b'", "Interface": {"Address": "192.168.9.9/32"}}',
            404,
        ),
        (
            "NetworkDriver.Join",
            b'{"NetworkID": "'
            + b"a" * 64
            + b'", "EndpointID": "'
            + b"c" * 64
            + b'", "SandboxKey": "/x"}',
            404,
        ),
        ("NetworkDriver.NoSuchCall", b"{}", 404),
    ]
    for method, body, status in cases:
        got, payload = post(sock, method, body)
        assert got == status, (method, got, payload)
        assert isinstance(payload, dict) and payload.get("Err"), (method, payload)
    assert post(sock, "Plugin.Activate", b"")[1] == {"Implements": ["NetworkDriver", "IpamDriver"]}
    assert host.links("cali", "tmp") == []
    status = host.calicnm("status").stdout
    assert "plugin is answering" in status and "etcd is reachable" in status


def test_etcd_down_fails_the_call_cleanly_and_recovers(host: CalicnmHost) -> None:
    host.create_network("frozen")
    pid = etcd_pid(host)
    os.kill(pid, signal.SIGSTOP)
    try:
        failed = host.docker_run("run", "--rm", "--net", "frozen", IMG, "true")
        assert failed.returncode != 0
        assert "etcd is unreachable" in failed.stderr, failed.stderr
        assert host.links("cali", "tmp") == []
        # The CLI says so in one line too.
        cli = host.calicnm("pool", "show", check=False)
        assert cli.returncode == 1 and cli.stderr.count("\n") == 1
    finally:
        os.kill(pid, signal.SIGCONT)
    ok = host.docker_run("run", "--rm", "--net", "frozen", IMG, "ip", "-4", "addr", "show", "eth0")
    assert ok.returncode == 0, ok.stderr
    host.docker("network", "rm", "frozen")
    assert_nothing_left(host)


def test_node_restart_keeps_containers_and_cleans_up(host: CalicnmHost) -> None:
    host.create_network("restart")
    host.docker("run", "-d", "--net", "restart", "--name", "r1", IMG, "sleep", "1000")
    host.docker("run", "-d", "--net", "restart", "--name", "r2", IMG, "sleep", "1000")
    r2 = host.ip_of("r2", "restart")

    # SIGTERM: clean exit, socket removed.
    assert host.stop_node() == 0
    assert not host.socket.exists()
    # Containers keep their connectivity while the node is down.
    assert "1 packets received" in host.docker("exec", "r1", "ping", "-c", "1", "-W", "2", r2)

    # A stale socket from a crash does not stop the next start.
    stale = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    stale.bind(str(host.socket))
    stale.close()
    host.start_node()
    assert post(str(host.socket), "Plugin.Activate", b"")[0] == 200

    # SIGKILL: the plugin and etcd die with the node; a restart works.
    host.stop_node(sig=signal.SIGKILL)
    wait_until(
        lambda: (
            subprocess.run(
                ["pgrep", "-f", "--", f"--data-dir {host.state_dir}/etcd"], capture_output=True
            ).returncode
            != 0
        ),
        20,
        "etcd to exit",
    )
    if host.socket.exists():
        host.socket.unlink()  # gunicorn may not have had time to remove it
    host.start_node()
    time.sleep(0.5)
    host.docker("rm", "-f", "r1", "r2")
    host.docker("network", "rm", "restart")
    assert_nothing_left(host)
