import ipaddress

import pytest

from calicnm import endpoint
from calicnm.errors import InvalidRequest
from calicnm.validation import check_id, check_mac

EID = "629601b5fa245ddf93ea239eb288111b92d6781bedeebcb340ccdf43a081ea34"


def test_interface_names_fit_ifnamsiz_and_derive_from_the_id():
    assert endpoint.host_ifname(EID) == "cali629601b5fa2"
    assert endpoint.peer_ifname(EID) == "tmp629601b5fa2"
    assert len(endpoint.host_ifname(EID)) <= 15


def test_mac_is_stable_unicast_and_locally_administered():
    mac = endpoint.derive_mac(EID)
    assert mac == endpoint.derive_mac(EID)
    first = int(mac[:2], 16)
    assert first & 1 == 0 and first & 2 == 2
    assert mac != endpoint.derive_mac(EID[::-1])


@pytest.mark.parametrize("bad", ["01:00:5e:00:00:01", "zz:00:00:00:00:00", "ee:ee"])
def test_bad_macs_are_rejected(bad):
    with pytest.raises(InvalidRequest):
        check_mac(bad)


def test_mac_normalised():
    assert check_mac("EE-01-02-03-04-05") == "ee:01:02:03:04:05"


@pytest.mark.parametrize(
    "bad", ["", "short", "UPPERCASEHEX0123", 42, None, "a" * 65, "a" * 64 + "\n"]
)
def test_ids_are_checked(bad):
    with pytest.raises(InvalidRequest):
        check_id(bad, "EndpointID")


def test_swarm_ids_are_accepted():
    assert check_id("a1b2c3d4e5f6g7h8i9j0k1l2m", "NetworkID")


def test_gateways_are_unique_per_sandbox():
    assert endpoint.choose_gateway(set()) == "169.254.1.1"
    assert endpoint.choose_gateway({"169.254.1.1"}) == "169.254.1.2"
    assert endpoint.choose_gateway({"169.254.1.2"}) == "169.254.1.1"


def test_join_response_shape():
    resp = endpoint.join_response("tmpabc", "169.254.1.1", [])
    assert resp == {
        "InterfaceName": {"SrcName": "tmpabc", "DstPrefix": "eth"},
        "Gateway": "169.254.1.1",
        "StaticRoutes": [{"Destination": "169.254.1.1/32", "RouteType": 1, "NextHop": ""}],
        "DisableGatewayService": True,
    }


def test_join_response_routes_the_subnet_through_its_own_gateway():
    resp = endpoint.join_response("tmpabc", "169.254.1.2", [ipaddress.IPv4Network("10.0.0.0/26")])
    assert resp["StaticRoutes"][1] == {
        "Destination": "10.0.0.0/26",
        "RouteType": 0,
        "NextHop": "169.254.1.2",
    }
