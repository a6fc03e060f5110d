"""Emulated calicnm hosts: a netns on the fabric, a calicnm node and a dockerd.

Start order is node first (its socket in the host's plugin dir), then
dockerd; teardown is the reverse, so Docker can still reach the plugin
while it removes containers.  Every step is undone even when a later one
fails, and nothing is left behind: containers, dockerd, the node (and its
embedded etcd), veths and namespaces.

The node runs with :data:`NodeSettings` ``"test"`` (DEBUG logs, a 3 s full resync, an
ownership sweep every 2 s and pending addresses freed after 15 s, so that tests finish fast)
or ``"product"`` (the product's defaults: INFO logs, 30 s resync; what a benchmark wants,
since the test settings are CPU noise a real node does not make).
"""

from __future__ import annotations

import base64
import contextlib
import json
import os
import shutil
import socket
import subprocess
import time
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import Any, Literal, Self

from lab.dockerd import DockerHost
from lab.etcd import FABRIC_ETCD_URL, fabric_etcd
from lab.fabric import Fabric
from lab.images import DEFAULT_IMAGE
from lab.netns import Netns
from lab.paths import CALICNM
from lab.procs import Cleanup, HarnessError, Managed, Process

__all__ = ["CalicnmHost", "Cluster", "NodeSettings", "cluster", "single_host", "wait_until"]

NodeSettings = Literal["test", "product"]


def wait_until(check: Callable[[], Any], timeout: float, what: str, interval: float = 0.2) -> Any:
    """Poll ``check`` until it returns something truthy; bounded in time.

    Returns that value; raises ``AssertionError`` (with the last value) after ``timeout``.
    """
    deadline = time.monotonic() + timeout
    last: Any = None
    while time.monotonic() < deadline:
        last = check()
        if last:
            return last
        time.sleep(interval)
    raise AssertionError(f"timed out after {timeout}s waiting for {what} (last: {last!r})")


