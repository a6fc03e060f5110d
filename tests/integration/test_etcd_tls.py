"""A TLS etcd with client-certificate auth, reached with etcd's own file settings."""

from __future__ import annotations

import os
import shutil
import subprocess
import time

import pytest

from calicnm.config import Config
from calicnm.errors import DatastoreUnavailable, InvalidRequest
from calicnm.wiring import build_store
from lab.etcd import free_port

pytestmark = pytest.mark.etcd


def openssl(*args: str, cwd: str) -> None:
    subprocess.run(["openssl", *args], cwd=cwd, check=True, capture_output=True)


@pytest.fixture
def tls_etcd(tmp_path):
    if shutil.which("openssl") is None:
        pytest.skip("openssl is not installed")
    d = str(tmp_path)
    openssl(
        "req",
        "-x509",
        "-newkey",
        "rsa:2048",
        "-nodes",
        "-days",
        "1",
        "-subj",
        "/CN=test-ca",
        "-keyout",
        "ca.key",
        "-out",
        "ca.crt",
        cwd=d,
    )
    with open(os.path.join(d, "san.cnf"), "w") as fh:
        fh.write("subjectAltName=IP:127.0.0.1\nextendedKeyUsage=serverAuth,clientAuth\n")
    for name in ("server", "client"):
        openssl(
            "req",
            "-newkey",
            "rsa:2048",
            "-nodes",
            "-subj",
            f"/CN={name}",
            "-keyout",
            f"{name}.key",
            "-out",
            f"{name}.csr",
            cwd=d,
        )
        openssl(
            "x509",
            "-req",
            "-in",
            f"{name}.csr",
            "-CA",
            "ca.crt",
            "-CAkey",
            "ca.key",
            "-CAcreateserial",
            "-days",
            "1",
            "-extfile",
            "san.cnf",
            "-out",
            f"{name}.crt",
            cwd=d,
        )
    port, peer = free_port(), free_port()
    url = f"https://127.0.0.1:{port}"
    log = open(os.path.join(d, "etcd.log"), "ab")  # noqa: SIM115
    proc = subprocess.Popen(
        [
            "etcd",
            "--name",
            "tls",
            "--data-dir",
            os.path.join(d, "data"),
            "--listen-client-urls",
            url,
            "--advertise-client-urls",
            url,
            "--listen-peer-urls",
            f"http://127.0.0.1:{peer}",
            "--initial-advertise-peer-urls",
            f"http://127.0.0.1:{peer}",
            "--initial-cluster",
            f"tls=http://127.0.0.1:{peer}",
            "--cert-file",
            f"{d}/server.crt",
            "--key-file",
            f"{d}/server.key",
            "--trusted-ca-file",
            f"{d}/ca.crt",
            "--client-cert-auth",
        ],
        stdout=log,
        stderr=log,
        start_new_session=True,
    )
    log.close()
    try:
        yield url, d
    finally:
        proc.terminate()
        proc.wait(timeout=10)


def test_client_certificates(tls_etcd):
    url, d = tls_etcd
    config = Config.from_env(
        None,
        {
            "ETCD_ENDPOINTS": url,
            "ETCD_TRUSTED_CA_FILE": f"{d}/ca.crt",
            "ETCD_CERT_FILE": f"{d}/client.crt",
            "ETCD_KEY_FILE": f"{d}/client.key",
        },
    )
    store = build_store(config, timeout=3.0)
    deadline = time.monotonic() + 30
    while True:
        try:
            store.put("/calicnm/v1/config/tls", "yes")
            break
        except DatastoreUnavailable:
            if time.monotonic() > deadline:
                raise
            time.sleep(0.3)
    assert store.get("/calicnm/v1/config/tls").value == "yes"
    store.close()

    # Without a client certificate the server refuses us: a clear error.
    no_cert = build_store(
        Config.from_env(None, {"ETCD_ENDPOINTS": url, "ETCD_TRUSTED_CA_FILE": f"{d}/ca.crt"}),
        timeout=2.0,
    )
    with pytest.raises(DatastoreUnavailable):
        no_cert.get("/calicnm/v1/config/tls")
    no_cert.close()


def test_https_without_a_ca_is_refused_up_front():
    store = build_store(Config.from_env(None, {"ETCD_ENDPOINTS": "https://127.0.0.1:1"}))
    with pytest.raises(InvalidRequest, match="ETCD_TRUSTED_CA_FILE"):
        store.get("/x")
