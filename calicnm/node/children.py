"""Child processes the node supervises: the embedded etcd and gunicorn.

Each child runs in its own process group with its output appended to a log
file (or inherited stderr).  ``stop`` sends SIGTERM, waits a bounded time
and escalates to SIGKILL, so the node never exits leaving a child behind.
"""

from __future__ import annotations

import contextlib
import ctypes
import logging
import os
import signal
import socket
import subprocess
import sys
import time
from typing import IO

from calicnm.errors import CalicnmError

_log = logging.getLogger(__name__)


PR_SET_PDEATHSIG = 1


def _die_with_parent() -> None:
    """In the child before exec: get SIGTERM when the node dies, even by
    SIGKILL, so a killed node never leaves an orphan etcd or plugin holding
    the port and the socket."""
    libc = ctypes.CDLL(None, use_errno=True)
    libc.prctl(PR_SET_PDEATHSIG, signal.SIGTERM)


class Child:
    def __init__(
        self,
        name: str,
        argv: list[str],
        env: dict[str, str] | None = None,
        log_path: str | None = None,
    ) -> None:
        self.name = name
        self.argv = argv
        self.env = env
        self.log_path = log_path
        self.proc: subprocess.Popen[bytes] | None = None
        self._log_file: IO[bytes] | None = None

    def start(self) -> None:
        out: IO[bytes] | int | None = None
        if self.log_path:
            self._log_file = open(self.log_path, "ab")  # noqa: SIM115 - closed in stop()
            out = self._log_file
        self.proc = subprocess.Popen(
            self.argv,
            env=self.env,
            stdin=subprocess.DEVNULL,
            stdout=out if out is not None else sys.stderr,
            stderr=subprocess.STDOUT if out is not None else sys.stderr,
            start_new_session=True,
            preexec_fn=_die_with_parent,
        )
        _log.info("child started name=%s pid=%d", self.name, self.proc.pid)

    def alive(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def stop(self, timeout: float = 15.0) -> None:
        proc = self.proc
        if proc is not None and proc.poll() is None:
            try:
                proc.send_signal(signal.SIGTERM)
                proc.wait(timeout=timeout)
            except subprocess.TimeoutExpired:
                _log.warning("child %s ignored SIGTERM; killing", self.name)
                with contextlib.suppress(ProcessLookupError):
                    os.killpg(proc.pid, signal.SIGKILL)
                proc.wait(timeout=5)
            _log.info("child stopped name=%s rc=%s", self.name, proc.returncode)
        if self._log_file is not None:
            self._log_file.close()
            self._log_file = None


def port_open(host: str, port: int, timeout: float = 0.5) -> bool:
    try:
        with socket.create_connection((host, port), timeout=timeout):
            return True
    except OSError:
        return False


def embedded_etcd(state_dir: str) -> Child:
    """A single-member etcd on loopback with its data under ``state_dir``."""
    if port_open("127.0.0.1", 2379):
        raise CalicnmError(
            "127.0.0.1:2379 is already in use; set ETCD_ENDPOINTS=http://127.0.0.1:2379 "
            "to use that etcd instead of an embedded one"
        )
    data_dir = os.path.join(state_dir, "etcd")
    os.makedirs(data_dir, mode=0o700, exist_ok=True)
    argv = [
        "etcd",
        "--name",
        "calicnm",
        "--data-dir",
        data_dir,
        "--listen-client-urls",
        "http://127.0.0.1:2379",
        "--advertise-client-urls",
        "http://127.0.0.1:2379",
        "--listen-peer-urls",
        "http://127.0.0.1:2380",
        "--initial-advertise-peer-urls",
        "http://127.0.0.1:2380",
        "--initial-cluster",
        "calicnm=http://127.0.0.1:2380",
        # A single-host datastore stays small: keep the history short.
        "--auto-compaction-mode",
        "revision",
        "--auto-compaction-retention",
        "1000",
    ]
    # etcd reads ETCD_* variables as its own flags: give it none of ours.
    env = {k: v for k, v in os.environ.items() if not k.startswith("ETCD")}
    return Child("etcd", argv, env=env, log_path=os.path.join(state_dir, "etcd.log"))


def gunicorn(socket_path: str, env: dict[str, str], log_level: str) -> Child:
    argv = [
        sys.executable,
        "-m",
        "gunicorn",
        "--bind",
        f"unix:{socket_path}",
        # Socket mode 0600: only root may drive the network.
        "--umask",
        "0o177",
        "--workers",
        "1",
        "--worker-class",
        "gthread",
        "--threads",
        "8",
        "--timeout",
        "60",
        "--graceful-timeout",
        "10",
        "--log-level",
        log_level.lower(),
        "--error-logfile",
        "-",
        "--no-control-socket",
        "calicnm.plugin_api:create_app()",
    ]
    return Child("plugin", argv, env=env)


def wait_for(check: object, what: str, timeout: float, interval: float = 0.1) -> None:
    """Poll ``check()`` until true; bounded by ``timeout`` seconds."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if callable(check) and check():
            return
        time.sleep(interval)
    raise CalicnmError(f"timed out after {timeout:.0f}s waiting for {what}")
