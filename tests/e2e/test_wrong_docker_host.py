"""A node whose ``DOCKER_HOST`` names another daemon never learns the names of the
networks its containers use, so their profiles are missing and their traffic is
dropped.  That must not be silent: the node logs a warning and ``calicnm status``
names the network and what to check."""

from __future__ import annotations

import json
from pathlib import Path

from lab.cluster import single_host, wait_until
from lab.images import DEFAULT_IMAGE as IMG


def test_status_names_a_network_docker_does_not_know(tmp_path: Path) -> None:
    elsewhere = {"DOCKER_HOST": f"unix://{tmp_path / 'another-docker.sock'}"}
    with single_host(tmp_path / "host", extra_env=elsewhere) as host:
        network_id = host.create_network("dataman")
        host.docker("run", "-d", "--name", "web", "--net", "dataman", IMG, "sleep", "600")

        def problems() -> list[str]:
            data = json.loads(host.calicnm("status", "--json", check=False).stdout)
            found: list[str] = data.get("problems", [])
            return found

        found = wait_until(problems, 60, "a problem line in status")
        assert any(network_id[:12] in p and "DOCKER_HOST" in p for p in found), found
        text = host.calicnm("status", check=False).stdout
        assert f"PROBLEM: network {network_id[:12]}" in text
        log = (host.workdir / "node.log").read_text()
        assert f"network {network_id[:12]} has endpoints on this host but no name" in log
