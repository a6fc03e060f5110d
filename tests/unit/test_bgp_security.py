"""What BGP may install, and how its sessions are protected: the import
filter (routed pools only), TCP MD5 passwords and TTL security, in the
rendered BIRD configuration (checked by ``bird -p`` where BIRD is
installed) and through the ``calicnm bgp`` commands over MemoryStore."""

from __future__ import annotations

import io
import ipaddress
import shutil
import subprocess
from pathlib import Path
from types import SimpleNamespace

import pytest

from calicnm.cli import main as cli
from calicnm.errors import InvalidRequest
from calicnm.model import BgpConfig, Host, Peer, Pool
from calicnm.routing.bgp import (
    BirdInput,
    bird_text,
    import_prefix_set,
    render_bird,
    render_route_reflector,
)
from calicnm.routing.reflector import reflect_once
from calicnm.store import keys, records
from tests.fakes import FakeBird, MemoryStore

N = ipaddress.IPv4Network
HOSTS = [Host("a", "198.18.0.2"), Host("b", "198.18.0.3", as_num=64600), Host("c", "198.18.0.4")]
ROUTED = Pool(N("10.0.0.0/16"))
SMALL_BLOCKS = Pool(N("10.8.0.0/20"), block_prefix=28)
BIG_BLOCKS = Pool(N("192.168.0.0/16"), block_prefix=24)
VXLAN = Pool(N("172.30.0.0/16"), vxlan=True)
IPIP = Pool(N("172.31.0.0/16"), ipip=True)
SECRET = "s3cret"


def bird(pools=(ROUTED, VXLAN), config=None, **kw):
    data = {
        "me": HOSTS[0],
        "hosts": HOSTS,
        "config": config or BgpConfig(),
        "pools": list(pools),
        "blocks": [N("10.0.1.0/26")] if ROUTED in pools else [],
        "global_peers": [Peer("198.18.0.100", 65000)],
        "node_peers": [Peer("198.18.0.101", 65001)],
        **kw,
    }
    return render_bird(BirdInput(**data))


def section(conf: str, header: str) -> str:
    """The block that starts with ``header`` (up to its closing brace at column 0)."""
    start = conf.index(header)
    return conf[start : conf.index("\n}\n", start) + 3]


# ---- the import filter ---------------------------------------------------------------


def test_only_blocks_of_routed_pools_or_longer_are_accepted_and_reach_the_kernel():
    conf = bird(pools=[ROUTED, SMALL_BLOCKS, BIG_BLOCKS, VXLAN, IPIP])
    assert (
        "define CALICNM_ROUTED = [ 10.0.0.0/16{26,32}, 10.8.0.0/20{28,32}, "
        "192.168.0.0/16{24,32} ];" in conf
    )
    assert section(conf, "filter calicnm_import_bgp {") == (
        "filter calicnm_import_bgp {\n  if net ~ CALICNM_ROUTED then accept;\n  reject;\n}\n"
    )
    assert section(conf, "filter calicnm_export_kernel {") == (
        "filter calicnm_export_kernel {\n"
        '  if proto = "calicnm_blocks" then accept;\n'
        "  if source = RTS_BGP && net ~ CALICNM_ROUTED then accept;\n"
        "  reject;\n"
        "}\n"
    )
    # Every session takes its import filter from the template; nothing imports all.
    assert "import all" not in conf
    assert "import filter calicnm_import_bgp;" in section(conf, "template bgp calicnm_peer {")
    assert conf.count("from calicnm_peer") == 4  # two mesh peers, one global, one node peer


def test_encapsulated_pools_are_never_accepted_from_bgp():
    prefixes = import_prefix_set([VXLAN, ROUTED, IPIP])
    assert prefixes == "[ 10.0.0.0/16{26,32} ]"
    conf = bird(pools=[ROUTED, VXLAN, IPIP])
    assert "172.30." not in conf and "172.31." not in conf


@pytest.mark.parametrize("pools", [[], [VXLAN], [VXLAN, IPIP]])
def test_no_routed_pool_means_nothing_is_accepted(pools):
    assert import_prefix_set(pools) is None
    conf = bird(pools=pools)
    assert "CALICNM_ROUTED" not in conf
    assert section(conf, "filter calicnm_import_bgp {") == (
        "filter calicnm_import_bgp {\n  reject;\n}\n"
    )
    kernel = section(conf, "filter calicnm_export_kernel {")
    assert "RTS_BGP" not in kernel and '"calicnm_blocks" then accept;\n  reject;' in kernel


def test_the_export_to_peers_is_unchanged():
    conf = bird(pools=[ROUTED, BIG_BLOCKS, VXLAN])
    assert section(conf, "filter calicnm_export_bgp {") == (
        "filter calicnm_export_bgp {\n"
        "  if net = 10.0.1.0/26 then accept;\n"
        "  if net ~ 10.0.1.0/26 then reject;\n"
        "  if net ~ 10.0.0.0/16 then accept;\n"
        "  if net ~ 192.168.0.0/16 then accept;\n"
        "  reject;\n"
        "}\n"
    )


