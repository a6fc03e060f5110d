"""The calicnm CLI against a real etcd: output shapes, errors and exit codes."""

from __future__ import annotations

import json

import pytest

from tests.integration.cli_runner import run

pytestmark = pytest.mark.etcd


def test_pool_commands(etcd_store, etcd_server):
    url = etcd_server.url
    added = run(url, "pool", "add", "10.20.0.0/24", "10.21.0.0/26")
    assert added.returncode == 0, added.stderr
    assert added.stdout.splitlines() == ["Added pool 10.20.0.0/24", "Added pool 10.21.0.0/26"]
    show = run(url, "pool", "show").stdout.splitlines()
    assert show[1].split("|")[1].strip() == "IPv4 CIDR"
    assert [line.split("|")[1].strip() for line in show[3:-1]] == ["10.20.0.0/24", "10.21.0.0/26"]
    assert [p["cidr"] for p in json.loads(run(url, "pool", "show", "--json").stdout)] == [
        "10.20.0.0/24",
        "10.21.0.0/26",
    ]
    assert run(url, "pool", "remove", "10.21.0.0/26").returncode == 0
    usage = json.loads(run(url, "ipam", "show", "--json").stdout)
    assert usage == [{"blocks": 0, "in_use": 0, "pool": "10.20.0.0/24", "size": 256}]


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["pool", "add", "10.20.0.0/27"], "prefix length of 26 or lower"),
        (["pool", "add", "10.20.0.1/24"], "is not a valid network"),
        (["pool", "add", "10.20.0.0/25"], "overlaps existing pool 10.20.0.0/24"),
        (["pool", "remove", "10.99.0.0/24"], "does not exist"),
        (["ipam", "info", "10.99.0.1"], "not in any calicnm pool"),
        (["ipam", "release", "10.20.0.9"], "is not assigned"),
        (["ipam", "info", "bogus"], "not a valid IP address"),
    ],
)
def test_bad_input_is_one_line_and_non_zero(etcd_store, etcd_server, args, message):
    assert run(etcd_server.url, "pool", "add", "10.20.0.0/24").returncode == 0
    result = run(etcd_server.url, *args)
    assert result.returncode == 1
    assert result.stdout == ""
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("calicnm: error:") and message in lines[0]


def test_unknown_command_is_a_usage_error(etcd_server):
    result = run(etcd_server.url, "pool", "frobnicate")
    assert result.returncode == 2 and "invalid choice" in result.stderr


def test_etcd_down_is_a_clear_error():
    result = run("http://127.0.0.1:1", "pool", "show")
    assert result.returncode == 1
    assert (
        result.stderr.strip().splitlines() == [result.stderr.strip()]
        and "etcd is unreachable at 127.0.0.1:1" in result.stderr
    )


def test_ipam_info_and_release(etcd_store, etcd_server):
    import ipaddress

    from calicnm.ipam import Allocator, PoolRef
    from calicnm.model import Pool

    ipam = Allocator(etcd_store, "cli-host")
    ipam.add_pool(Pool(ipaddress.IPv4Network("10.22.0.0/26")))
    addr = ipam.assign(PoolRef(), "ep-abc")
    info = json.loads(run(etcd_server.url, "ipam", "info", str(addr), "--json").stdout)
    assert info["handle"] == "ep-abc" and info["affinity"] == "cli-host"
    assert run(etcd_server.url, "ipam", "release", str(addr)).stdout.strip() == (
        f"Address {addr} released"
    )
    assert "The address is free." in run(etcd_server.url, "ipam", "info", str(addr)).stdout


def test_diags_collects_even_when_etcd_is_down(etcd_store, etcd_server, tmp_path):
    import tarfile

    assert run(etcd_server.url, "pool", "add", "10.30.0.0/24").returncode == 0
    result = run(etcd_server.url, "diags", "--out", str(tmp_path), "--state-dir", str(tmp_path))
    assert result.returncode == 0, result.stderr
    path = result.stdout.strip().removeprefix("Diagnostics written to ")
    with tarfile.open(path) as tar:
        names = {n.split("/", 1)[1] for n in tar.getnames()}
        dump = tar.extractfile(next(n for n in tar.getnames() if n.endswith("etcd-calicnm.txt")))
        assert "/calicnm/v1/ipam/v4/pools/10.30.0.0-24" in dump.read().decode()
    assert {"iptables-save.txt", "ipset-list.txt", "ip-route.txt", "status.txt"} <= names

    down = run("http://127.0.0.1:1", "diags", "--out", str(tmp_path))
    assert down.returncode == 0
    path = down.stdout.strip().removeprefix("Diagnostics written to ")
    with tarfile.open(path) as tar:
        dump = tar.extractfile(next(n for n in tar.getnames() if n.endswith("etcd-calicnm.txt")))
        assert "cannot read etcd" in dump.read().decode()


def test_version_status_json_and_config_show(etcd_server, tmp_path):
    version = run(etcd_server.url, "--version")
    assert version.returncode == 0 and version.stdout.startswith("calicnm ")
    status = run(
        etcd_server.url,
        "--socket",
        str(tmp_path / "none.sock"),
        "status",
        "--state-dir",
        str(tmp_path / "state"),
        "--json",
    )
    assert status.returncode == 1  # no node here: the plugin does not answer
    data = json.loads(status.stdout)
    assert data["ok"] is False
    assert data["plugin"]["answering"] is False
    assert data["etcd"]["reachable"] is True
    assert data["agent"]["reported"] is False
    conf = tmp_path / "calicnm.env"
    conf.write_text("CALICNM_RESYNC_INTERVAL=7\nCALICNM_HOSTNAME=from-file\n")
    shown = run(etcd_server.url, "--config", str(conf), "config", "show", "--json")
    assert shown.returncode == 0, shown.stderr
    rows = {r["setting"]: (r["value"], r["source"]) for r in json.loads(shown.stdout)}
    assert rows["CALICNM_RESYNC_INTERVAL"] == ("7", f"file {conf}")
    assert rows["CALICNM_HOSTNAME"] == ("cli-host", "env CALICNM_HOSTNAME")
    assert rows["ETCD_ENDPOINTS"] == (etcd_server.url, "env ETCD_ENDPOINTS")
    assert rows["CALICNM_LOG_LEVEL"] == ("INFO", "default")
    conf.write_text("CALICNM_RESYNC_INTERVL=7\n")
    bad = run(etcd_server.url, "--config", str(conf), "status")
    assert bad.returncode == 1
    assert bad.stderr.strip() == (
        f"calicnm: error: {conf}:1: CALICNM_RESYNC_INTERVL is not a calicnm setting"
    )
