"""The node as a systemd service on a host whose PID 1 is a real systemd.

The host is a booted systemd-nspawn machine (:class:`lab.systemd_host.SystemdHost`) with
calicnm installed by the README's "Run it with systemd" steps: ``make install-systemd``,
an edited ``/etc/calicnm/calicnm.env``, ``systemctl enable calicnm docker``.  What
systemd itself must show: the node reaches ``active`` only through its ``READY=1``
(``Type=notify``), Docker is ordered after it and starts only once it is ready, a
``--restart always`` container comes back at its address after ``systemctl restart
docker``, ``systemctl restart calicnm``, a ``kill -9`` of the node (``Restart=always``)
and a reboot of the machine.  Everything is removed afterwards.

A restart of the node, by hand or by ``Restart=always`` after a crash, must leave Docker
and its containers running: the unit is only wanted by ``docker.service``, never
required (a required unit's restarts pass on to Docker, which stops every container, and
Docker's own ``StartLimitBurst=3`` in 60 s then leaves it failed after a few node
restarts; this test found that).
"""

from __future__ import annotations

import os
import shutil
from pathlib import Path

import pytest

from lab.cluster import wait_until
from lab.fabric import Fabric
from lab.images import DEFAULT_IMAGE, IMAGE_PATH_ENV
from lab.procs import NETNS_DIR, pids_with_arg
from lab.systemd_host import SystemdHost

NETWORK = "sdnet"
SUBNET = "192.168.7.0/24"
WEB_IP = "192.168.7.10"
PAGE = "served by calicnm under systemd"
SETTINGS = {
    "CALICNM_RESYNC_INTERVAL": "3",
    "CALICNM_RECONCILE_INTERVAL": "2",
    "CALICNM_PENDING_MAX_AGE": "15",
}


def _require() -> None:
    if os.geteuid() != 0:
        pytest.skip("needs root")
    for tool in ("debootstrap", "systemd-nspawn", "nsenter", "chroot"):
        if shutil.which(tool) is None:
            pytest.fail(f"{tool} is not installed (debootstrap, systemd-container, util-linux)")


def _fetch(host: SystemdHost) -> str:
    """The page at WEB_IP, fetched from a second container on the network ('' if none)."""
    out = host.run(
        [
            "docker",
            "run",
            "--rm",
            "--net",
            NETWORK,
            DEFAULT_IMAGE,
            "sh",
            "-c",
            f"busybox timeout 5 wget -q -O /tmp/f http://{WEB_IP}/index.html && cat /tmp/f",
        ],
        check=False,
        timeout=90,
    )
    return out.stdout.strip()


def _served(host: SystemdHost, what: str, timeout: float = 120) -> None:
    """The web container runs at WEB_IP and answers, within ``timeout`` s."""

    def web_ip() -> str:
        out = host.run(
            ["docker", "inspect", "-f", f"{{{{.NetworkSettings.Networks.{NETWORK}.IPAddress}}}}",
             "web"],
            check=False,
        )  # fmt: skip
        return out.stdout.strip()

    try:
        wait_until(lambda: web_ip() == WEB_IP, timeout, f"web at {WEB_IP} {what}", interval=1)
        wait_until(lambda: _fetch(host) == PAGE, timeout, f"web answering {what}", interval=1)
    except AssertionError as exc:
        exc.add_note(host.journal("calicnm", 40) + host.journal("docker", 20))
        raise


def _active(host: SystemdHost, unit: str, timeout: float = 120) -> dict[str, str]:
    """Wait until ``unit`` is active; its MainPID, NRestarts and timestamps."""

    def state() -> dict[str, str] | None:
        props = host.unit(
            unit, "ActiveState", "SubState", "MainPID", "NRestarts", "StatusText",
            "ActiveEnterTimestampMonotonic", "ExecMainStartTimestampMonotonic",
        )  # fmt: skip
        return props if props.get("ActiveState") == "active" else None

    try:
        got: dict[str, str] = wait_until(state, timeout, f"{unit} active", interval=1)
    except AssertionError as exc:
        exc.add_note(host.journal(unit, 40))
        raise
    return got


def _docker_invocation(host: SystemdHost) -> str:
    return host.unit("docker.service", "InvocationID")["InvocationID"]