# ---- password ------------------------------------------------------------------------


def test_the_password_goes_on_every_session_through_the_template():
    conf = bird(config=BgpConfig(password="a!#$%&'()*+,-./:;<=>?@[]^_`{|}~ z"))
    template = section(conf, "template bgp calicnm_peer {")
    assert '  password "a!#$%&\'()*+,-./:;<=>?@[]^_`{|}~ z";\n' in template
    assert conf.count("password") == 1, "only in the template, which every session uses"
    assert "password" not in bird()


@pytest.mark.parametrize(
    "bad", ['a"b', "a\\b", "line\nbreak", "tab\there", "nul\x00", "caf\u00e9", "bell\x07", ""]
)
def test_a_password_that_could_break_out_of_its_quotes_is_refused(bad):
    # BgpConfig itself does not validate (from_json does): the renderer refuses anyway.
    with pytest.raises(InvalidRequest, match="printable ASCII without quotes or backslashes"):
        bird(config=BgpConfig(password=bad))
    with pytest.raises(InvalidRequest):
        render_route_reflector("198.18.0.100", 64511, "1.0.0.1", HOSTS, BgpConfig(password=bad), [])
    with pytest.raises(InvalidRequest):
        bird_text(bad, "x")


def test_a_stored_password_is_validated_when_read():
    with pytest.raises(InvalidRequest):
        BgpConfig.from_json('{"password": "a\\"; import all; #"}')
    assert BgpConfig.from_json(BgpConfig(password=SECRET).to_json()).password == SECRET


# ---- TTL security --------------------------------------------------------------------


def test_ttl_security_makes_every_session_direct_with_gtsm():
    off = section(bird(), "template bgp calicnm_peer {")
    assert "  multihop;\n" in off and "ttl security" not in off and "direct;" not in off
    on = section(bird(config=BgpConfig(ttl_security=True)), "template bgp calicnm_peer {")
    assert "  direct;\n  ttl security on;\n" in on
    assert "multihop;" not in on
    assert "# TTL security (GTSM)" in on, "the generated config says why sessions are direct"


# ---- the route reflector -------------------------------------------------------------


def test_the_route_reflector_filters_and_protects_its_sessions_like_the_hosts():
    conf = render_route_reflector(
        "198.18.0.100",
        64511,
        "1.0.0.1",
        HOSTS,
        BgpConfig(password=SECRET, ttl_security=True),
        [ROUTED, BIG_BLOCKS, VXLAN],
    )
    assert "define CALICNM_ROUTED = [ 10.0.0.0/16{26,32}, 192.168.0.0/16{24,32} ];" in conf
    template = section(conf, "template bgp calicnm_client {")
    assert "import filter calicnm_import_bgp; export all;" in template
    assert f'  password "{SECRET}";\n' in template
    assert "  direct;\n  ttl security on;\n" in template
    assert "import all" not in conf and conf.count("from calicnm_client") == 3

    plain = render_route_reflector("198.18.0.100", 64511, "1.0.0.1", HOSTS, BgpConfig(), [])
    assert "password" not in plain and "ttl security" not in plain and "multihop" not in plain
    assert "filter calicnm_import_bgp {\n  reject;\n}" in plain


def test_reflect_once_reads_the_pools_and_settings_from_the_store():
    store, fake = MemoryStore(), FakeBird()
    store.put(keys.host_meta("a"), Host("a", "198.18.0.2").to_json())
    assert reflect_once(store, fake, "198.18.0.100", None, "1.1.1.1") is True
    assert "filter calicnm_import_bgp {\n  reject;\n}" in (fake.config or "")
    store.put(keys.pool(ROUTED.cidr), ROUTED.to_json())
    store.put(keys.BGP_CONFIG, BgpConfig(password=SECRET).to_json())
    assert reflect_once(store, fake, "198.18.0.100", None, "1.1.1.1") is True
    assert "[ 10.0.0.0/16{26,32} ]" in (fake.config or "")
    assert f'password "{SECRET}";' in (fake.config or "")


# ---- BIRD itself parses what we render -----------------------------------------------

needs_bird = pytest.mark.skipif(shutil.which("bird") is None, reason="bird is not installed")

CONFIGS = {
    "plain": BgpConfig(),
    "password": BgpConfig(password="a!#$%&'()*+,-./:;<=>?@[]^_`{|}~ z"),
    "ttl": BgpConfig(ttl_security=True),
    "password+ttl": BgpConfig(password=SECRET, ttl_security=True),
    "mesh off, both": BgpConfig(node_mesh=False, password=SECRET, ttl_security=True),
}
POOL_SETS = {
    "routed": [ROUTED, SMALL_BLOCKS, BIG_BLOCKS, VXLAN],
    "none routed": [VXLAN, IPIP],
    "/32 blocks": [Pool(N("10.9.0.0/24"), block_prefix=32)],
}


