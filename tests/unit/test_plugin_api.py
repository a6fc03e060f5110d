"""The Docker wire protocol, through the real Flask app over fake adapters.

Assertions are on responses and on the resulting datastore and host state.
"""

import ipaddress
import json

import pytest

from calicnm.driver import Driver
from calicnm.ipam import Allocator
from calicnm.model import Pool
from calicnm.plugin_api import build_app
from calicnm.store import keys
from tests.fakes import FakePlumbing, MemoryStore

NID = "6f49939a5d861b88bab9633a90df9206d74f387e13a58e07639c41910427ffb7"
EID = "629601b5fa245ddf93ea239eb288111b92d6781bedeebcb340ccdf43a081ea34"
EID2 = "8b8b6394a1dd0c1f2e3d4c5b6a79881726354433221100ffeeddccbbaa998877"
SANDBOX = "/var/run/docker/netns/837d34a2ff2b"


class Rig:
    def __init__(self):
        self.store = MemoryStore()
        self.plumbing = FakePlumbing()
        self.ipam = Allocator(self.store, "h1", sleep=lambda s: None)
        self.ipam.add_pool(Pool(ipaddress.IPv4Network("10.0.0.0/26")))
        self.client = build_app(Driver(self.store, self.ipam, self.plumbing, "h1")).test_client()

    def call(self, method, body=None, raw=None):
        data = raw if raw is not None else (b"" if body is None else json.dumps(body))
        resp = self.client.post(f"/{method}", data=data)
        return resp.status_code, json.loads(resp.data)

    def ok(self, method, body=None):
        status, payload = self.call(method, body)
        assert status == 200, payload
        return payload


@pytest.fixture
def rig():
    return Rig()


def network_body(pool="0.0.0.0/0", generic=None):
    return {
        "NetworkID": NID,
        "Options": {
            "com.docker.network.enable_ipv6": False,
            "com.docker.network.generic": generic or {},
        },
        "IPv4Data": [{"AddressSpace": "CalicnmLocal", "Pool": pool, "Gateway": "169.254.1.1/32"}],
        "IPv6Data": [],
    }


def test_handshake_with_empty_bodies(rig):
    assert rig.ok("Plugin.Activate") == {"Implements": ["NetworkDriver", "IpamDriver"]}
    assert rig.ok("NetworkDriver.GetCapabilities")["Scope"] == "local"
    assert rig.ok("IpamDriver.GetCapabilities") == {
        "RequiresMACAddress": False,
        "RequiresRequestReplay": False,
    }
    assert rig.ok("IpamDriver.GetDefaultAddressSpaces")["LocalDefaultAddressSpace"]


def test_unknown_route_is_a_clean_404(rig):
    status, payload = rig.call("NetworkDriver.Frobnicate", {})
    assert status == 404 and "Err" in payload
    assert rig.client.get("/Plugin.Activate").status_code == 405


@pytest.mark.parametrize(
    ("method", "raw", "status", "message"),
    [
        ("IpamDriver.RequestPool", b"{not json", 400, "not valid JSON"),
        ("IpamDriver.RequestPool", b"[1, 2]", 400, "must be a JSON object"),
        ("IpamDriver.RequestPool", b'{"Pool": 7}', 400, "Pool must be a string"),
        ("IpamDriver.RequestPool", b'{"Pool": "10.9.0.0/24"}', 400, "not inside any calicnm pool"),
        ("IpamDriver.RequestPool", b'{"Pool": "", "V6": true}', 400, "IPv6"),
        ("IpamDriver.RequestPool", b'{"Options": {"x": "1"}}', 400, "unknown --ipam-opt x"),
        ("IpamDriver.RequestAddress", b'{"PoolID": "bogus"}', 400, "was not issued by calicnm"),
        (
            "IpamDriver.RequestAddress",
            b'{"PoolID": "calicnm:any", "Address": "10.9.9.9"}',
            400,
            "outside every calicnm pool",
        ),
        (
            "NetworkDriver.CreateEndpoint",
            b'{"NetworkID": "x", "EndpointID": "y"}',
            400,
            "NetworkID must be a Docker id",
        ),
        (
            "NetworkDriver.Join",
            json.dumps({"NetworkID": NID, "EndpointID": EID, "SandboxKey": SANDBOX}).encode(),
            404,
            "does not exist on host h1",
        ),
    ],
)
def test_bad_input_gets_a_non_200_err(rig, method, raw, status, message):
    got, payload = rig.call(method, raw=raw)
    assert got == status
    assert message in payload["Err"]


