"""The same-host fast path under faults: the node killed (-9) in the one window where
the fast path and the chains disagree, and the kernel left behind by a node that ran
with the fast path and restarts without it."""

from __future__ import annotations

import subprocess
from collections.abc import Iterator
from pathlib import Path

import pytest

from lab.cluster import CalicnmHost, single_host, wait_until
from lab.images import DEFAULT_IMAGE as IMG
from tests.e2e.conftest import require_e2e
from tests.e2e.helpers import assert_nothing_left, fast_path_counts

SERVE = "echo hello > /www/index.html; httpd -p 22 -h /www; exec httpd -f -p 80 -h /www"


def http(host: CalicnmHost, src: str, ip: str, port: int) -> bool:
    out = host.docker_run(
        "exec",
        src,
        "sh",
        "-c",
        f"rm -f /tmp/f; busybox timeout 2 wget -q -O /tmp/f http://{ip}:{port}/index.html"
        " && cat /tmp/f",
    )
    return out.stdout.strip() == "hello"


def restart(host: CalicnmHost, **env: str | None) -> None:
    """Start the node again (after it died) with ``env`` changed in its settings."""
    wait_until(lambda: not host.answering(), 20, "the plugin to go")
    subprocess.run(["pkill", "-f", "--", f"--data-dir {host.state_dir}/etcd"], check=False)
    if host.socket.exists():
        host.socket.unlink()
    for name, value in env.items():
        if value is None:
            host.extra_env.pop(name, None)
        else:
            host.extra_env[name] = value
    host.start_node()


@pytest.fixture
def pair(tmp_path: Path) -> Iterator[tuple[CalicnmHost, str]]:
    """A host with the fast path, and web (httpd on 80 and 22) and peer on network fp."""
    require_e2e()
    with single_host(tmp_path, extra_env={"CALICNM_DATAPATH": "bpf"}) as host:
        host.create_network("fp")
        host.docker("run", "-d", "--net", "fp", "--name", "web", IMG, "sh", "-c", SERVE)
        host.docker("run", "-d", "--net", "fp", "--name", "peer", IMG, "sleep", "1000")
        web = host.ip_of("web", "fp")
        try:
            wait_until(lambda: http(host, "peer", web, 80), 15, "peer reaches web")
            yield host, web
        finally:
            if not host.answering():
                restart(host, CALICNM_FAULT=None)
            host.docker("rm", "-f", "web", "peer", check=False)
            host.docker("network", "rm", "fp", check=False)
            assert_nothing_left(host)


def test_kill_9_after_the_pair_left_the_fast_path_never_opens_it(pair):
    host, web = pair
    before = fast_path_counts(host)
    assert before is not None and http(host, "peer", web, 80)
    assert fast_path_counts(host)[0] > before[0], "the open pair takes the fast path"

    # Arm the fault, then put a deny ahead of the defaults: the next pass takes the
    # pair out of the fast path and dies before it writes the chains.
    host.stop_node()
    restart(host, CALICNM_FAULT="after-fast-path-withdraw")
    host.calicnm(
        "profile", "fp", "rule", "add", "inbound", "--at=1", "deny", "tcp", "to", "ports", "22"
    )
    wait_until(lambda: not host.node.is_running(), 20, "the node killed at the fault point")

    # While it is dead: nothing is handed across any more; the old chains decide.
    dead = fast_path_counts(host)
    assert http(host, "peer", web, 80)
    assert fast_path_counts(host)[0] == dead[0]

    # Restarted: the deny holds, the rest is allowed, and still by the chains.
    restart(host, CALICNM_FAULT=None)
    wait_until(lambda: not http(host, "peer", web, 22), 15, "port 22 denied")
    assert http(host, "peer", web, 80)
    assert fast_path_counts(host)[0] == dead[0]

    # The rule removed: the pair is open again and back on the fast path.
    host.calicnm("profile", "fp", "rule", "remove", "inbound", "--at=1")
    wait_until(lambda: http(host, "peer", web, 22), 15, "port 22 allowed again")
    wait_until(
        lambda: http(host, "peer", web, 80) and fast_path_counts(host)[0] > dead[0],
        15,
        "the pair back on the fast path",
    )


def test_a_node_restarted_without_the_fast_path_removes_it(pair):
    host, web = pair
    assert any(host.bpf_dir.iterdir())
    host.stop_node()
    restart(host, CALICNM_DATAPATH="iptables")
    assert not host.bpf_dir.exists(), "pins removed"
    links = host.netns.run(["ip", "-o", "link", "show"]).stdout
    for name in [line.split(": ")[1].split("@")[0] for line in links.splitlines()]:
        if name.startswith("cali"):
            shown = host.netns.run(["tc", "filter", "show", "dev", name, "ingress"]).stdout
            assert "calicnm_fast" not in shown, name
    assert http(host, "peer", web, 80) and "data path: iptables\n" in host.calicnm("status").stdout