class CalicnmHost(Managed):
    """One emulated host.  ``docker``/``calicnm``/``sh`` run commands on it.

    :meth:`start` either fully succeeds or undoes what it did (as :meth:`close`) and
    re-raises.  :meth:`close` is idempotent and runs every step (dockerd, then the node);
    failures are raised at the end as one :class:`~lab.procs.TeardownError` if
    ``raise_errors``.  The namespace belongs to the caller (usually the fabric).
    """

    def __init__(
        self,
        netns: Netns,
        address: str,
        workdir: Path,
        hostname: str,
        etcd_endpoints: str | None = None,
        node_settings: NodeSettings = "test",
        docker_bridge: bool = False,
        extra_env: dict[str, str] | None = None,
    ) -> None:
        self.netns = netns
        self.address = address
        self.hostname = hostname
        self.workdir = workdir
        self.etcd_endpoints = etcd_endpoints
        self.node_settings = node_settings
        self.extra_env: dict[str, str] = dict(extra_env or {})
        """Added last to the node's (and the CLI's) environment, e.g.
        ``CALICNM_ENDPOINT_TO_HOST_ACTION``; a change applies from the next
        :meth:`start_node`."""
        self.dockerd = DockerHost(netns, workdir / "docker", default_bridge=docker_bridge)
        self.node: Process | None = None
        self.state_dir = workdir / "state"

    @property
    def socket(self) -> Path:
        return Path(self.dockerd.plugins_dir) / "calicnm.sock"

    @property
    def docker_socket(self) -> Path:
        """The Docker API socket the node is given as ``DOCKER_HOST``."""
        return self.dockerd.sock

    def env(self) -> dict[str, str]:
        env = {k: v for k, v in os.environ.items() if not k.startswith(("ETCD", "CALICNM"))}
        env.update(
            CALICNM_HOSTNAME=self.hostname,
            CALICNM_SOCKET=str(self.socket),
            CALICNM_STATE_DIR=str(self.state_dir),
            CALICNM_BPF_DIR=str(self.bpf_dir),
            DOCKER_HOST=f"unix://{self.docker_socket}",
        )
        if self.node_settings == "test":
            env.update(
                CALICNM_LOG_LEVEL="DEBUG",
                CALICNM_RESYNC_INTERVAL="3",
                CALICNM_RECONCILE_INTERVAL="2",
                CALICNM_PENDING_MAX_AGE="15",
            )
        else:
            env.update(CALICNM_LOG_LEVEL="INFO")
        if self.etcd_endpoints:
            env["ETCD_ENDPOINTS"] = self.etcd_endpoints
        env.update(self.extra_env)
        return env

    node_start_timeout = 60.0
    """How long :meth:`start_node` waits for the plugin to answer."""

    def start_node(self) -> None:
        """Start the node; wait (at most :attr:`node_start_timeout`) until its plugin
        answers.  Raises ``AssertionError`` if it exits first or does not answer in time."""
        self.node = self.netns.process(
            [CALICNM, "node", "run", "--ip", self.address],
            self.workdir / "node.log",
            env=self.env(),
        ).start()
        node = self.node
        wait_until(
            lambda: self.answering() or not node.is_running(),
            self.node_start_timeout,
            "plugin socket",
        )
        if not node.is_running():
            raise AssertionError(f"node exited at start:\n{node.log_tail(40)}")

    def answering(self) -> bool:
        """Does the plugin accept connections on its socket (not just exist)?"""
        probe = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        try:
            probe.settimeout(2)
            probe.connect(str(self.socket))
            probe.sendall(b"POST /Plugin.Activate HTTP/1.0\r\nContent-Length: 0\r\n\r\n")
            return b"200" in probe.recv(64)
        except OSError:
            return False
        finally:
            probe.close()

    def send_node_signal(self, sig: int) -> None:
        """Signal the node's leader process (the agent runs in it), e.g. SIGSTOP/SIGCONT."""
        if self.node is None:
            raise HarnessError(f"{self.hostname}: the node is not running")
        self.node.send_signal(sig)

    def stop_node(self, sig: int = 15) -> int | None:
        if self.node is None:
            return None
        rc = self.node.stop(sig=sig, timeout=30)
        return rc

    def start(self) -> Self:
        try:
            self.dockerd.prepare()
            self.start_node()
            self.dockerd.start()
            self.dockerd.import_busybox()
        except BaseException:
            self.close(raise_errors=False)
            raise
        return self

    @property
    def bpf_dir(self) -> Path:
        """This node's fast-path pins: the BPF filesystem is one per machine, shared by
        every emulated host, so each node gets its own directory."""
        return Path("/sys/fs/bpf") / f"calicnm-{self.netns.name}"

    def remove_bpf_pins(self) -> None:
        """The node's pinned program and maps (they outlive the node, by design)."""
        shutil.rmtree(self.bpf_dir, ignore_errors=True)

    def close(self, raise_errors: bool = True) -> None:
        cleanup = Cleanup(f"host {self.hostname}")
        cleanup.step("stopping dockerd", self.dockerd.stop)
        cleanup.step("stopping the node", self.stop_node)
        cleanup.step("removing the fast path's pins", self.remove_bpf_pins)
        cleanup.finish(raise_errors)

    _open = start
    _close = close

    # ---- commands --------------------------------------------------------

    def docker(self, *args: str, check: bool = True, timeout: float = 120) -> str:
        return self.dockerd.docker(*args, check=check, timeout=timeout).stdout.strip()

    def create_network(self, name: str, *args: str, check: bool = True) -> str:
        """``docker network create -d calicnm --ipam-driver calicnm ARGS NAME``."""
        result = self.dockerd.docker(
            "network",
            "create",
            "-d",
            "calicnm",
            "--ipam-driver",
            "calicnm",
            *args,
            name,
            check=check,
        )
        return (result.stdout if result.returncode == 0 else result.stderr).strip()

    def docker_run(self, *args: str, timeout: float = 120) -> subprocess.CompletedProcess[str]:
        return self.dockerd.docker(*args, check=False, timeout=timeout)

    def calicnm(
        self, *args: str, check: bool = True, input: str | None = None
    ) -> subprocess.CompletedProcess[str]:
        return self.netns.run(
            [CALICNM, *args], check=check, input=input, env=self.env(), timeout=60
        )

    def sh(self, command: str, check: bool = True) -> str:
        return self.netns.run(["sh", "-c", command], check=check).stdout

    def ip_of(self, container: str, network: str) -> str:
        return self.docker(
            "inspect",
            "-f",
            f'{{{{(index .NetworkSettings.Networks "{network}").IPAddress}}}}',
            container,
        )

    def fetch(self, network: str, url: str, *extra: str) -> subprocess.CompletedProcess[str]:
        """HTTP GET from a throwaway container on ``network``."""
        return self.docker_run(
            "run",
            "--rm",
            "--net",
            network,
            *extra,
            DEFAULT_IMAGE,
            "sh",
            "-c",
            f"busybox timeout 5 wget -q -O /tmp/f {url} && cat /tmp/f",
        )

    def links(self, *prefixes: str) -> list[str]:
        out = self.netns.run(["ip", "-o", "link", "show"]).stdout
        names = [line.split(":")[1].strip().split("@")[0] for line in out.splitlines()]
        return [n for n in names if n.startswith(prefixes)]

    def routes(self) -> list[str]:
        return self.netns.run(["ip", "-4", "route", "show"]).stdout.splitlines()

    def etcd_keys(self, prefix: str = "/calicnm/v1/") -> dict[str, Any]:
        out = self.netns.run(
            [
                "etcdctl",
                "--endpoints",
                self.etcd_endpoints or "http://127.0.0.1:2379",
                "get",
                "--prefix",
                prefix,
                "-w",
                "json",
            ],
            env={**os.environ, "ETCDCTL_API": "3"},
        ).stdout
        kvs = json.loads(out).get("kvs", [])
        return {
            base64.b64decode(kv["key"]).decode(): base64.b64decode(kv.get("value", "")).decode()
            for kv in kvs
        }


