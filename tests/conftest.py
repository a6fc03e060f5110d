"""Shared fixtures: a real etcd for the whole session, started and stopped here."""

from __future__ import annotations

import os
import shutil
import socket
import subprocess
import tempfile
import time
from collections.abc import Iterator

import pytest

from calicnm.store.etcd import EtcdStore, parse_endpoints

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
VENV_BIN = os.path.join(REPO, ".venv", "bin")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


class EtcdServer:
    """A throwaway single-member etcd on loopback with its data in a temp dir."""

    def __init__(self) -> None:
        if shutil.which("etcd") is None:
            pytest.fail("etcd is not installed; run 'make test' (it installs etcd-server)")
        self.dir = tempfile.mkdtemp(prefix="calicnm-etcd-")
        self.port = free_port()
        self.peer = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.proc: subprocess.Popen[bytes] | None = None

    def start(self) -> None:
        log = open(os.path.join(self.dir, "etcd.log"), "ab")  # noqa: SIM115
        self.proc = subprocess.Popen(
            [
                "etcd",
                "--name",
                "t",
                "--data-dir",
                os.path.join(self.dir, "data"),
                "--listen-client-urls",
                self.url,
                "--advertise-client-urls",
                self.url,
                "--listen-peer-urls",
                f"http://127.0.0.1:{self.peer}",
                "--initial-advertise-peer-urls",
                f"http://127.0.0.1:{self.peer}",
                "--initial-cluster",
                f"t=http://127.0.0.1:{self.peer}",
            ],
            stdout=log,
            stderr=log,
            start_new_session=True,
        )
        log.close()
        store = EtcdStore(parse_endpoints(self.url), timeout=1.0)
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline:
            try:
                store.get("/ready")
                store.close()
                return
            except Exception:
                time.sleep(0.2)
        self.stop()
        pytest.fail("etcd did not become ready in 30 s")

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(timeout=10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()

    def cleanup(self) -> None:
        self.stop()
        shutil.rmtree(self.dir, ignore_errors=True)


@pytest.fixture(scope="session")
def etcd_server() -> Iterator[EtcdServer]:
    server = EtcdServer()
    server.start()
    try:
        yield server
    finally:
        server.cleanup()


@pytest.fixture
def etcd_store(etcd_server: EtcdServer) -> Iterator[EtcdStore]:
    """A store on the session etcd, emptied of calicnm keys before each test."""
    store = EtcdStore(parse_endpoints(etcd_server.url), timeout=3.0)
    for kv in store.list("/calicnm/"):
        store.delete(kv.key)
    try:
        yield store
    finally:
        store.close()
