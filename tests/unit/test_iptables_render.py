import pytest

from calicnm.errors import DataplaneError
from calicnm.host.iptables import jump_fixups, restore_script


def test_script_rewrites_whole_chains_in_one_transaction():
    chains = {"calicnm-FORWARD": ("-i cali+ -j ACCEPT", "-o cali+ -j ACCEPT")}
    text = restore_script("filter", chains, ["-I FORWARD 1 -j calicnm-FORWARD"], ["calicnm-old"])
    assert text == (
        "*filter\n"
        ":calicnm-FORWARD - [0:0]\n"
        ":calicnm-old - [0:0]\n"
        "-A calicnm-FORWARD -i cali+ -j ACCEPT\n"
        "-A calicnm-FORWARD -o cali+ -j ACCEPT\n"
        "-I FORWARD 1 -j calicnm-FORWARD\n"
        "-X calicnm-old\n"
        "COMMIT\n"
    )


@pytest.mark.parametrize(
    ("write", "jumps", "delete"),
    [
        ({"DOCKER-USER": ()}, [], []),
        ({}, [], ["FORWARD"]),
        ({"calicnm-x y": ()}, [], []),
        ({"calicnm-FORWARD": ("-j ACCEPT\n-A INPUT -j ACCEPT",)}, [], []),
        ({}, ["-I FORWARD 1 -j DOCKER-USER"], []),
        ({}, ["-A FORWARD -j ACCEPT"], []),
        ({}, ["-I FORWARD 1 -j calicnm-FORWARD -p tcp"], []),
    ],
)
def test_script_refuses_anything_but_calicnm_chains(write, jumps, delete):
    with pytest.raises(DataplaneError):
        restore_script("filter", write, jumps, delete)


SAVED = """*filter
:FORWARD DROP [0:0]
{}-A FORWARD -o docker0 -j DOCKER
COMMIT
"""
OURS = "-A FORWARD -j calicnm-FORWARD\n"
DOCKER_USER = "-A FORWARD -j DOCKER-USER\n"
MOVE = ["-I FORWARD 1 -j calicnm-FORWARD"]
DELETE = "-D FORWARD -j calicnm-FORWARD"


@pytest.mark.parametrize(
    ("rules", "expected"),
    [
        ("", MOVE),
        (OURS, []),
        (OURS + DOCKER_USER, []),
        (DOCKER_USER + OURS, [DELETE, *MOVE]),
        (OURS * 3, [DELETE] * 3 + MOVE),
    ],
)
def test_jump_fixups_leave_exactly_one_jump_as_rule_one(rules, expected):
    assert jump_fixups(SAVED.format(rules), "FORWARD", "calicnm-FORWARD") == expected
