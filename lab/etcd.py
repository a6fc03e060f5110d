"""Throwaway etcds: :class:`EtcdServer` on loopback, :func:`fabric_etcd` in the fabric.

:class:`EtcdServer` is the only thing the lab starts in the root network namespace, and it
listens on ``127.0.0.1`` only (on free ports).  :func:`fabric_etcd` runs in the fabric
namespace, as a datacenter etcd on its own machine that hosts reach over the underlay.
"""

from __future__ import annotations

import shutil
import signal
import socket
import tempfile
import time
from pathlib import Path
from typing import Self

from calicnm.store.etcd import EtcdStore, parse_endpoints
from lab.fabric import FABRIC_ADDRESS, Fabric
from lab.procs import NAME_PREFIX, Cleanup, HarnessError, Managed, Process

__all__ = ["FABRIC_ETCD_URL", "EtcdServer", "etcd_argv", "fabric_etcd", "free_port"]

FABRIC_ETCD_URL = f"http://{FABRIC_ADDRESS}:2379"
"""Client URL of :func:`fabric_etcd`, reachable from every host on the fabric."""
READY_TIMEOUT = 30.0


def free_port() -> int:
    """A TCP port on 127.0.0.1 that was free a moment ago."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


class EtcdServer(Managed):
    """A throwaway single-member etcd on loopback with its data in a temp dir.

    ``url`` is its client URL.  :meth:`start` waits (at most 30 s) until it answers a read;
    on any failure it undoes everything (as :meth:`cleanup`) and raises
    :class:`~lab.procs.HarnessError`.  :meth:`stop` sends SIGTERM, SIGKILL after 10 s (the
    process group: etcd is a session leader); :meth:`cleanup` stops it and removes the temp
    dir ``/tmp/cnmt-etcd-*``.  Both are idempotent and bounded.
    """

    def __init__(self) -> None:
        if shutil.which("etcd") is None:
            raise HarnessError("etcd is not installed; run 'make test' (it installs etcd-server)")
        self.dir = tempfile.mkdtemp(prefix=f"{NAME_PREFIX}-etcd-")
        self.port = free_port()
        self.peer = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.proc: Process | None = None

    def start(self) -> Self:
        try:
            argv = etcd_argv("t", f"{self.dir}/data", self.url, f"http://127.0.0.1:{self.peer}")
            self.proc = Process(argv, f"{self.dir}/etcd.log", name="etcd").start()
            self._wait_ready()
        except BaseException:
            self.cleanup(raise_errors=False)
            raise
        return self

    def _wait_ready(self) -> None:
        assert self.proc is not None
        store = EtcdStore(parse_endpoints(self.url), timeout=1.0)
        try:
            deadline = time.monotonic() + READY_TIMEOUT
            while time.monotonic() < deadline:
                if not self.proc.is_running():
                    raise HarnessError(f"etcd exited at start:\n{self.proc.log_tail(20)}")
                try:
                    store.get("/ready")
                    return
                except Exception:
                    time.sleep(0.2)
            raise HarnessError(f"etcd did not become ready in {READY_TIMEOUT:.0f} s")
        finally:
            store.close()

    def stop(self) -> None:
        if self.proc is not None:
            self.proc.stop(signal.SIGTERM, timeout=10)

    def cleanup(self, raise_errors: bool = True) -> None:
        cleanup = Cleanup(f"etcd {self.url}")
        cleanup.step("stopping etcd", self.stop)
        cleanup.step("removing its dir", lambda: shutil.rmtree(self.dir, ignore_errors=True))
        cleanup.finish(raise_errors)

    _open = start
    _close = cleanup


def etcd_argv(name: str, data_dir: str, client_url: str, peer_url: str) -> list[str]:
    """A single-member etcd ``name`` serving ``client_url``, its data in ``data_dir``."""
    return [
        "etcd",
        "--name",
        name,
        "--data-dir",
        data_dir,
        "--listen-client-urls",
        client_url,
        "--advertise-client-urls",
        client_url,
        "--listen-peer-urls",
        peer_url,
        "--initial-advertise-peer-urls",
        peer_url,
        "--initial-cluster",
        f"{name}={peer_url}",
    ]


def fabric_etcd(fabric: Fabric, workdir: Path) -> Process:
    """An etcd in the fabric namespace at FABRIC_ADDRESS:2379, as a datacenter
    etcd on its own machine; hosts reach it over the underlay.  The caller stops it."""
    argv = etcd_argv("dc", str(workdir / "etcd"), FABRIC_ETCD_URL, f"http://{FABRIC_ADDRESS}:2380")
    return fabric.netns.process(argv, workdir / "etcd.log").start()
