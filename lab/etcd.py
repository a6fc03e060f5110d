"""Throwaway etcds: :class:`EtcdServer` on loopback, :func:`fabric_etcd` in the fabric.

:class:`EtcdServer` is the only thing the lab starts in the root network namespace, and it
listens on ``127.0.0.1`` only (on free ports).  :func:`fabric_etcd` runs in the fabric
namespace, as a datacenter etcd on its own machine that hosts reach over the underlay.
:class:`EtcdCluster` is an n-member cluster whose members a test can stop, kill and start
again: on loopback (free ports, root namespace, like :class:`EtcdServer`) or, with
:func:`fabric_etcd_cluster`, in the fabric namespace.
"""

from __future__ import annotations

import functools
import os
import random
import shutil
import signal
import socket
import tempfile
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Self

from calicnm.store.etcd import EtcdStore, parse_endpoints
from lab.fabric import FABRIC_ADDRESS, Fabric
from lab.netns import Netns
from lab.procs import NAME_PREFIX, Cleanup, HarnessError, Managed, Process, run_command

__all__ = [
    "FABRIC_ETCD_URL",
    "EtcdCluster",
    "EtcdServer",
    "etcd_argv",
    "etcd_member_argv",
    "fabric_etcd",
    "fabric_etcd_cluster",
    "free_port",
    "free_ports",
]

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


def etcd_member_argv(
    name: str,
    data_dir: str,
    client_url: str,
    peer_url: str,
    initial_cluster: str,
    token: str,
) -> list[str]:
    """Member ``name`` of a new cluster ``initial_cluster`` (``name=peer_url,...``).  With
    an existing ``data_dir`` (a restart) etcd ignores the initial-cluster flags."""
    argv = etcd_argv(name, data_dir, client_url, peer_url)
    argv[argv.index("--initial-cluster") + 1] = initial_cluster
    return [*argv, "--initial-cluster-state", "new", "--initial-cluster-token", token]


def free_ports(k: int) -> list[int]:
    """``k`` distinct TCP ports on 127.0.0.1, free a moment ago, chosen below the kernel's
    ephemeral range so that no outgoing connection takes one while its member is stopped."""
    try:
        low = int(Path("/proc/sys/net/ipv4/ip_local_port_range").read_text().split()[0])
    except (OSError, ValueError, IndexError):
        low = 32768
    if low <= 20000 + 4 * k:
        return [free_port() for _ in range(k)]  # an unusual range: fall back
    chosen: list[int] = []
    rng = random.Random()
    for _ in range(100 * k):
        port = rng.randrange(20000, low)
        if port in chosen:
            continue
        with socket.socket() as s:
            try:
                s.bind(("127.0.0.1", port))
            except OSError:
                continue
        chosen.append(port)
        if len(chosen) == k:
            return chosen
    raise HarnessError(f"could not find {k} free ports below {low}")


