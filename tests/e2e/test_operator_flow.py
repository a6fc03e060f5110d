"""The single-host operator flow, line by line, against a real dockerd and etcd.

Traffic only goes between containers of the emulated host built here.
"""

from __future__ import annotations

import json
import re

import pytest

from lab.cluster import CalicnmHost, wait_until
from lab.images import DEFAULT_IMAGE
from tests.e2e.helpers import assert_nothing_left, http_ok, start_web

IMG = DEFAULT_IMAGE


def test_operator_flow(host: CalicnmHost) -> None:
    # calicnm pool add / pool show (table and --json); the default pool exists too.
    assert "Added pool 10.0.0.0/26" in host.calicnm("pool", "add", "10.0.0.0/26").stdout
    table = host.calicnm("pool", "show").stdout
    assert re.search(r"\|\s+10\.0\.0\.0/26\s+\|", table)
    assert re.search(r"\|\s+192\.168\.0\.0/16\s+\|", table)
    pools = json.loads(host.calicnm("pool", "show", "--json").stdout)
    assert {p["cidr"] for p in pools} == {"10.0.0.0/26", "192.168.0.0/16"}

    # docker network create (no subnet, and with --subnet)
    host.create_network("dataman")
    host.create_network("tenant2", "--subnet", "10.0.0.0/26")

    # Docker's own FORWARD policy may be DROP; routed traffic must not care.
    host.netns.run(["iptables", "-P", "FORWARD", "DROP"])

    # docker run -d --net dataman --name web ... httpd
    web_ip = start_web(host, "web", "dataman")
    assert web_ip.startswith("192.168."), "dataman stays out of tenant2's subnet"
    # Only lo and eth0 inside: no docker_gwbridge interface.
    links = host.docker("exec", "web", "ip", "-o", "link")
    assert [line.split(":")[1].strip().split("@")[0] for line in links.splitlines()] == [
        "lo",
        "eth0",
    ]
    routes = host.docker("exec", "web", "ip", "route")
    assert "default via 169.254.1.1 dev eth0" in routes
    assert "169.254.1.1 dev eth0 scope link" in routes
    assert f"inet {web_ip}/32" in host.docker("exec", "web", "ip", "-4", "addr", "show", "eth0")

    # docker run --rm --net dataman ... wget http://<web's IP>/  works, no NAT.
    client = host.docker_run(
        "run",
        "--rm",
        "--net",
        "dataman",
        IMG,
        "sh",
        "-c",
        "ip -o -4 addr show eth0 && busybox timeout 5 wget -q -O /tmp/f "
        f"http://{web_ip}/index.html && cat /tmp/f",
    )
    assert client.stdout.strip().endswith("hello"), client.stderr
    client_ip = re.search(r"inet (\S+)/32", client.stdout).group(1)
    seen = host.dockerd.docker("logs", "web").stderr
    assert f"{client_ip}]:" in seen, f"server saw {seen!r}, client was {client_ip}"

    # docker run --net tenant2 --ip 10.0.0.48 ... gets exactly 10.0.0.48
    host.docker(
        "run", "-d", "--net", "tenant2", "--ip", "10.0.0.48", "--name", "t2", IMG, "sleep", "1000"
    )
    assert host.ip_of("t2", "tenant2") == "10.0.0.48"
    assert "inet 10.0.0.48/32" in host.docker("exec", "t2", "ip", "-4", "addr")

    # docker network connect tenant2 web: web answers on its tenant2 address.
    host.docker("network", "connect", "tenant2", "web")
    web_t2 = host.ip_of("web", "tenant2")
    assert web_t2.startswith("10.0.0.")
    assert wait_until(lambda: http_ok(host, "tenant2", web_t2), 10, "web via tenant2")
    ping = host.docker("exec", "t2", "ping", "-c", "1", "-W", "2", web_t2)
    assert "1 packets received" in ping
    # docker network disconnect tenant2 web
    host.docker("network", "disconnect", "tenant2", "web")
    assert "eth1" not in host.docker("exec", "web", "ip", "-o", "link")
    assert http_ok(host, "dataman", web_ip)

    # calicnm endpoint show [--detailed]: host, network, endpoint id, interface, IP, MAC.
    eid = host.docker("inspect", "-f", "{{.NetworkSettings.Networks.dataman.EndpointID}}", "web")
    mac = host.docker("inspect", "-f", "{{.NetworkSettings.Networks.dataman.MacAddress}}", "web")
    shown = wait_until(
        lambda: (out := host.calicnm("endpoint", "show").stdout) and "dataman" in out and out,
        15,
        "network name in endpoint show",
    )
    row = next(line for line in shown.splitlines() if eid[:12] in line)
    for value in ("host1", "dataman", f"cali{eid[:11]}", f"{web_ip}/32", mac):
        assert value in row, (value, row)
    detailed = host.calicnm("endpoint", "show", "--detailed").stdout
    assert eid in detailed and "169.254.1.1" in detailed

    # docker stop / docker start web: comes back reachable.
    host.docker("stop", "-t", "1", "web")
    assert host.links("cali" + eid[:11]) == []
    host.docker("start", "web")
    web_ip = host.ip_of("web", "dataman")
    assert wait_until(lambda: http_ok(host, "dataman", web_ip), 10, "web after restart")

    # docker rm -f ... ; docker network rm dataman tenant2: nothing is left.
    host.docker("rm", "-f", "web", "t2")
    host.docker("network", "rm", "dataman", "tenant2")
    assert_nothing_left(host)
    host.calicnm("pool", "remove", "10.0.0.0/26")


