"""The node's life on a real host: a second node refuses and harms nothing, an
empty etcd never wipes a running host, and a rolling restart never breaks a
cross-host stream."""

from __future__ import annotations

import shutil
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from lab.cluster import CalicnmHost, Cluster, cluster, single_host, wait_until
from lab.etcd import fabric_etcd
from lab.images import DEFAULT_IMAGE as IMG
from lab.paths import CALICNM
from tests.e2e.helpers import start_web


def test_a_second_node_refuses_and_the_first_keeps_serving(tmp_path: Path) -> None:
    with single_host(tmp_path, "solo") as host:
        host.create_network("one")
        before = host.netns.run(["iptables-save", "-t", "filter"]).stdout
        # Same state directory (systemd plus a manual start): the lock refuses.
        second = host.netns.run(
            [CALICNM, "node", "run", "--ip", host.address],
            check=False,
            env=host.env(),
            timeout=60,
        )
        assert second.returncode == 1
        assert "another calicnm node" in second.stderr
        # Another state directory, the same socket: the live socket refuses.
        other = {**host.env(), "CALICNM_STATE_DIR": str(tmp_path / "other-state")}
        third = host.netns.run(
            [CALICNM, "node", "run", "--ip", host.address], check=False, env=other, timeout=60
        )
        assert third.returncode == 1
        assert "already serving" in third.stderr
        # The first node is untouched: its socket answers and Docker uses it.
        assert host.answering()
        assert host.node is not None and host.node.is_running()
        host.docker("run", "--rm", "--net", "one", IMG, "true")
        assert "cali" in host.netns.run(["iptables-save", "-t", "filter"]).stdout
        assert before.count("-A calicnm-FORWARD") == host.netns.run(
            ["iptables-save", "-t", "filter"]
        ).stdout.count("-A calicnm-FORWARD")


def kernel_state(host: CalicnmHost) -> dict[str, str]:
    """What an empty datastore would wipe: chains, sets, routes, BIRD's config."""
    run = host.netns.run
    bird = host.state_dir / "bird.conf"

    def saved(table: str) -> str:  # without the timestamped comment lines
        out = run(["iptables-save", "-t", table]).stdout
        return "".join(line for line in out.splitlines(True) if not line.startswith("#"))

    return {
        "filter": saved("filter"),
        "nat": saved("nat"),
        "ipsets": run(["ipset", "save"]).stdout,
        "routes": run(["ip", "-4", "route", "show", "table", "all"]).stdout,
        "bird.conf": bird.read_text() if bird.exists() else "",
    }


def test_an_empty_etcd_leaves_the_kernel_as_it_was_until_confirmed(tmp_path: Path) -> None:
    with cluster(tmp_path / "c", 1) as c:
        host = c.hosts[0]
        host.create_network("kept")
        web = start_web(host, "kept1", "kept")
        wait_until(lambda: host.calicnm("status", check=False).returncode == 0, 20, "healthy")
        before = kernel_state(host)
        assert web in before["routes"]

        # The datastore is replaced by an empty one at the same address.
        assert c.etcd is not None
        c.etcd.stop()
        shutil.rmtree(tmp_path / "c" / "etcd")
        c.etcd = fabric_etcd(c.fabric, tmp_path / "c")
        status = wait_until(
            lambda: (
                (out := host.calicnm("status", check=False)).returncode == 1
                and "not the one this host served" in out.stdout
                and out
            ),
            30,
            "the agent reports the foreign datastore",
        )
        assert "calicnm agent is NOT healthy" in status.stdout
        time.sleep(4)  # several resync periods (3 s in the lab) go by
        assert kernel_state(host) == before, "the empty etcd changed the kernel"
        # Docker calls are refused too: nothing is allocated in the wrong datastore.
        refused = host.docker_run("run", "--rm", "--net", "kept", IMG, "true")
        assert refused.returncode != 0

        # A restart alone still refuses; confirming adopts the new datastore.
        host.stop_node()
        failed = host.netns.run(
            [CALICNM, "node", "run", "--ip", host.address], check=False, env=host.env()
        )
        assert failed.returncode == 1 and "--accept-new-datastore" in failed.stderr
        assert kernel_state(host)["filter"] == before["filter"]
        host.extra_env["CALICNM_ACCEPT_NEW_DATASTORE"] = "true"
        host.start_node()
        del host.extra_env["CALICNM_ACCEPT_NEW_DATASTORE"]
        assert wait_until(
            lambda: host.calicnm("status", check=False).returncode == 0, 20, "healthy again"
        )
        host.docker("rm", "-f", "kept1")


@pytest.fixture(scope="module")
def three(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Cluster]:
    with cluster(tmp_path_factory.mktemp("rolling"), 3) as c:
        yield c


def test_a_rolling_restart_keeps_a_cross_host_stream(three: Cluster) -> None:
    a, b, _c = three.hosts
    for host in three.hosts:
        host.create_network("roll")
    a.docker(
        "run", "-d", "--net", "roll", "--name", "sink", IMG,
        "sh", "-c", "nc -l -p 9000 > /tmp/got; echo done >> /tmp/got; sleep 1000",
    )  # fmt: skip
    sink = a.ip_of("sink", "roll")
    lines = 120
    # The source sends a line every 0.1 s for 12 s from B; the sink on A keeps them.
    b.docker(
        "run", "-d", "--net", "roll", "--name", "source", IMG, "sh", "-c",
        # nc -e: the loop writes straight into the connection (busybox nc
        # reading a pipe stops after its first read).
        f"sleep 1; nc {sink} 9000 -e sh -c "
        f"'i=0; while [ $i -lt {lines} ]; do echo line$i; i=$((i+1)); sleep 0.1; done'",
    )  # fmt: skip
    time.sleep(4)  # the stream is flowing
    for host in (a, b):  # both ends of the stream, one after the other
        assert host.stop_node() == 0
        time.sleep(1)
        host.start_node()
    assert b.docker("wait", "source", timeout=60) == "0", "the source's nc failed"
    got = wait_until(
        lambda: "done" in (text := a.docker("exec", "sink", "cat", "/tmp/got")) and text,
        20,
        "the sink saw the end of the stream",
    )
    received = [line for line in got.splitlines() if line.startswith("line")]
    assert received == [f"line{i}" for i in range(lines)], "the stream broke or lost lines"
    a.docker("rm", "-f", "sink")
    b.docker("rm", "-f", "source")