def test_network_options_are_validated(rig):
    status, payload = rig.call("NetworkDriver.CreateNetwork", network_body(generic={"colour": "x"}))
    assert status == 400 and "unknown network option(s) colour" in payload["Err"]
    status, payload = rig.call("NetworkDriver.CreateNetwork", network_body(generic={"mtu": "10"}))
    assert status == 400 and "576-9000" in payload["Err"]
    body = network_body()
    body["IPv4Data"][0]["AddressSpace"] = "LocalDefault"
    status, payload = rig.call("NetworkDriver.CreateNetwork", body)
    assert status == 400 and "--ipam-driver calicnm" in payload["Err"]
    assert rig.store.all_keys() == sorted(k for k in rig.store.all_keys() if "/networks/" not in k)


def test_profile_option_names_the_network(rig):
    rig.ok("NetworkDriver.CreateNetwork", network_body(generic={"profile": "WEB"}))
    stored = json.loads(rig.store.get(keys.network(NID)).value)
    assert stored["profile"] == "WEB"
    status, payload = rig.call(
        "NetworkDriver.CreateNetwork", network_body(generic={"profile": "bad name!"})
    )
    assert status == 400 and "-o profile" in payload["Err"]


def full_create(rig, mac=""):
    pool = rig.ok(
        "IpamDriver.RequestPool",
        {"AddressSpace": "CalicnmLocal", "Pool": "", "SubPool": "", "Options": {}, "V6": False},
    )
    assert pool["Pool"] == "0.0.0.0/0"
    assert pool["Data"] == {"com.docker.network.gateway": "169.254.1.1/32"}
    rig.ok("NetworkDriver.CreateNetwork", network_body())
    addr = rig.ok(
        "IpamDriver.RequestAddress", {"PoolID": pool["PoolID"], "Address": "", "Options": None}
    )["Address"]
    assert addr.endswith("/32")
    created = rig.ok(
        "NetworkDriver.CreateEndpoint",
        {
            "NetworkID": NID,
            "EndpointID": EID,
            "Interface": {"Address": addr, "AddressIPv6": "", "MacAddress": mac},
            "Options": {},
        },
    )
    return pool["PoolID"], addr, created


def test_full_lifecycle_leaves_nothing_behind(rig):
    before = rig.store.all_keys()
    pool_id, addr, created = full_create(rig)
    mac = created["Interface"]["MacAddress"]
    assert set(created) == {"Interface"} and set(created["Interface"]) == {"MacAddress"}
    assert "cali629601b5fa2" in rig.plumbing.links
    assert rig.ipam.info(ipaddress.IPv4Address(addr.split("/")[0])).holder.handle == EID

    joined = rig.ok(
        "NetworkDriver.Join",
        {"NetworkID": NID, "EndpointID": EID, "SandboxKey": SANDBOX, "Options": None},
    )
    assert joined["InterfaceName"] == {"SrcName": "tmp629601b5fa2", "DstPrefix": "eth"}
    assert joined["Gateway"] == "169.254.1.1"
    assert joined["DisableGatewayService"] is True
    assert (
        rig.ok("NetworkDriver.EndpointOperInfo", {"NetworkID": NID, "EndpointID": EID})["Value"][
            "MacAddress"
        ]
        == mac
    )
    assert (
        rig.ok(
            "NetworkDriver.ProgramExternalConnectivity",
            {"NetworkID": NID, "EndpointID": EID, "Options": {}},
        )
        == {}
    )

    rig.ok("NetworkDriver.RevokeExternalConnectivity", {"NetworkID": NID, "EndpointID": EID})
    rig.ok("NetworkDriver.Leave", {"NetworkID": NID, "EndpointID": EID})
    rig.ok("NetworkDriver.DeleteEndpoint", {"NetworkID": NID, "EndpointID": EID})
    rig.ok("IpamDriver.ReleaseAddress", {"PoolID": pool_id, "Address": addr.split("/")[0]})
    rig.ok("IpamDriver.ReleaseAddress", {"PoolID": pool_id, "Address": addr.split("/")[0]})
    rig.ok("IpamDriver.ReleaseAddress", {"PoolID": pool_id, "Address": "169.254.1.1"})
    rig.ok("IpamDriver.ReleasePool", {"PoolID": pool_id})
    rig.ok("NetworkDriver.DeleteNetwork", {"NetworkID": NID})
    assert rig.plumbing.links == {}
    leftover = [
        k
        for k in rig.store.all_keys()
        if k not in before and "/blocks/" not in k and "/affinity/" not in k
    ]
    assert leftover == []
    assert all(not b.allocations for b in rig.ipam.blocks())


