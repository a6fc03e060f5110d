"""A throwaway certificate authority for TLS etcd: one CA, a server
certificate for the addresses etcd listens on, and one client certificate per
name (etcd maps a client certificate's CN to a user).  Everything lives in
the directory given; nothing else is touched.  Needs ``openssl``."""

from __future__ import annotations

import shutil
import subprocess
from dataclasses import dataclass
from pathlib import Path

from lab.procs import HarnessError


@dataclass(frozen=True)
class CertPair:
    cert: Path
    key: Path


class TestCA:
    """``server(ips)`` and ``client(name)`` issue certificates valid for a day."""

    __test__ = False  # not a pytest class

    def __init__(self, directory: Path) -> None:
        if shutil.which("openssl") is None:
            raise HarnessError("openssl is not installed")
        self.dir = directory
        self.dir.mkdir(parents=True, exist_ok=True)
        self.cert = self.dir / "ca.crt"
        self._openssl(
            "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", "1",
            "-subj", "/CN=calicnm-test-ca", "-keyout", "ca.key", "-out", "ca.crt",
        )  # fmt: skip

    def _openssl(self, *args: str) -> None:
        proc = subprocess.run(
            ["openssl", *args], cwd=self.dir, capture_output=True, text=True, timeout=60
        )
        if proc.returncode != 0:
            raise HarnessError(f"openssl {args[0]} failed: {proc.stderr[-500:]}")

    def _issue(self, name: str, extensions: str) -> CertPair:
        ext = self.dir / f"{name}.cnf"
        ext.write_text(extensions)
        self._openssl(
            "req", "-newkey", "rsa:2048", "-nodes", "-subj", f"/CN={name}",
            "-keyout", f"{name}.key", "-out", f"{name}.csr",
        )  # fmt: skip
        self._openssl(
            "x509", "-req", "-in", f"{name}.csr", "-CA", "ca.crt", "-CAkey", "ca.key",
            "-CAcreateserial", "-days", "1", "-extfile", ext.name, "-out", f"{name}.crt",
        )  # fmt: skip
        return CertPair(self.dir / f"{name}.crt", self.dir / f"{name}.key")

    def server(self, ips: list[str]) -> CertPair:
        sans = ",".join(f"IP:{ip}" for ip in ips)
        return self._issue("server", f"subjectAltName={sans}\nextendedKeyUsage=serverAuth\n")

    def client(self, name: str) -> CertPair:
        return self._issue(name, "extendedKeyUsage=clientAuth\n")


def tls_etcd_args(ca: TestCA, server: CertPair) -> list[str]:
    """etcd flags for TLS with client-certificate authentication."""
    return [
        "--cert-file", str(server.cert), "--key-file", str(server.key),
        "--trusted-ca-file", str(ca.cert), "--client-cert-auth",
    ]  # fmt: skip
