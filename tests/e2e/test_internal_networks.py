"""``docker network create --internal`` on calicnm: pool addresses only.

One emulated host whose node accepts containers' traffic to the host
(``CALICNM_ENDPOINT_TO_HOST_ACTION=accept``, so "cannot reach the host" is
the internal network's doing and not the default drop), and an "outside"
namespace on the fabric, a machine that is no calicnm host, serving HTTP
with a route back to the pool through the host (so an ordinary network's
container does reach it: the control).

Networks: ``open`` (ordinary) with ``open1``; ``inner`` (``--internal``)
with ``inner1`` and ``inner2``.  Every container serves "hello" on port 80.
Traffic only goes between these namespaces and containers.
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from lab.cluster import CalicnmHost, wait_until
from lab.fabric import Attachment, Fabric
from lab.procs import Process
from tests.e2e.helpers import fetch_from, sniffing, start_web

pytestmark = pytest.mark.skipif(os.geteuid() != 0, reason="needs root")

POOL = "192.168.0.0/16"
"""The default pool, which both networks use."""
HOST_PORT = 8099
GATEWAY = "169.254.1.1"


@dataclass
class Site:
    host: CalicnmHost
    outside: Attachment
    ips: dict[str, str]
    outside_log: Path
    host_log: Path


@pytest.fixture(scope="module")
def site(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Site]:
    workdir: Path = tmp_path_factory.mktemp("internal")
    www = workdir / "www"
    www.mkdir()
    (www / "index.html").write_text("hello\n")
    with Fabric() as fabric:
        att = fabric.add_host()
        env = {"CALICNM_ENDPOINT_TO_HOST_ACTION": "accept"}
        with CalicnmHost(att.host, att.address, workdir / "host1", "host1", extra_env=env) as host:
            outside = fabric.add_host()
            outside.host.run(["ip", "route", "add", POOL, "via", host.address])
            servers: list[Process] = []
            try:
                for ns, port, log in (
                    (outside.host, 80, workdir / "outside.log"),
                    (host.netns, HOST_PORT, workdir / "host-listener.log"),
                ):
                    argv = ["busybox", "httpd", "-f", "-v", "-p", str(port), "-h", str(www)]
                    servers.append(ns.process(argv, log).start())
                host.create_network("open")
                made = host.create_network("inner", "--internal")
                assert len(made) == 64, made
                ips = {
                    "open1": start_web(host, "open1", "open"),
                    "inner1": start_web(host, "inner1", "inner"),
                    "inner2": start_web(host, "inner2", "inner"),
                }
                wait_until(
                    lambda: fetch_from(host, "inner2", ips["inner1"]) == "hello",
                    20,
                    "inner2 -> inner1",
                )
                yield Site(
                    host, outside, ips, workdir / "outside.log", workdir / "host-listener.log"
                )
            finally:
                for server in servers:
                    server.stop()


def outside_url(site: Site) -> tuple[str, int]:
    return site.outside.address, 80


def test_docker_marks_the_network_internal(site: Site) -> None:
    assert site.host.docker("network", "inspect", "-f", "{{.Internal}}", "inner") == "true"
    assert site.host.docker("network", "inspect", "-f", "{{.Internal}}", "open") == "false"
    routes = site.host.docker("exec", "inner1", "ip", "route")
    print(f"routes in an internal network's container:\n{routes}")


def test_containers_on_an_internal_network_reach_each_other(site: Site) -> None:
    host = site.host
    assert fetch_from(host, "inner2", site.ips["inner1"]) == "hello"
    assert fetch_from(host, "inner1", site.ips["inner2"]) == "hello"
    out = host.docker_run("exec", "inner1", "ping", "-c", "1", "-W", "1", site.ips["inner2"])
    assert "1 packets received" in out.stdout, out.stdout


def test_an_ordinary_network_reaches_outside_and_the_host(site: Site) -> None:
    """The controls: what the internal network must not do works from ``open``."""
    host = site.host
    ip, port = outside_url(site)
    with sniffing(str(site.outside.host.path), ["eth0"], site.ips["open1"], ip, 4.0) as seen:
        assert fetch_from(host, "open1", ip, port) == "hello"
    assert seen["eth0"] >= 1, seen
    assert f"[::ffff:{site.ips['open1']}]" in site.outside_log.read_text(), "no NAT, no proxy"
    for addr in (host.address, GATEWAY):
        assert fetch_from(host, "open1", addr, HOST_PORT) == "hello", f"open1 -> {addr}"


def test_an_internal_network_reaches_neither_outside_nor_the_host(site: Site) -> None:
    host = site.host
    ip, port = outside_url(site)
    with sniffing(str(site.outside.host.path), ["eth0"], site.ips["inner2"], ip, 4.0) as seen:
        assert fetch_from(host, "inner2", ip, port) == ""
        out = host.docker_run("exec", "inner2", "ping", "-c", "1", "-W", "1", ip)
        assert "0 packets received" in out.stdout, out.stdout
    assert seen["eth0"] == 0, f"packets from inner2 reached the outside machine: {seen}"
    assert site.ips["inner2"] not in site.outside_log.read_text()
    for addr in (host.address, GATEWAY):
        assert fetch_from(host, "inner2", addr, HOST_PORT) == "", f"inner2 reached {addr}"
        out = host.docker_run("exec", "inner2", "ping", "-c", "1", "-W", "1", addr)
        assert "0 packets received" in out.stdout, f"inner2 pinged {addr}"
    assert site.ips["inner2"] not in site.host_log.read_text()


def test_an_internal_network_reaches_other_pool_addresses_its_policy_allows(site: Site) -> None:
    """ "Pool addresses only" is a ceiling, not a floor: the other network's
    profile decides, as for any container."""
    host = site.host
    assert fetch_from(host, "inner2", site.ips["open1"]) == "", "open's profile denies inner"
    rule = ["profile", "open", "rule", "add", "inbound", "allow", "from", "tag", "inner"]
    host.calicnm(*rule)
    try:
        assert wait_until(
            lambda: fetch_from(host, "inner2", site.ips["open1"]) == "hello",
            10,
            "inner2 -> open1 once open allows the inner tag",
        )
    finally:
        host.calicnm(*["remove" if w == "add" else w for w in rule])
    wait_until(
        lambda: fetch_from(host, "inner2", site.ips["open1"], seconds=1) == "",
        10,
        "inner2 denied again",
    )
