"""Networks defined once for the cluster: ``calicnm network create`` puts the network
on every host's Docker, a host that joins later gets it too, and ``network remove``
takes it away where no container uses it and reports where one does."""

from __future__ import annotations

import contextlib
import json
import time
from pathlib import Path
from typing import Any

from lab.cluster import CalicnmHost, Cluster, wait_until
from lab.images import DEFAULT_IMAGE as IMG


def has(host: CalicnmHost, name: str) -> bool:
    names = host.docker("network", "ls", "--format", "{{.Name}} {{.Driver}}").splitlines()
    return f"{name} calicnm" in names


def show(host: CalicnmHost) -> dict[str, Any]:
    rows = json.loads(host.calicnm("network", "show", "--json").stdout)
    return {row["name"]: row for row in rows}


def test_defined_once_present_everywhere_removed_where_unused(tmp_path: Path) -> None:
    with Cluster(tmp_path, 2) as cluster, contextlib.ExitStack() as stack:
        host1, host2 = cluster.hosts
        host1.calicnm("network", "create", "dataman", "--subnet", "192.168.200.0/24")
        began = time.monotonic()
        wait_until(lambda: has(host1, "dataman") and has(host2, "dataman"), 10, "on both hosts")
        print(f"on both hosts after {time.monotonic() - began:.1f}s")
        refused = host2.calicnm("network", "create", "dataman", check=False)
        assert refused.returncode == 1 and "already defined" in refused.stderr

        att = cluster.fabric.add_host()
        host3 = stack.enter_context(
            CalicnmHost(att.host, att.address, tmp_path / "host3", "host3", cluster.etcd_url)
        )
        wait_until(lambda: has(host3, "dataman"), 15, "on the host that joined later")

        host1.docker("run", "-d", "--name", "web", "--net", "dataman", IMG, "sleep", "600")
        host3.docker("run", "--rm", "--net", "dataman", IMG, "true")
        endpoints = json.loads(host1.calicnm("endpoint", "show", "--json").stdout)
        assert [ep["profile"] for ep in endpoints] == ["dataman"]
        assert endpoints[0]["ipv4_nets"][0].startswith("192.168.200.")
        states = show(host1)["dataman"]["hosts"]
        assert {h: s["state"] for h, s in states.items()} == {
            "host1": "present",
            "host2": "present",
            "host3": "present",
        }

        host1.calicnm("network", "remove", "dataman")
        wait_until(
            lambda: not has(host2, "dataman") and not has(host3, "dataman"),
            15,
            "removed where unused",
        )
        row = wait_until(
            lambda: (
                (r := show(host1).get("dataman")) and r["hosts"]["host1"]["state"] == "in-use" and r
            ),
            15,
            "host1 reporting its container",
        )
        assert row["defined"] is False and has(host1, "dataman")
        text = host1.calicnm("network", "show").stdout
        assert "dataman (removed)" in text and "in-use" in text
        host1.docker("rm", "-f", "web")
        wait_until(lambda: not has(host1, "dataman"), 30, "removed once its container left")
        wait_until(lambda: "dataman" not in show(host1), 15, "no report left")