class EtcdCluster(Managed):
    """A throwaway ``n``-member etcd cluster, members ``0 .. n-1``.

    By default on ``127.0.0.1`` with free ports (:func:`free_ports`), in the root namespace
    (like :class:`EtcdServer`); with ``netns`` (and usually fixed ``client_ports``/``peer_ports``
    on the fabric address, see :func:`fabric_etcd_cluster`) inside that namespace.  Data and
    logs (``m<i>.log``) live in a new ``cnmt-etcd-*`` dir under ``workdir`` (default: the
    temp dir).

    :meth:`start` starts every member and waits (at most 30 s) until each answers a
    linearizable read, i.e. the cluster has a leader; on any failure it undoes everything
    (as :meth:`cleanup`) and raises :class:`~lab.procs.HarnessError`.  :meth:`stop_member`
    (SIGTERM), :meth:`kill` (SIGKILL) and :meth:`start_member` (same data, waits until it is
    healthy) act on one member.  :meth:`cleanup` stops every member and removes the data
    (the whole dir when ``workdir`` was not given); it is idempotent and bounded.
    """

    def __init__(
        self,
        n: int = 3,
        *,
        workdir: Path | None = None,
        netns: Netns | None = None,
        host: str = "127.0.0.1",
        client_ports: Sequence[int] | None = None,
        peer_ports: Sequence[int] | None = None,
    ) -> None:
        if shutil.which("etcd") is None or shutil.which("etcdctl") is None:
            raise HarnessError("etcd is not installed; run 'make test' (it installs etcd-server)")
        ports = free_ports(2 * n) if not (client_ports and peer_ports) else []
        clients = list(client_ports) if client_ports else ports[:n]
        peers = list(peer_ports) if peer_ports else ports[n:]
        if len(clients) != n or len(peers) != n:
            raise HarnessError(f"EtcdCluster: {n} members need {n} client and peer ports")
        self.n = n
        self.netns = netns
        self._own_dir = workdir is None
        self.dir = Path(tempfile.mkdtemp(prefix=f"{NAME_PREFIX}-etcd-", dir=workdir))
        self.urls = [f"http://{host}:{p}" for p in clients]
        """Client URL of each member."""
        self.peer_urls = [f"http://{host}:{p}" for p in peers]
        self._token = f"{NAME_PREFIX}-{os.getpid()}-{clients[0]}"
        self._initial = ",".join(f"m{i}={url}" for i, url in enumerate(self.peer_urls))
        self.procs: list[Process | None] = [None] * n

    @property
    def endpoints(self) -> str:
        """All client URLs, comma-separated: an ``ETCD_ENDPOINTS`` value."""
        return ",".join(self.urls)

    def index_of(self, url: str) -> int:
        """Which member serves client URL ``url``."""
        return self.urls.index(url.rstrip("/"))

    def log(self, i: int) -> Path:
        return self.dir / f"m{i}.log"

    def _spawn(self, i: int) -> None:
        argv = etcd_member_argv(
            f"m{i}",
            str(self.dir / f"m{i}.data"),
            self.urls[i],
            self.peer_urls[i],
            self._initial,
            self._token,
        )
        env = {k: v for k, v in os.environ.items() if not k.startswith("ETCD")}
        proc = Process(argv, self.log(i), netns=self.netns, env=env, name=f"etcd-m{i}")
        self.procs[i] = proc
        proc.start()

    def start(self) -> Self:
        try:
            for i in range(self.n):
                self._spawn(i)
            self.wait_healthy(range(self.n))
        except BaseException:
            self.cleanup(raise_errors=False)
            raise
        return self

    def running(self, i: int) -> bool:
        proc = self.procs[i]
        return proc is not None and proc.is_running()

    def healthy(self, i: int, timeout: float = 2.0) -> bool:
        """Does member ``i`` answer a linearizable read (so: it is up and has a leader)?"""
        argv = [
            "etcdctl",
            "--endpoints",
            self.urls[i],
            "--dial-timeout",
            "1s",
            "--command-timeout",
            f"{timeout:.0f}s",
            "endpoint",
            "health",
        ]
        env = {k: v for k, v in os.environ.items() if not k.startswith("ETCD")}
        env["ETCDCTL_API"] = "3"
        try:
            if self.netns is not None:
                res = self.netns.run(argv, check=False, timeout=timeout + 5, env=env)
            else:
                res = run_command(argv, check=False, timeout=timeout + 5, env=env)
        except Exception:  # a hung etcdctl (killed by the timeout) is "not healthy"
            return False
        return res.returncode == 0

    def wait_healthy(self, members: Sequence[int] | range, timeout: float = READY_TIMEOUT) -> None:
        deadline = time.monotonic() + timeout
        todo = list(members)
        while todo:
            for i in list(todo):
                if not self.running(i):
                    raise HarnessError(f"etcd member {i} exited:\n{self.log_tail(i)}")
                if self.healthy(i):
                    todo.remove(i)
            if todo and time.monotonic() >= deadline:
                raise HarnessError(f"etcd members {todo} not healthy within {timeout:.0f}s")
            if todo:
                time.sleep(0.2)

    def log_tail(self, i: int, n: int = 20) -> str:
        proc = self.procs[i]
        return proc.log_tail(n) if proc is not None else ""

    def stop_member(self, i: int) -> None:
        """SIGTERM member ``i`` (SIGKILL after 10 s) and reap it."""
        proc = self.procs[i]
        if proc is not None:
            proc.stop(signal.SIGTERM, timeout=10)

    def kill(self, i: int) -> None:
        """SIGKILL member ``i`` and reap it."""
        proc = self.procs[i]
        if proc is not None:
            proc.stop(signal.SIGKILL, timeout=10)

    def start_member(self, i: int, wait: bool = True) -> None:
        """Start member ``i`` again on its data (it must be stopped); with ``wait`` until it
        is healthy (which needs a quorum of members running)."""
        if self.running(i):
            raise HarnessError(f"etcd member {i} is already running")
        self._spawn(i)
        if wait:
            self.wait_healthy([i])

    def cleanup(self, raise_errors: bool = True) -> None:
        cleanup = Cleanup(f"etcd cluster in {self.dir}")
        for i in range(self.n):
            cleanup.step(f"stopping member {i}", functools.partial(self.stop_member, i))
        doomed = [self.dir] if self._own_dir else [self.dir / f"m{i}.data" for i in range(self.n)]
        for path in doomed:
            cleanup.step(f"removing {path}", functools.partial(shutil.rmtree, path, True))
        cleanup.finish(raise_errors)

    _open = start
    _close = cleanup


def fabric_etcd_cluster(fabric: Fabric, workdir: Path, n: int = 3) -> EtcdCluster:
    """A not-yet-started :class:`EtcdCluster` in the fabric namespace, as a datacenter
    cluster: member ``i`` at ``FABRIC_ADDRESS`` client port ``2379 + 100 i``, peer port
    ``2380 + 100 i``."""
    return EtcdCluster(
        n,
        workdir=workdir,
        netns=fabric.netns,
        host=FABRIC_ADDRESS,
        client_ports=[2379 + 100 * i for i in range(n)],
        peer_ports=[2380 + 100 * i for i in range(n)],
    )