def test_node_as_a_systemd_service(tmp_path: Path) -> None:
    _require()

    def check_docker_kept(invocation: str, what: str) -> None:
        assert _docker_invocation(host) == invocation, f"{what} restarted docker.service"

    with (
        Fabric() as fabric,
        SystemdHost(fabric, tmp_path / "machine", settings=SETTINGS) as host,
    ):
        # Boot: the node is active (READY=1 received), Docker too, and Docker started only
        # once the node was ready.
        assert host.run(["systemctl", "is-active", "calicnm", "docker"]).stdout.split() == [
            "active",
            "active",
        ]
        node = _active(host, "calicnm.service")
        docker = _active(host, "docker.service")
        assert node["StatusText"].startswith("serving Docker on "), node
        node_unit = host.unit("calicnm.service", "Type", "Before", "Restart")
        assert node_unit["Type"] == "notify"
        assert node_unit["Restart"] == "always"
        assert "docker.service" in node_unit["Before"].split()
        docker_deps = host.unit("docker.service", "After", "Wants", "Requires")
        assert "calicnm.service" in docker_deps["After"].split()
        assert "calicnm.service" in docker_deps["Wants"].split()
        assert "calicnm.service" not in docker_deps["Requires"].split()
        assert int(node["ActiveEnterTimestampMonotonic"]) <= int(
            docker["ExecMainStartTimestampMonotonic"]
        ), (node, docker)
        host.run(["calicnm", "status"])  # the CLI reads the same calicnm.env

        # The operator flow, through the host's own Docker.
        host.run(
            ["docker", "import", "-c", IMAGE_PATH_ENV, "/root/busybox.tar", DEFAULT_IMAGE],
            timeout=120,
        )
        host.run(
            ["docker", "network", "create", "-d", "calicnm", "--ipam-driver", "calicnm",
             "--subnet", SUBNET, NETWORK],
            timeout=120,
        )  # fmt: skip
        host.run(
            ["docker", "run", "-d", "--name", "web", "--restart", "always", "--stop-timeout",
             "2", "--net", NETWORK, "--ip", WEB_IP, DEFAULT_IMAGE, "sh", "-c",
             f"echo '{PAGE}' > /www/index.html && exec httpd -f -v -h /www"],
            timeout=120,
        )  # fmt: skip
        _served(host, "after docker run")

        # systemctl restart docker: the container comes back at its address.
        host.run(["systemctl", "restart", "docker"], timeout=180)
        _active(host, "docker.service")
        _served(host, "after systemctl restart docker")

        # systemctl restart calicnm: active again (a new READY=1), still served.
        before = _active(host, "calicnm.service")
        invocation = _docker_invocation(host)
        host.run(["systemctl", "restart", "calicnm"], timeout=180)
        after = _active(host, "calicnm.service")
        assert after["MainPID"] != before["MainPID"]
        _active(host, "docker.service")
        check_docker_kept(invocation, "systemctl restart calicnm")
        _served(host, "after systemctl restart calicnm")

        # kill -9 of the node: systemd restarts it (Restart=always) and it becomes ready.
        restarts = int(after["NRestarts"])
        invocation = _docker_invocation(host)
        host.run(["busybox", "kill", "-9", after["MainPID"]])
        wait_until(
            lambda: int(host.unit("calicnm.service", "NRestarts")["NRestarts"]) > restarts,
            60,
            "systemd restarting the killed node",
            interval=1,
        )
        again = _active(host, "calicnm.service")
        assert again["MainPID"] not in ("0", after["MainPID"]), again
        _active(host, "docker.service")
        check_docker_kept(invocation, "kill -9 of the node (Restart=always)")
        _served(host, "after kill -9 of the node")

        # A reboot: same disk, fresh kernel network state; the unit order brings the node up
        # before Docker, which restarts the container at the same address.
        host.reboot()
        boot_node = _active(host, "calicnm.service")
        boot_docker = _active(host, "docker.service")
        assert int(boot_node["ActiveEnterTimestampMonotonic"]) <= int(
            boot_docker["ExecMainStartTimestampMonotonic"]
        ), (boot_node, boot_docker)
        _served(host, "after a reboot")
        machine, cgroups, workdir = host.machine, host.cgroups, host.rootfs
        netns_names = {host.netns.name} if host.netns else set()
    # Nothing of the machine is left: processes, namespaces, cgroups, files.
    assert pids_with_arg(machine) == []
    assert not [n for n in netns_names if (NETNS_DIR / n).exists()]
    assert not [cg for cg in cgroups if cg.exists()]
    assert not workdir.exists()
