"""The systemd units as an operator installs them (README, "Run it with systemd"):
``make install-systemd`` puts the units and an example settings file in place, keeps a
settings file that exists, and the units pass ``systemd-analyze verify``.  The node's
readiness notification is checked end to end in ``tests/e2e/test_service_notify.py``.

This machine's PID 1 is not systemd, so the units are verified, not started here."""

from __future__ import annotations

import os
import shutil
import subprocess
from pathlib import Path

import pytest

from lab.paths import REPO, VENV_BIN

UNITS = ("calicnm.service", "calicnm-route-reflector.service")


def install(destdir: Path) -> None:
    subprocess.run(
        ["make", "-s", "install-systemd", f"DESTDIR={destdir}"],
        cwd=REPO,
        check=True,
        timeout=60,
    )


def test_install_puts_units_and_settings_in_place_and_keeps_settings(tmp_path: Path) -> None:
    install(tmp_path)
    for unit in UNITS:
        installed = tmp_path / "etc/systemd/system" / unit
        assert installed.read_text() == (REPO / "packaging/systemd" / unit).read_text()
        assert installed.stat().st_mode & 0o777 == 0o644
    settings = tmp_path / "etc/calicnm/calicnm.env"
    assert settings.stat().st_mode & 0o777 == 0o600  # it may name key files
    settings.write_text("ETCD_ENDPOINTS=https://10.0.0.1:2379\n")
    install(tmp_path)
    assert settings.read_text() == "ETCD_ENDPOINTS=https://10.0.0.1:2379\n"


def test_the_node_unit_orders_before_docker_and_waits_for_readiness() -> None:
    text = (REPO / "packaging/systemd/calicnm.service").read_text()
    for line in (
        "Type=notify",
        "Before=docker.service",
        "Restart=always",
        "EnvironmentFile=-/etc/calicnm/calicnm.env",
        "KillMode=process",
        "ExecStart=/usr/local/bin/calicnm node run",
    ):
        assert line in text.splitlines(), line


@pytest.mark.skipif(shutil.which("systemd-analyze") is None, reason="needs systemd-analyze")
def test_the_units_verify(tmp_path: Path) -> None:
    calicnm = os.path.join(VENV_BIN, "calicnm")
    for unit in UNITS:
        text = (REPO / "packaging/systemd" / unit).read_text()
        # The installed command is /usr/local/bin/calicnm ('make deps' links it);
        # verify against this checkout's, which exists wherever the tests run.
        (tmp_path / unit).write_text(text.replace("/usr/local/bin/calicnm", calicnm))
    result = subprocess.run(
        ["systemd-analyze", "verify", *(str(tmp_path / u) for u in UNITS)],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert result.returncode == 0, result.stderr
    assert "calicnm" not in result.stderr, result.stderr
