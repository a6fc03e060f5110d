"""The node image and the managed plugin, run the way README tells an operator to.

The image is built once for the module with the repository's own scripts (debootstrap
base, ``docker import``, ``docker build``; no registry).  Then:

- the walkthrough (``docs/walkthrough.md``): three bare hosts with only Docker, a
  settings file each, ``calicnm node run --container``, the network defined once with
  ``calicnm network create dataman``, and ``docker run --net dataman`` on every host;
  a host's dockerd restart brings the node container and a ``--restart always``
  container back at its address;
- the managed plugin: ``docker plugin create``, ``set``, ``enable``, then the operator
  flow with ``-d calicnm/calicnm:latest --ipam-driver calicnm/calicnm:latest``, isolation
  between networks, a cluster network created with the plugin's driver name, a dockerd
  restart, and nothing left after the containers and networks are removed.
"""

from __future__ import annotations

import contextlib
import json
from collections.abc import Iterator
from pathlib import Path

import pytest

from lab.cluster import CalicnmHost, wait_until
from lab.etcd import FABRIC_ETCD_URL, fabric_etcd
from lab.fabric import Fabric
from lab.node_image import (
    NODE_CONTAINER,
    PLUGIN_DRIVER,
    ContainerNodeHost,
    ManagedPluginHost,
    NodeBuild,
    build_node_image,
)
from tests.e2e.helpers import http_ok, start_web
from tests.e2e.test_lost_undo_calls import check

SUBNET = "192.168.200.0/24"
WEB2_IP = "192.168.200.20"
WEB_IP = "192.168.200.30"


@pytest.fixture(scope="module")
def build(tmp_path_factory: pytest.TempPathFactory) -> NodeBuild:
    return build_node_image(tmp_path_factory.mktemp("node-image"))


@pytest.fixture
def fabric(tmp_path: Path) -> Iterator[Fabric]:
    """A fabric with the datacenter etcd on it."""
    with Fabric() as fab:
        etcd = fabric_etcd(fab, tmp_path)
        try:
            yield fab
        finally:
            etcd.stop()


def networks(host: CalicnmHost) -> dict[str, str]:
    rows = host.docker("network", "ls", "--format", "{{.Name}} {{.Driver}}").splitlines()
    return dict(row.split() for row in rows)


def running(host: CalicnmHost, name: str) -> bool:
    return host.docker("inspect", "-f", "{{.State.Running}}", name) == "true"


def restart_docker(
    host: CalicnmHost, web: str, ip: str, client: CalicnmHost, node_container: bool = False
) -> None:
    """``systemctl restart docker`` on ``host``: its node (container or managed plugin)
    answers again, ``web`` runs again at its ``--ip``, and ``client`` reaches it.

    The managed plugin outlives Docker's containers, so Docker restarts ``web`` itself.
    The node container stops with them: Docker's cleanup of ``web``'s old endpoint may
    find no plugin, and the old endpoint then holds the address until the node's
    ownership collector removes it, so Docker may give up on ``web``.  README says so,
    and says that ``docker start`` then brings it back; that is what happens here."""
    host.dockerd.stop_daemon()
    host.dockerd.start_daemon()
    wait_until(host.answering, 90, f"{host.hostname}'s node back")
    if node_container:

        def started() -> bool:
            if running(host, web):
                return True
            host.docker_run("start", web)
            return running(host, web)

        wait_until(started, 90, f"{web} running again", interval=3)
    else:
        wait_until(lambda: running(host, web), 90, f"{web} restarted by dockerd")
    assert host.ip_of(web, "dataman") == ip
    wait_until(lambda: http_ok(client, "dataman", ip), 60, f"{web} reachable again")


