"""Smoke tests for the lab's fabric and dockerd: a fabric, one emulated Docker host, busybox
containers.

Each test builds and tears down its own topology inside the test body so that it can assert,
after teardown, that nothing was left behind (namespaces, dockerd/containerd processes).
Traffic goes only to the fabric address 198.18.0.1 inside namespaces created here.
"""

from __future__ import annotations

import os
import shutil
from pathlib import Path

import pytest

from lab.dockerd import DockerHost
from lab.fabric import FABRIC_ADDRESS, Fabric
from lab.images import DEFAULT_IMAGE
from lab.procs import pids_with_arg

pytestmark = [
    pytest.mark.e2e,
    pytest.mark.skipif(os.geteuid() != 0, reason="needs root"),
    pytest.mark.skipif(shutil.which("dockerd") is None, reason="needs dockerd"),
]


def _netns_names() -> set[str]:
    try:
        return set(os.listdir("/run/netns"))
    except FileNotFoundError:
        return set()


def _assert_clean(names: set[str], host: DockerHost, data_root: Path, runtime_dir: Path) -> None:
    left = names & _netns_names()
    assert not left, f"netns left behind: {left}"
    assert not pids_with_arg(str(data_root)), "a process still refers to the data root"
    assert not pids_with_arg(str(runtime_dir)), "a process still refers to the runtime dir"
    assert not host.leftover_pids()
    assert not runtime_dir.exists()
    assert not data_root.exists()
    with open("/proc/self/mountinfo") as fh:
        mounts = fh.read()
    for name in names:
        assert name not in mounts


def test_docker_run_none_network(tmp_path: Path) -> None:
    """dockerd in a netns runs a busybox container with --net none; teardown is complete."""
    with Fabric() as fabric:
        att = fabric.add_host()
        names = {fabric.netns.name, att.host.name}
        assert names <= _netns_names()
        with DockerHost(att.host, tmp_path / "host1") as host:
            data_root, runtime_dir = host.data_root, host.runtime_dir
            assert runtime_dir is not None
            assert host.plugins_dir.is_dir()
            image = host.import_busybox()
            assert image == DEFAULT_IMAGE
            res = host.docker("run", "--rm", "--net", "none", image, "sh", "-c", "echo ok")
            assert res.stdout.strip() == "ok"
            assert pids_with_arg(str(data_root)), "dockerd should be running"
    _assert_clean(names, host, data_root, runtime_dir)


def test_docker_run_host_network_reaches_fabric(tmp_path: Path) -> None:
    """A --net host container on the emulated host pings the fabric address (and only it)."""
    with Fabric() as fabric:
        att = fabric.add_host()
        assert att.address == "198.18.0.2"
        names = {fabric.netns.name, att.host.name}
        with DockerHost(att.host, tmp_path / "host1") as host:
            data_root, runtime_dir = host.data_root, host.runtime_dir
            assert runtime_dir is not None
            image = host.import_busybox()
            res = host.docker(
                "run",
                "--rm",
                "--net",
                "host",
                image,
                "ping",
                "-c1",
                "-W2",
                FABRIC_ADDRESS,
                timeout=60,
            )
            assert "1 packets received" in res.stdout, res.stdout
            # A detached container must also be cleaned up by teardown.
            host.docker("run", "-d", "--net", "host", image, "sleep", "600")
    _assert_clean(names, host, data_root, runtime_dir)