@pytest.fixture
def cleanup(host: CalicnmHost):
    """Containers, networks and pools a test registers are removed afterwards,
    in that order, pass or fail; then nothing may be left."""
    created: dict[str, list[str]] = {"containers": [], "networks": [], "pools": []}
    yield created
    for name in created["containers"]:
        host.docker("rm", "-f", name, check=False)
    for name in created["networks"]:
        host.docker("network", "rm", name, check=False)
    for cidr in created["pools"]:
        host.calicnm("pool", "remove", cidr, check=False)
    assert_nothing_left(host)


def create_net(host: CalicnmHost, cleanup, name: str, *extra: str, check: bool = True):
    result = host.docker_run(
        "network", "create", "-d", "calicnm", "--ipam-driver", "calicnm", *extra, name
    )
    if result.returncode == 0:
        cleanup["networks"].append(name)
    elif check:
        raise AssertionError(result.stderr)
    return result


def test_docker_options(host: CalicnmHost, cleanup) -> None:
    host.calicnm("pool", "add", "10.1.0.0/24")
    cleanup["pools"].append("10.1.0.0/24")
    # -o profile=NAME names the network's profile explicitly.
    create_net(
        host,
        cleanup,
        "ranged",
        "--subnet",
        "10.1.0.0/24",
        "--ip-range",
        "10.1.0.128/28",
        "--aux-address",
        "router=10.1.0.5",
        "-o",
        "profile=WEB",
    )
    # --aux-address is held by IPAM (nobody else gets it).
    info = host.calicnm("ipam", "info", "10.1.0.5").stdout
    assert "Assigned" in info
    # --ip-range: containers land inside it.
    cleanup["containers"].append("r1")
    host.docker("run", "-d", "--net", "ranged", "--name", "r1", IMG, "sleep", "1000")
    assert host.ip_of("r1", "ranged").startswith("10.1.0.1")
    ip = host.ip_of("r1", "ranged")
    assert 128 <= int(ip.rsplit(".", 1)[1]) <= 143
    # --mac-address: the container has exactly that MAC (Debian's client speaks API 1.41).
    cleanup["containers"].append("m1")
    host.docker(
        "run",
        "-d",
        "--net",
        "ranged",
        "--name",
        "m1",
        "--mac-address",
        "ee:00:00:12:34:56",
        IMG,
        "sleep",
        "1000",
    )
    assert "ee:00:00:12:34:56" in host.docker("exec", "m1", "ip", "link", "show", "eth0")
    # -o profile shows in endpoint show --detailed.
    detailed = host.calicnm("endpoint", "show", "--detailed").stdout
    assert re.search(r"\|\s+WEB\s+\|", detailed)
    # --ip already in use: a clear error, no leftovers (checked by the fixture).
    dup = host.docker_run("run", "--rm", "--net", "ranged", "--ip", ip, IMG, "true")
    assert dup.returncode != 0 and "already in use" in dup.stderr


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--subnet", "172.31.0.0/24"], "not inside any calicnm pool"),
        (["--ipam-opt", "color=red"], "unknown --ipam-opt color"),
        (["-o", "colour=red"], "unknown network option(s) colour"),
        (["--ipv6", "--subnet", "fd00:1::/64"], "IPv6"),
    ],
)
def test_bad_network_options_fail_clearly(host: CalicnmHost, cleanup, args, message) -> None:
    result = create_net(host, cleanup, "badnet", *args, check=False)
    assert result.returncode != 0
    assert message in result.stderr


def test_exhausted_pool_and_address_outside_pool(host: CalicnmHost, cleanup) -> None:
    host.calicnm("pool", "add", "10.2.0.0/26")
    cleanup["pools"].append("10.2.0.0/26")
    create_net(host, cleanup, "tiny", "--subnet", "10.2.0.56/29")
    for n in range(6):
        cleanup["containers"].append(f"tiny{n}")
        host.docker("run", "-d", "--net", "tiny", "--name", f"tiny{n}", IMG, "sleep", "1000")
    full = host.docker_run("run", "--rm", "--net", "tiny", IMG, "true")
    assert full.returncode != 0 and "no free address left in 10.2.0.56/29" in full.stderr
    assert len(host.links("cali")) == 6
    # An address Docker accepts (inside --subnet) but no pool holds cannot exist;
    # outside the subnet Docker itself refuses before asking calicnm.
    outside = host.docker_run("run", "--rm", "--net", "tiny", "--ip", "10.2.0.9", IMG, "true")
    assert outside.returncode != 0