def test_mac_given_by_docker_is_used_and_not_echoed(rig):
    _pool, _addr, created = full_create(rig, mac="EE:01:02:03:04:05")
    assert created == {}
    assert rig.plumbing.links["cali629601b5fa2"].mac == "ee:01:02:03:04:05"


def test_failed_plumbing_leaves_no_endpoint_record(rig):
    rig.plumbing.fail_create = True
    pool = rig.ok("IpamDriver.RequestPool", {"Pool": ""})
    rig.ok("NetworkDriver.CreateNetwork", network_body())
    addr = rig.ok("IpamDriver.RequestAddress", {"PoolID": pool["PoolID"]})["Address"]
    status, payload = rig.call(
        "NetworkDriver.CreateEndpoint",
        {"NetworkID": NID, "EndpointID": EID, "Interface": {"Address": addr}},
    )
    assert status == 500 and "test failure" in payload["Err"]
    assert not [k for k in rig.store.all_keys() if "/endpoints/" in k]


def test_second_interface_in_a_sandbox_gets_its_own_gateway(rig):
    full_create(rig)
    rig.ok("NetworkDriver.Join", {"NetworkID": NID, "EndpointID": EID, "SandboxKey": SANDBOX})
    addr2 = rig.ok("IpamDriver.RequestAddress", {"PoolID": "calicnm:any"})["Address"]
    rig.ok(
        "NetworkDriver.CreateEndpoint",
        {"NetworkID": NID, "EndpointID": EID2, "Interface": {"Address": addr2}},
    )
    joined = rig.ok(
        "NetworkDriver.Join", {"NetworkID": NID, "EndpointID": EID2, "SandboxKey": SANDBOX}
    )
    assert joined["Gateway"] == "169.254.1.2"
    assert joined["StaticRoutes"][0]["Destination"] == "169.254.1.2/32"


def test_delete_of_unknown_endpoint_is_tolerated(rig):
    assert rig.ok("NetworkDriver.DeleteEndpoint", {"NetworkID": NID, "EndpointID": EID}) == {}
    assert rig.ok("NetworkDriver.Leave", {"NetworkID": NID, "EndpointID": EID}) == {}


def test_datastore_down_is_503_and_the_app_recovers(rig):
    rig.store.down = True
    status, payload = rig.call("IpamDriver.RequestPool", {"Pool": ""})
    assert status == 503 and "etcd is unreachable" in payload["Err"]
    rig.store.down = False
    assert rig.ok("IpamDriver.RequestPool", {"Pool": ""})["PoolID"] == "calicnm:any"


def test_gateway_requests(rig):
    pool = rig.ok("IpamDriver.RequestPool", {"Pool": "10.0.0.0/26"})
    gw_opts = {"RequestAddressType": "com.docker.network.gateway"}
    assert (
        rig.ok(
            "IpamDriver.RequestAddress",
            {"PoolID": pool["PoolID"], "Address": "", "Options": gw_opts},
        )["Address"]
        == "169.254.1.1/32"
    )
    got = rig.ok(
        "IpamDriver.RequestAddress",
        {"PoolID": pool["PoolID"], "Address": "10.0.0.1", "Options": gw_opts},
    )
    assert got["Address"] == "10.0.0.1/26"
    assert rig.ipam.info(ipaddress.IPv4Address("10.0.0.1")).holder.kind == "gateway"
    status, payload = rig.call(
        "IpamDriver.RequestAddress", {"PoolID": pool["PoolID"], "Address": "10.0.0.1"}
    )
    assert status == 409 and "already in use" in payload["Err"]
