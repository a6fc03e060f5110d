"""Emulated calicnm hosts: a netns on the fabric, a calicnm node and a dockerd.

Start order is node first (its socket in the host's plugin dir), then
dockerd; teardown is the reverse, so Docker can still reach the plugin
while it removes containers.  Every step is undone even when a later one
fails, and nothing is left behind: containers, dockerd, the node (and its
embedded etcd), veths and namespaces.
"""

from __future__ import annotations

import contextlib
import json
import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

from tests.harness import DEFAULT_IMAGE, FABRIC_ADDRESS, DockerHost, Fabric, Netns, Process

REPO = Path(__file__).resolve().parents[1]
CALICNM = str(REPO / ".venv" / "bin" / "calicnm")


def wait_until(check: Callable[[], Any], timeout: float, what: str, interval: float = 0.2) -> Any:
    """Poll ``check`` until it returns something truthy; bounded in time."""
    deadline = time.monotonic() + timeout
    last: Any = None
    while time.monotonic() < deadline:
        last = check()
        if last:
            return last
        time.sleep(interval)
    raise AssertionError(f"timed out after {timeout}s waiting for {what} (last: {last!r})")


class CalicnmHost:
    """One emulated host.  ``docker``/``calicnm``/``sh`` run commands on it."""

    def __init__(
        self,
        netns: Netns,
        address: str,
        workdir: Path,
        hostname: str,
        etcd_endpoints: str | None = None,
    ) -> None:
        self.netns = netns
        self.address = address
        self.hostname = hostname
        self.workdir = workdir
        self.etcd_endpoints = etcd_endpoints
        self.dockerd = DockerHost(netns, workdir / "docker")
        self.node: Process | None = None
        self.state_dir = workdir / "state"

    @property
    def socket(self) -> Path:
        return Path(self.dockerd.plugins_dir) / "calicnm.sock"

    def env(self) -> dict[str, str]:
        env = {k: v for k, v in os.environ.items() if not k.startswith(("ETCD", "CALICNM"))}
        env.update(
            CALICNM_HOSTNAME=self.hostname,
            CALICNM_SOCKET=str(self.socket),
            CALICNM_STATE_DIR=str(self.state_dir),
            CALICNM_LOG_LEVEL="DEBUG",
            CALICNM_RESYNC_INTERVAL="3",
            DOCKER_HOST=f"unix://{self.dockerd.sock}",
        )
        if self.etcd_endpoints:
            env["ETCD_ENDPOINTS"] = self.etcd_endpoints
        return env

    def start_node(self) -> None:
        self.node = self.netns.process(
            [CALICNM, "node", "run", "--ip", self.address],
            self.workdir / "node.log",
            env=self.env(),
        ).start()
        node = self.node
        wait_until(lambda: self.answering() or not node.is_running(), 60, "plugin socket")
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

    def stop_node(self, sig: int = 15) -> int | None:
        if self.node is None:
            return None
        rc = self.node.stop(sig=sig, timeout=30)
        return rc

    def start(self) -> CalicnmHost:
        self.dockerd.prepare()
        self.start_node()
        self.dockerd.start()
        self.dockerd.import_busybox()
        return self

    def close(self) -> None:
        errors: list[BaseException] = []
        for step in (self.dockerd.stop, self.stop_node):
            try:
                step()
            except BaseException as exc:
                errors.append(exc)
        if errors:
            raise errors[0]

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
        import base64

        kvs = json.loads(out).get("kvs", [])
        return {
            base64.b64decode(kv["key"]).decode(): base64.b64decode(kv.get("value", "")).decode()
            for kv in kvs
        }


@contextlib.contextmanager
def single_host(workdir: Path, hostname: str = "host1") -> Iterator[CalicnmHost]:
    """A fabric with one calicnm host using the node's embedded etcd."""
    with Fabric() as fabric:
        att = fabric.add_host()
        host = CalicnmHost(att.host, att.address, workdir, hostname)
        try:
            yield host.start()
        finally:
            host.close()


def fabric_etcd(fabric: Fabric, workdir: Path) -> Process:
    """An etcd in the fabric namespace at FABRIC_ADDRESS:2379, as a datacenter
    etcd on its own machine; hosts reach it over the underlay."""
    url = f"http://{FABRIC_ADDRESS}:2379"
    peer = f"http://{FABRIC_ADDRESS}:2380"
    argv = [
        "etcd",
        "--name",
        "dc",
        "--data-dir",
        str(workdir / "etcd"),
        "--listen-client-urls",
        url,
        "--advertise-client-urls",
        url,
        "--listen-peer-urls",
        peer,
        "--initial-advertise-peer-urls",
        peer,
        "--initial-cluster",
        f"dc={peer}",
    ]
    return fabric.netns.process(argv, workdir / "etcd.log").start()


class Cluster:
    """A fabric, an etcd on it (in the fabric namespace, as a datacenter etcd on
    its own machine) and ``n`` calicnm hosts using that etcd."""

    def __init__(self, workdir: Path, n: int) -> None:
        self.workdir = workdir
        self.n = n
        self.fabric = Fabric()
        self.hosts: list[CalicnmHost] = []
        self.etcd: Process | None = None

    @property
    def etcd_url(self) -> str:
        return f"http://{FABRIC_ADDRESS}:2379"

    def start(self) -> Cluster:
        self.fabric.create()
        url = self.etcd_url
        self.etcd = fabric_etcd(self.fabric, self.workdir)
        for i in range(self.n):
            att = self.fabric.add_host()
            host = CalicnmHost(
                att.host,
                att.address,
                self.workdir / f"host{i + 1}",
                f"host{i + 1}",
                etcd_endpoints=url,
            )
            self.hosts.append(host)
            host.start()
        return self

    def close(self) -> None:
        errors: list[BaseException] = []
        for host in reversed(self.hosts):
            try:
                host.close()
            except BaseException as exc:  # keep tearing down the rest
                errors.append(exc)
        if self.etcd is not None:
            self.etcd.stop()
        self.fabric.close()
        if errors:
            raise errors[0]


@contextlib.contextmanager
def cluster(workdir: Path, n: int) -> Iterator[Cluster]:
    c = Cluster(workdir, n)
    try:
        yield c.start()
    finally:
        c.close()


def run_quick_bench(script: Path, out: Path, timeout: float = 600) -> tuple[int | None, str]:
    """Run ``script --quick --out OUT``; (exit status, output), or (None, output)
    if it timed out.  On a timeout it gets SIGTERM, which unwinds its teardown,
    and only then SIGKILL, so nothing it built outlives the test."""
    argv = [sys.executable, str(script), "--quick", "--out", str(out)]
    with subprocess.Popen(
        argv, cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True
    ) as proc:
        try:
            output, _ = proc.communicate(timeout=timeout)
            return proc.returncode, output
        except subprocess.TimeoutExpired:
            proc.send_signal(signal.SIGTERM)
            try:
                output, _ = proc.communicate(timeout=120)
            except subprocess.TimeoutExpired:
                proc.kill()
                output, _ = proc.communicate()
            return None, output