def bird_parses(tmp_path: Path, conf: str) -> None:
    path = tmp_path / "bird.conf"
    path.write_text(conf)
    got = subprocess.run(
        ["bird", "-p", "-c", str(path)], capture_output=True, text=True, timeout=30
    )
    assert got.returncode == 0, f"bird -p refused:\n{got.stderr}\n{conf}"


@needs_bird
@pytest.mark.parametrize("config", CONFIGS.values(), ids=CONFIGS.keys())
@pytest.mark.parametrize("pools", POOL_SETS.values(), ids=POOL_SETS.keys())
def test_bird_accepts_the_host_configuration(tmp_path, config, pools):
    bird_parses(tmp_path, bird(pools=pools, config=config))


@needs_bird
@pytest.mark.parametrize("config", CONFIGS.values(), ids=CONFIGS.keys())
@pytest.mark.parametrize("pools", POOL_SETS.values(), ids=POOL_SETS.keys())
def test_bird_accepts_the_route_reflector_configuration(tmp_path, config, pools):
    # Only hosts of the reflector's own AS: BIRD refuses an rr client in another AS.
    clients = [h for h in HOSTS if h.as_num is None]
    conf = render_route_reflector("198.18.0.100", 64511, "1.0.0.1", clients, config, pools)
    bird_parses(tmp_path, conf)


# ---- the commands --------------------------------------------------------------------


def run(store: MemoryStore, *argv: str) -> int:
    args = cli.build_parser().parse_args(["bgp", *argv])
    ctx = SimpleNamespace(args=args, store=store, config=SimpleNamespace(hostname="a"))
    return int(args.fn(ctx))


def test_password_is_set_shown_as_set_and_cleared_never_printed(capsys):
    store = MemoryStore()
    assert run(store, "password") == 0
    assert capsys.readouterr().out == "not set\n"
    assert run(store, "password", SECRET) == 0
    said = capsys.readouterr().out
    assert "BGP password set" in said
    assert records.bgp_config(store).password == SECRET
    assert run(store, "password") == 0
    assert capsys.readouterr().out == "set\n"
    assert run(store, "password", "--clear") == 0
    said += capsys.readouterr().out
    assert records.bgp_config(store).password is None
    assert run(store, "password") == 0
    said += capsys.readouterr().out
    assert SECRET not in said and said.endswith("not set\n")


def test_password_from_stdin(capsys, monkeypatch):
    store = MemoryStore()
    monkeypatch.setattr("sys.stdin", io.StringIO("from-stdin\n"))
    assert run(store, "password", "-") == 0
    assert records.bgp_config(store).password == "from-stdin"
    assert "from-stdin" not in capsys.readouterr().out


@pytest.mark.parametrize("bad", ['a"b', "a\\b", "x" * 81, "caf\u00e9", "tab\there"])
def test_an_invalid_password_is_refused_and_nothing_stored(bad):
    store = MemoryStore()
    store.put(keys.BGP_CONFIG, BgpConfig(password=SECRET).to_json())
    with pytest.raises(InvalidRequest) as refused:
        run(store, "password", bad)
    assert bad not in str(refused.value) and SECRET not in str(refused.value)
    assert records.bgp_config(store).password == SECRET


def test_password_and_clear_together_are_refused():
    with pytest.raises(InvalidRequest, match="not both"):
        run(MemoryStore(), "password", SECRET, "--clear")


def test_ttl_security_on_off_and_shown(capsys):
    store = MemoryStore()
    assert run(store, "ttl-security") == 0
    assert capsys.readouterr().out == "off\n"
    assert run(store, "ttl-security", "on") == 0
    assert "TTL security turned on" in capsys.readouterr().out
    assert records.bgp_config(store).ttl_security is True
    assert run(store, "ttl-security") == 0
    assert capsys.readouterr().out == "on\n"
    assert run(store, "ttl-security", "off") == 0
    assert records.bgp_config(store).ttl_security is False
    with pytest.raises(InvalidRequest, match="'on' or 'off'"):
        run(store, "ttl-security", "yes")


def test_other_bgp_settings_keep_the_password_and_ttl_security(capsys):
    store = MemoryStore()
    run(store, "password", SECRET)
    run(store, "ttl-security", "on")
    run(store, "node-mesh", "off")
    run(store, "default-node-as", "65010")
    assert records.bgp_config(store) == BgpConfig(
        node_mesh=False, as_num=65010, password=SECRET, ttl_security=True
    )
    assert SECRET not in capsys.readouterr().out
