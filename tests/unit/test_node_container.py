"""``calicnm node run --container``'s request to Docker, the node image's iptables
backend choice, and the driver name cluster networks are created with."""

from __future__ import annotations

import os
import stat
from pathlib import Path

import pytest

from calicnm.config import Config
from calicnm.errors import DataplaneError
from calicnm.host.iptables import detect_backend
from calicnm.model import ClusterNetwork
from calicnm.node.cluster_networks import docker_spec
from calicnm.node.node_container import node_container_spec


def load(env: dict[str, str], tmp_path: Path) -> tuple[Config, dict[str, str]]:
    return Config.load(None, {"CALICNM_CONFIG_FILE": str(write(tmp_path, "")), **env})


def write(tmp_path: Path, text: str) -> Path:
    path = tmp_path / "calicnm.env"
    path.write_text(text)
    return path


def test_the_node_container_gets_the_given_settings_and_the_host_paths(tmp_path: Path) -> None:
    path = write(
        tmp_path,
        "ETCD_ENDPOINTS=https://10.0.0.1:2379\n"
        "ETCD_TRUSTED_CA_FILE=/etc/calicnm/ca.pem\n"
        "CALICNM_STATE_DIR=/srv/calicnm\n",
    )
    config, sources = Config.load(
        None,
        {
            "CALICNM_CONFIG_FILE": str(path),
            "CALICNM_HOSTNAME": "h7",
            "DOCKER_HOST": "unix:///d.sock",
        },
    )
    spec = node_container_spec(config, sources, "calicnm/node:1")
    env = dict(item.split("=", 1) for item in spec["Env"])
    assert env == {
        "ETCD_ENDPOINTS": "https://10.0.0.1:2379",
        "ETCD_TRUSTED_CA_FILE": "/etc/calicnm/ca.pem",
        "CALICNM_HOSTNAME": "h7",
        "CALICNM_STATE_DIR": "/srv/calicnm",
        "CALICNM_SOCKET": "/run/docker/plugins/calicnm.sock",
        "DOCKER_HOST": "unix:///var/run/docker.sock",
    }
    host = spec["HostConfig"]
    assert host["Binds"] == [
        "/srv/calicnm:/srv/calicnm",
        "/run/docker/plugins:/run/docker/plugins",
        "/run/xtables.lock:/run/xtables.lock",
        "/d.sock:/var/run/docker.sock",
        "/etc/calicnm/ca.pem:/etc/calicnm/ca.pem:ro",
    ]
    assert host["NetworkMode"] == "host" and host["UTSMode"] == "host"
    assert host["RestartPolicy"] == {"Name": "always"}
    assert sorted(host["CapAdd"]) == ["NET_ADMIN", "NET_RAW"]
    assert "Privileged" not in host
    assert host["MaskedPaths"] == [] and host["ReadonlyPaths"] == []
    assert spec["Image"] == "calicnm/node:1" and spec["Cmd"] == ["node", "run"]


def test_defaults_are_left_to_the_image(tmp_path: Path) -> None:
    config, sources = load({"CALICNM_HOSTNAME": "h1"}, tmp_path)
    env = dict(item.split("=", 1) for item in node_container_spec(config, sources, "i")["Env"])
    assert "CALICNM_IPTABLES_BACKEND" not in env and "CALICNM_LOG_LEVEL" not in env
    config, sources = load({"CALICNM_HOSTNAME": "h1", "FELIX_IPTABLESBACKEND": "Legacy"}, tmp_path)
    env = dict(item.split("=", 1) for item in node_container_spec(config, sources, "i")["Env"])
    assert env["CALICNM_IPTABLES_BACKEND"] == "Legacy"


def test_a_tcp_docker_host_is_passed_as_is(tmp_path: Path) -> None:
    config, sources = load({"DOCKER_HOST": "tcp://127.0.0.1:2375"}, tmp_path)
    spec = node_container_spec(config, sources, "i")
    assert "DOCKER_HOST=tcp://127.0.0.1:2375" in spec["Env"]
    assert not any(b.endswith(":/var/run/docker.sock") for b in spec["HostConfig"]["Binds"])


# ---- the iptables backend -------------------------------------------------------


@pytest.fixture
def fake_iptables(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """A PATH holding stand-in iptables tools; each ``*-save`` prints the rules written
    to ``rules-<suffix>``, ``iptables --version`` names the ``mode`` file's backend."""
    bindir = tmp_path / "bin"
    bindir.mkdir()
    for suffix in ("legacy", "nft"):
        for tool in ("", "-save", "-restore"):
            name = bindir / f"iptables-{suffix}{tool}"
            body = f'/bin/cat "{tmp_path}/rules-{suffix}" 2>/dev/null\n' if tool == "-save" else ""
            name.write_text(f"#!/bin/sh\n{body}")
            name.chmod(name.stat().st_mode | stat.S_IEXEC)
    version = bindir / "iptables"
    version.write_text(f'#!/bin/sh\necho "iptables v1.8.9 ($(/bin/cat {tmp_path}/mode))"\n')
    version.chmod(version.stat().st_mode | stat.S_IEXEC)
    (tmp_path / "mode").write_text("nf_tables")
    monkeypatch.setenv("PATH", str(bindir))
    return tmp_path


def test_auto_takes_the_backend_holding_dockers_rules(fake_iptables: Path) -> None:
    (fake_iptables / "rules-legacy").write_text("*filter\n-A FORWARD -j DOCKER-USER\n")
    assert detect_backend("auto").name == "legacy"
    assert detect_backend("host").name == "nf_tables"
    (fake_iptables / "rules-nft").write_text("-A FORWARD -j A\n-A FORWARD -j B\n")
    assert detect_backend("auto").name == "nf_tables"


def test_auto_falls_back_to_the_host_command_on_a_tie(fake_iptables: Path) -> None:
    (fake_iptables / "mode").write_text("legacy")
    assert detect_backend("auto").name == "legacy"
    assert detect_backend("nft").restore.endswith("iptables-nft-restore")


def test_an_unknown_backend_is_refused(fake_iptables: Path) -> None:
    with pytest.raises(DataplaneError, match="not one of host, auto, nft, legacy"):
        detect_backend("xtables")
    os.unlink(fake_iptables / "bin" / "iptables-legacy-restore")
    with pytest.raises(DataplaneError, match="iptables-legacy is not installed"):
        detect_backend("legacy")


def test_cluster_networks_use_the_driver_name_docker_knows() -> None:
    net = ClusterNetwork(name="dataman")
    spec = docker_spec(net, "calicnm/calicnm:latest")
    assert spec["Driver"] == spec["IPAM"]["Driver"] == "calicnm/calicnm:latest"
    assert docker_spec(net)["Driver"] == "calicnm"
