import pytest

from calicnm.errors import DataplaneError
from calicnm.iptables import jump_fixups, render


def test_render_rewrites_whole_chains_in_one_transaction():
    chains = {"calicnm-FORWARD": ["-i cali+ -j ACCEPT", "-o cali+ -j ACCEPT"]}
    text = render("filter", chains, ["-I FORWARD 1 -j calicnm-FORWARD"])
    assert text == (
        "*filter\n"
        ":calicnm-FORWARD - [0:0]\n"
        "-A calicnm-FORWARD -i cali+ -j ACCEPT\n"
        "-A calicnm-FORWARD -o cali+ -j ACCEPT\n"
        "-I FORWARD 1 -j calicnm-FORWARD\n"
        "COMMIT\n"
    )


def test_render_refuses_foreign_chains():
    with pytest.raises(DataplaneError):
        render("filter", {"DOCKER-USER": []})


SAVED = """*filter
:FORWARD DROP [0:0]
-A FORWARD -j DOCKER-USER
{}-A FORWARD -o docker0 -j DOCKER
COMMIT
"""


@pytest.mark.parametrize(
    ("present", "expected"),
    [
        (0, ["-I FORWARD 1 -j calicnm-FORWARD"]),
        (1, []),
        (3, ["-D FORWARD -j calicnm-FORWARD"] * 2),
    ],
)
def test_jump_fixups_leave_exactly_one_jump(present, expected):
    saved = SAVED.format("-A FORWARD -j calicnm-FORWARD\n" * present)
    assert jump_fixups(saved, "FORWARD", "calicnm-FORWARD") == expected