def test_walkthrough_three_hosts(build: NodeBuild, fabric: Fabric, tmp_path: Path) -> None:
    with contextlib.ExitStack() as stack:
        hosts: list[CalicnmHost] = []
        for i in (1, 2, 3):
            att = fabric.add_host()
            host = ContainerNodeHost(
                att.host,
                att.address,
                tmp_path / f"host{i}",
                f"host{i}",
                FABRIC_ETCD_URL,
                build=build,
            )
            hosts.append(stack.enter_context(host))
        host1, host2, host3 = hosts
        for host in hosts:
            status = json.loads(host.calicnm("status", "--json").stdout)
            assert status["ok"] is True, status
            running = host.docker("inspect", "-f", "{{.State.Running}}", NODE_CONTAINER)
            assert running == "true"
            # The settings file reached the node inside the container.
            env = host.docker("inspect", "-f", "{{json .Config.Env}}", NODE_CONTAINER)
            assert f"CALICNM_HOSTNAME={host.hostname}" in json.loads(env)
        again = host1.calicnm("node", "run", "--container", check=False)
        assert again.returncode == 1
        assert again.stderr.strip() == (
            f"calicnm: error: container {NODE_CONTAINER} is already running; "
            f"remove it first (docker rm -f {NODE_CONTAINER})"
        )

        host1.calicnm("network", "create", "dataman", "--subnet", SUBNET)
        wait_until(
            lambda: all(networks(h).get("dataman") == "calicnm" for h in hosts),
            30,
            "dataman on every host's Docker",
        )
        ip2 = start_web(host2, "web2", "dataman", "--restart", "always", "--ip", WEB2_IP)
        assert ip2 == WEB2_IP
        ip3 = start_web(host3, "web3", "dataman")
        wait_until(lambda: http_ok(host1, "dataman", ip2), 60, "host1 reaches web2")
        assert http_ok(host1, "dataman", ip3)
        assert http_ok(host3, "dataman", ip2)

        # systemctl restart docker on host2: the node container (restart always) and
        # web2 come back, web2 at its --ip (without --ip, Docker keeps no address).
        restart_docker(host2, "web2", ip2, client=host1, node_container=True)

        for host in hosts:
            assert isinstance(host, ContainerNodeHost)
            host.remove_workloads()
        host1.calicnm("network", "remove", "dataman")
        wait_until(lambda: all("dataman" not in networks(h) for h in hosts), 30, "dataman removed")
        for host in hosts:
            wait_until(lambda h=host: check(h)["ok"] is True, 30, f"{host.hostname} clean")
            assert host.links("cali") == []


def test_managed_plugin(build: NodeBuild, fabric: Fabric, tmp_path: Path) -> None:
    att = fabric.add_host()
    with ManagedPluginHost(
        att.host, att.address, tmp_path / "mp1", "mp1", FABRIC_ETCD_URL, build=build
    ) as host:
        plugins = host.docker("plugin", "ls", "--format", "{{.Name}} {{.Enabled}}")
        assert plugins.splitlines() == [f"{PLUGIN_DRIVER} true"]
        status = json.loads(host.calicnm("status", "--json").stdout)
        assert status["ok"] is True, status
        assert sorted(status["plugin"]["implements"]) == ["IpamDriver", "NetworkDriver"]
        # This host's Docker has the plugin but not the node image.
        missing = host.calicnm("node", "run", "--container", check=False)
        assert missing.returncode == 1
        assert missing.stderr.strip() == (
            "calicnm: error: image calicnm/node:latest is not on this Docker; "
            "build it with 'make image'"
        )

        host.create_network("dataman", "--subnet", SUBNET)
        host.create_network("other")
        ip = start_web(host, "web", "dataman", "--restart", "always", "--ip", WEB_IP)
        assert http_ok(host, "dataman", ip)
        assert not http_ok(host, "other", ip)  # another network's profile: denied

        # A network defined once is created with the plugin's own driver name.
        host.calicnm("network", "create", "shared")
        wait_until(lambda: networks(host).get("shared") == PLUGIN_DRIVER, 30, "shared created")

        # systemctl restart docker: Docker enables the plugin again, web comes back.
        restart_docker(host, "web", ip, client=host)

        host.docker("rm", "-f", "web")
        host.calicnm("network", "remove", "shared")
        for name in ("dataman", "other"):
            host.docker("network", "rm", name)
        wait_until(lambda: "shared" not in networks(host), 30, "shared removed")
        wait_until(lambda: check(host)["ok"] is True, 30, "nothing orphaned")
        assert host.links("cali") == []
