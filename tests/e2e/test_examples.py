"""The examples in ``examples/`` as an operator uses them.

- The compose file runs with Debian's ``docker-compose`` against an emulated host:
  its services reach each other by name through Docker's embedded DNS, a plain
  ``docker run --net dataman`` container shares their network and profile, and
  ``down`` leaves nothing behind.
- The Marathon apps name the network in both of Marathon's forms.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
from pathlib import Path

import pytest

from lab.cluster import CalicnmHost, wait_until
from lab.images import DEFAULT_IMAGE as IMG
from lab.paths import REPO
from tests.e2e.helpers import assert_nothing_left

EXAMPLES = REPO / "examples"


def compose(host: CalicnmHost, *args: str) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, **host.dockerd.client_env(), "IMAGE": IMG}
    env["DOCKER_HOST"] = f"unix://{host.dockerd.sock}"
    return subprocess.run(
        ["docker-compose", "-f", str(EXAMPLES / "compose/docker-compose.yml"), "-p", "demo", *args],
        capture_output=True,
        text=True,
        env=env,
        timeout=180,
    )


@pytest.mark.skipif(shutil.which("docker-compose") is None, reason="needs docker-compose")
def test_the_compose_example_runs_and_names_resolve(host: CalicnmHost) -> None:
    host.calicnm("pool", "add", "10.88.0.0/24")
    try:
        up = compose(host, "up", "-d")
        assert up.returncode == 0, up.stderr
        inspect = json.loads(host.docker("network", "inspect", "dataman"))[0]
        assert inspect["Driver"] == "calicnm" and inspect["IPAM"]["Driver"] == "calicnm"
        fetched = wait_until(
            lambda: (
                compose(
                    host, "exec", "-T", "client", "wget", "-q", "-O", "-", "http://web/index.html"
                ).stdout.strip()
                == "hello"
            ),
            60,
            "the client to reach web by its service name",
        )
        assert fetched
        # A container started by hand on the same network: same profile, same DNS.
        plain = host.docker_run(
            "run",
            "--rm",
            "--net",
            "dataman",
            IMG,
            "sh",
            "-c",
            "nslookup web 127.0.0.11 | grep -q 10.88.0. && "
            "busybox timeout 5 wget -q -O - http://web/index.html",
        )
        assert plain.stdout.strip() == "hello", plain.stderr
        endpoints = json.loads(host.calicnm("endpoint", "show", "--json").stdout)
        assert len(endpoints) == 2
        assert {ep["profile"] for ep in endpoints} == {"dataman"}
    finally:
        down = compose(host, "down")
        assert down.returncode == 0, down.stderr
        host.calicnm("pool", "remove", "10.88.0.0/24", check=False)
    assert_nothing_left(host)


@pytest.mark.parametrize("name", ["marathon-app.json", "marathon-app-networks.json"])
def test_the_marathon_apps_name_the_network(name: str) -> None:
    app = json.loads((EXAMPLES / name).read_text())
    docker = app["container"]["docker"]
    named = [p["value"] for p in docker.get("parameters", []) if p["key"] == "net"]
    named += [n["name"] for n in app.get("networks", []) if n.get("mode") == "container"]
    assert named == ["dataman"]


def test_the_walkthrough_exists() -> None:
    text = (EXAMPLES / "multi-host-tls.md").read_text()
    for step in ("make install-systemd", "ETCD_CERT_FILE", "docker network create"):
        assert step in text
    assert Path(EXAMPLES / "compose/docker-compose.yml").exists()
