import ipaddress

import pytest

from calicnm.blocks import Allocation, Block
from calicnm.errors import AddressInUse, InvalidRequest

NET = ipaddress.IPv4Network("10.1.0.0/26")
A = ipaddress.IPv4Address


def test_new_block_has_every_ordinal_free():
    block = Block.new(NET, "h1")
    assert block.size == 64
    assert block.free == 64
    assert block.empty


def test_assign_any_takes_first_allowed_and_keeps_invariant():
    block = Block.new(NET, "h1")
    new, addr = block.assign_any(Allocation("e1"), lambda a: a != A("10.1.0.0"))
    assert addr == A("10.1.0.1")
    assert new.free == 63
    assert new.holder(addr) == Allocation("e1")
    assert block.free == 64, "blocks are values: the original is untouched"


def test_released_address_is_reused_last():
    block = Block.new(NET, None)
    block, first = block.assign_any(Allocation("a"), lambda a: True)
    block = block.release(first)
    block, second = block.assign_any(Allocation("b"), lambda a: True)
    assert second != first
    assert block.unallocated[-1] == 0


def test_assign_exact_conflict_names_the_holder():
    block = Block.new(NET, "h1").assign(A("10.1.0.48"), Allocation("ep1"))
    with pytest.raises(AddressInUse, match=r"10\.1\.0\.48 is already in use .*ep1"):
        block.assign(A("10.1.0.48"), Allocation("ep2"))


def test_release_is_idempotent():
    block = Block.new(NET, "h1")
    assert block.release(A("10.1.0.5")) is None


def test_address_outside_block_is_rejected():
    with pytest.raises(InvalidRequest):
        Block.new(NET, "h1").ordinal(A("10.1.0.64"))


def test_full_block_yields_nothing():
    block = Block.new(ipaddress.IPv4Network("10.1.0.0/30"), "h1")
    for _ in range(4):
        block, _addr = block.assign_any(Allocation("x"), lambda a: True)
    assert block.assign_any(Allocation("x"), lambda a: True) is None


def test_handles_and_json_round_trip():
    block = Block.new(NET, "h1").assign(A("10.1.0.7"), Allocation("pending", "endpoint"))
    block = block.with_handle(A("10.1.0.7"), "ep7")
    again = Block.from_json(block.to_json(), revision=9)
    assert again.addresses_of("ep7") == [A("10.1.0.7")]
    assert again.affinity == "h1"
    assert again.revision == 9
    assert again.unallocated == block.unallocated


@pytest.mark.parametrize(
    "raw",
    [
        "not json",
        '{"cidr": "10.1.0.0/26"}',
        '{"cidr": "10.1.0.0/30", "allocations": {}, "unallocated": [0, 1, 1, 2]}',
        '{"cidr": "10.1.0.0/30", "allocations": {"0": {"handle": "x"}}, "unallocated": [0,1,2,3]}',
    ],
)
def test_corrupt_blocks_are_refused(raw):
    with pytest.raises(InvalidRequest):
        Block.from_json(raw)
