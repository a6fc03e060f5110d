"""``calicnm diags`` with MemoryStore and a canned command runner."""

from __future__ import annotations

import tarfile

from calicnm.config import Config
from calicnm.model import Host
from calicnm.node.diags import COMMANDS, collect
from calicnm.store import keys
from tests.fakes import MemoryStore


def fake_run(argv: list[str]) -> str:
    """Canned output; iptables-save as if it were not installed."""
    if argv[0] == "iptables-save":
        return f"$ {' '.join(argv)}\nfailed to run: [Errno 2] No such file or directory\n"
    return f"$ {' '.join(argv)} (exit 0)\noutput of {argv[0]}\n"


def read_tarball(path: str) -> dict[str, str]:
    with tarfile.open(path) as tar:
        out = {}
        for member in tar.getmembers():
            fh = tar.extractfile(member)
            assert fh is not None
            out[member.name] = fh.read().decode()
        return out


def test_the_tarball_holds_every_source(tmp_path):
    state = tmp_path / "state"
    state.mkdir()
    (state / "etcd.log").write_text("etcd started\n")
    store = MemoryStore()
    store.put(keys.host_meta("h1"), Host("h1", "198.18.0.2").to_json())
    (state / "bird.conf").write_text("router id 198.18.0.2;\n")
    key = tmp_path / "client-key.pem"
    key.write_text("PRIVATE KEY MATERIAL\n")
    config = Config(hostname="h1", state_dir=str(state), etcd_key_file=str(key))

    path = collect(
        config,
        store,
        str(tmp_path),
        lambda: "all good\n",
        run=fake_run,
        sources={"hostname": "env CALICNM_HOSTNAME"},
        docker=lambda: '[{"Name": "dataman", "Driver": "calicnm"}]\n',
    )

    assert path.startswith(str(tmp_path / "calicnm-diags-h1-")) and path.endswith(".tar.gz")
    files = read_tarball(path)
    top = path.rsplit("/", 1)[1].removesuffix(".tar.gz")
    names = {name.removeprefix(f"{top}/") for name in files}
    assert names == {
        *COMMANDS,
        "bird-protocols.txt",
        "node-journal.txt",
        "bpf-attachments.txt",
        "bpf-pins.txt",
        "bird.conf",
        "docker-networks.json",
        "hostname.txt",
        "config.txt",
        "status.txt",
        "etcd-calicnm.txt",
        "etcd.log",
    }
    assert all(name.startswith(f"{top}/") for name in files)
    assert files[f"{top}/status.txt"] == "all good\n"
    assert "CALICNM_HOSTNAME=h1  # env CALICNM_HOSTNAME\n" in files[f"{top}/config.txt"]
    assert "CALICNM_STATE_DIR=" in files[f"{top}/config.txt"]
    assert files[f"{top}/bird.conf"] == "router id 198.18.0.2;\n"
    assert "dataman" in files[f"{top}/docker-networks.json"]
    assert files[f"{top}/bird-protocols.txt"].startswith("$ birdc -s ")
    assert files[f"{top}/node-journal.txt"].startswith("$ journalctl -u calicnm")
    assert files[f"{top}/bpf-attachments.txt"].startswith("$ bpftool net show")
    assert not any("PRIVATE KEY MATERIAL" in text for text in files.values())
    assert files[f"{top}/ip-route.txt"].startswith("$ ip -4 route show table all (exit 0)")
    assert "failed to run" in files[f"{top}/iptables-save.txt"]
    assert files[f"{top}/etcd.log"] == "etcd started\n"
    assert keys.host_meta("h1") in files[f"{top}/etcd-calicnm.txt"]
    assert '"ip":"198.18.0.2"' in files[f"{top}/etcd-calicnm.txt"]


def test_an_unreachable_etcd_and_a_missing_log_are_recorded_not_fatal(tmp_path):
    store = MemoryStore()
    store.down = True
    config = Config(hostname="h1", state_dir=str(tmp_path / "nothing-here"))
    path = collect(
        config, store, str(tmp_path), lambda: "etcd: down\n", run=fake_run, docker=lambda: ""
    )
    files = {name.rsplit("/", 1)[1]: text for name, text in read_tarball(path).items()}
    assert files["etcd-calicnm.txt"].startswith("cannot read etcd: etcd is unreachable")
    assert files["etcd.log"].startswith("cannot read ")
    assert files["ip-link.txt"] == "$ ip -d link show (exit 0)\noutput of ip\n"


def test_the_default_runner_records_a_failure_instead_of_raising():
    from calicnm.node.diags import _run

    assert _run(["sh", "-c", "echo out; echo err >&2; exit 3"]) == (
        "$ sh -c echo out; echo err >&2; exit 3 (exit 3)\nout\nerr\n"
    )
    assert _run(["calicnm-no-such-command"]).startswith(
        "$ calicnm-no-such-command\nfailed to run: "
    )