@contextlib.contextmanager
def single_host(
    workdir: Path,
    hostname: str = "host1",
    node_settings: NodeSettings = "test",
    docker_bridge: bool = False,
    extra_env: dict[str, str] | None = None,
) -> Iterator[CalicnmHost]:
    """A fabric with one calicnm host using the node's embedded etcd.  ``docker_bridge``
    gives its dockerd the default bridge ``docker0`` (otherwise ``--bridge=none``);
    ``extra_env`` is added to the node's environment (:attr:`CalicnmHost.extra_env`)."""
    with Fabric() as fabric:
        att = fabric.add_host()
        with CalicnmHost(
            att.host,
            att.address,
            workdir,
            hostname,
            node_settings=node_settings,
            docker_bridge=docker_bridge,
            extra_env=extra_env,
        ) as host:
            yield host


class Cluster(Managed):
    """A fabric, an etcd on it (in the fabric namespace, as a datacenter etcd on
    its own machine) and ``n`` calicnm hosts using that etcd, named ``host1`` .. ``hostN``
    with workdirs of the same names under ``workdir``.

    :meth:`start` either fully succeeds or undoes what it did (as :meth:`close`) and
    re-raises.  :meth:`close` is idempotent and runs every step: hosts (newest first), the
    etcd, then the fabric with the hosts' namespaces; failures are raised at the end as one
    :class:`~lab.procs.TeardownError` if ``raise_errors``.
    """

    def __init__(
        self,
        workdir: Path,
        n: int,
        node_settings: NodeSettings = "test",
        host_env: Sequence[dict[str, str]] = (),
    ) -> None:
        """``host_env[i]``, if given, is added to host i+1's node environment."""
        self.workdir = workdir
        self.n = n
        self.node_settings = node_settings
        self.host_env = list(host_env)
        self.fabric = Fabric()
        self.hosts: list[CalicnmHost] = []
        self.etcd: Process | None = None

    @property
    def etcd_url(self) -> str:
        return FABRIC_ETCD_URL

    def start(self) -> Self:
        try:
            self.fabric.create()
            self.etcd = fabric_etcd(self.fabric, self.workdir)
            for i in range(self.n):
                att = self.fabric.add_host()
                host = CalicnmHost(
                    att.host,
                    att.address,
                    self.workdir / f"host{i + 1}",
                    f"host{i + 1}",
                    etcd_endpoints=self.etcd_url,
                    node_settings=self.node_settings,
                    extra_env=self.host_env[i] if i < len(self.host_env) else None,
                )
                self.hosts.append(host)
                host.start()
        except BaseException:
            self.close(raise_errors=False)
            raise
        return self

    def close(self, raise_errors: bool = True) -> None:
        cleanup = Cleanup(f"cluster in {self.workdir}")
        for host in reversed(self.hosts):
            cleanup.step(f"closing {host.hostname}", host.close)
        if self.etcd is not None:
            cleanup.step("stopping the fabric etcd", self.etcd.stop)
        cleanup.step("closing the fabric", self.fabric.close)
        cleanup.finish(raise_errors)

    _open = start
    _close = close


@contextlib.contextmanager
def cluster(workdir: Path, n: int, node_settings: NodeSettings = "test") -> Iterator[Cluster]:
    """A started :class:`Cluster`, closed on leaving the ``with`` block."""
    with Cluster(workdir, n, node_settings) as c:
        yield c
