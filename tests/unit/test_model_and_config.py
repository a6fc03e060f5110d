import argparse
import ipaddress

import pytest

from calicnm.config import Config, add_arguments, read_config_file
from calicnm.errors import InvalidRequest
from calicnm.model import Endpoint, Network, Pool, parse_address, parse_network
from calicnm.store import keys, records
from calicnm.store.etcd import parse_endpoints


def test_pool_smaller_than_a_block_is_refused():
    with pytest.raises(InvalidRequest, match="prefix length of 26 or lower"):
        Pool(ipaddress.IPv4Network("10.0.0.0/27"))


def test_pool_round_trip_and_blocks():
    pool = Pool(ipaddress.IPv4Network("10.0.0.0/24"), nat_outgoing=True)
    assert Pool.from_json(pool.to_json()) == pool
    assert [str(b) for b in pool.blocks()][:2] == ["10.0.0.0/26", "10.0.0.64/26"]
    assert pool.options == ["nat-outgoing"]


def test_network_profile_prefers_explicit_name():
    net = Network(id="a" * 64, docker_name="dataman")
    assert net.profile_name == "dataman"
    assert Network(id="a" * 64, docker_name="dataman", profile="web").profile_name == "web"
    assert Network.from_json(net.to_json()) == net
    assert Network(id="b" * 64, ipv4_pools=("0.0.0.0/0",)).subnets == []


def test_endpoint_round_trip():
    ep = Endpoint(
        "e" * 64,
        "h1",
        "n" * 64,
        "caliee",
        "tmpee",
        "ee:00:00:00:00:01",
        (ipaddress.IPv4Address("10.0.0.2"),),
        "/var/run/docker/netns/x",
        "169.254.1.1",
    )
    assert Endpoint.from_json(ep.to_json()) == ep


@pytest.mark.parametrize("text", ["10.0.0.1/24", "nonsense", "fd00::/64", ""])
def test_parse_network_rejects(text):
    with pytest.raises(InvalidRequest):
        parse_network(text)


def test_parse_address_accepts_cidr_form():
    assert str(parse_address("10.0.0.2/32")) == "10.0.0.2"
    with pytest.raises(InvalidRequest):
        parse_address("10.0.0.300")


def test_key_layout_is_versioned_and_reversible():
    assert (
        keys.block(ipaddress.IPv4Network("10.0.0.0/26")) == "/calicnm/v1/ipam/v4/blocks/10.0.0.0-26"
    )
    assert records.cidr_of("10.0.0.0-26") == ipaddress.IPv4Network("10.0.0.0/26")
    parts = records.parse_key(keys.endpoint("h1", "abc"))
    assert parts == records.KeyParts("endpoint", "abc", "h1")


def test_etcd_endpoints_parsing():
    eps = parse_endpoints("http://10.0.0.1:2379, https://etcd.example:4001,127.0.0.1")
    assert [(e.host, e.port, e.secure) for e in eps] == [
        ("10.0.0.1", 2379, False),
        ("etcd.example", 4001, True),
        ("127.0.0.1", 2379, False),
    ]
    with pytest.raises(InvalidRequest):
        parse_endpoints("ftp://x:1")
    with pytest.raises(InvalidRequest):
        parse_endpoints(" , ")


def test_flags_win_over_environment_and_subcommands_do_not_reset_them():
    parser = argparse.ArgumentParser()
    add_arguments(parser, ["hostname", "socket"])
    sub = parser.add_subparsers(dest="cmd")
    run = sub.add_parser("run")
    add_arguments(run, ["hostname", "ip"], subcommand=True)
    args = parser.parse_args(["--hostname", "a", "run", "--ip", "198.18.0.2"])
    config = Config.from_env(args, {"CALICNM_HOSTNAME": "env", "CALICNM_SOCKET": "/tmp/s"})
    assert (config.hostname, config.ip, config.socket) == ("a", "198.18.0.2", "/tmp/s")
    assert Config.from_env(None, {"ETCD_CA_CERT_FILE": "/ca"}).etcd_trusted_ca_file == "/ca"
    assert Config.from_env(None, config.to_env()) == config


def test_host_address_detection_skips_container_interfaces():
    from calicnm.node.daemon import detect_ip

    found = [
        ("lo", "127.0.0.1"),
        ("docker0", "172.17.0.1"),
        ("cali1234", "10.0.0.1"),
        ("eth0", "198.18.0.2"),
        ("eth1", "198.19.0.2"),
    ]
    assert detect_ip(found) == "198.18.0.2"
    assert detect_ip([("lo", "127.0.0.1"), ("eth0", "169.254.3.3")]) is None


def test_the_config_file_sits_below_env_and_flags(tmp_path):
    path = tmp_path / "calicnm.env"
    path.write_text(
        "# shared with systemd's EnvironmentFile=\n"
        "ETCD_ENDPOINTS=https://10.0.0.1:2379\n"
        "export CALICNM_LOG_LEVEL='DEBUG'\n"
        'NODENAME="h9"\n'
        "CALICNM_SOCKET=/from/file\n"
        "SOMETHING_ELSE=ignored\n"
        "\n"
    )
    args = argparse.Namespace(socket="/from/flag", config=None)
    env = {"CALICNM_CONFIG_FILE": str(path), "CALICNM_LOG_LEVEL": "WARNING"}
    config, sources = Config.load(args, env)
    assert config.etcd_endpoints == "https://10.0.0.1:2379"
    assert sources["etcd_endpoints"] == f"file {path}"
    assert (config.log_level, sources["log_level"]) == ("WARNING", "env CALICNM_LOG_LEVEL")
    assert (config.socket, sources["socket"]) == ("/from/flag", "flag")
    assert (config.hostname, sources["hostname"]) == ("h9", f"file {path}")
    assert sources["state_dir"] == "default"


@pytest.mark.parametrize(
    ("text", "error"),
    [
        ("ETCD_ENDPOINTS\n", ":1: expected NAME=value"),
        ("# ok\nCALICNM_HOSTNAM=x\n", ":2: CALICNM_HOSTNAM is not a calicnm setting"),
        ("=x\n", ":1: expected NAME=value"),
    ],
)
def test_a_bad_config_file_is_refused_with_its_line(tmp_path, text, error):
    path = tmp_path / "calicnm.env"
    path.write_text(text)
    with pytest.raises(InvalidRequest, match=error):
        Config.load(None, {"CALICNM_CONFIG_FILE": str(path)})


def test_a_named_config_file_must_exist_and_the_default_may_not(tmp_path):
    with pytest.raises(InvalidRequest, match="does not exist"):
        Config.load(None, {"CALICNM_CONFIG_FILE": str(tmp_path / "missing.env")})
    assert read_config_file(str(tmp_path / "missing.env")) == {}
    (tmp_path / "big.env").write_bytes(b"#" * (65 * 1024))
    with pytest.raises(InvalidRequest, match="larger than 64 KiB"):
        read_config_file(str(tmp_path / "big.env"))
    (tmp_path / "bin.env").write_bytes(b"CALICNM_IP=\xff\n")
    with pytest.raises(InvalidRequest, match="not UTF-8"):
        read_config_file(str(tmp_path / "bin.env"))
