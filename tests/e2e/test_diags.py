"""``calicnm diags`` on a running host: the archive is private and holds BIRD's
configuration and protocols, Docker's view of its calicnm networks and the effective
settings with their sources, next to the kernel's state and the etcd tree."""

from __future__ import annotations

import json
import os
import tarfile
from pathlib import Path

from lab.cluster import CalicnmHost


def test_diags_holds_bird_docker_and_settings(host: CalicnmHost, tmp_path: Path) -> None:
    host.create_network("diagnet")
    try:
        out = tmp_path / "out"
        out.mkdir()
        result = host.calicnm("diags", "--out", str(out), "--state-dir", str(host.state_dir))
        (archive,) = out.glob("calicnm-diags-*.tar.gz")
        assert str(archive) in result.stdout
        assert os.stat(archive).st_mode & 0o777 == 0o600
        with tarfile.open(archive) as tar:
            files = {}
            for member in tar.getmembers():
                fh = tar.extractfile(member)
                assert fh is not None and member.mode == 0o600
                files[member.name.rsplit("/", 1)[1]] = fh.read().decode()
        assert "router id" in files["bird.conf"]
        assert "(exit 0)" in files["bird-protocols.txt"].splitlines()[0]
        networks = json.loads(files["docker-networks.json"])
        assert [n["Name"] for n in networks] == ["diagnet"]
        assert f"CALICNM_HOSTNAME={host.hostname}  # env CALICNM_HOSTNAME" in files["config.txt"]
        assert "calicnm-FORWARD" in files["iptables-save.txt"]
        assert "/calicnm/v1/networks/" in files["etcd-calicnm.txt"]
        assert "node-journal.txt" in files  # journalctl's answer, or why there is none
    finally:
        host.docker("network", "rm", "diagnet")
