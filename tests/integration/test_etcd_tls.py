"""A TLS etcd with client-certificate auth, reached with etcd's own file settings."""

from __future__ import annotations

import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from calicnm.config import Config
from calicnm.errors import DatastoreUnavailable, InvalidRequest
from calicnm.wiring import build_store
from lab.etcd import etcd_argv, free_port
from lab.procs import HarnessError, Process
from lab.tls import CertPair, TestCA, tls_etcd_args

pytestmark = pytest.mark.etcd


@pytest.fixture
def tls_etcd(tmp_path: Path) -> Iterator[tuple[str, TestCA, CertPair]]:
    try:
        ca = TestCA(tmp_path / "ca")
    except HarnessError as exc:
        pytest.skip(str(exc))
    server = ca.server(["127.0.0.1"])
    client = ca.client("client")
    port, peer = free_port(), free_port()
    url = f"https://127.0.0.1:{port}"
    argv = etcd_argv("tls", str(tmp_path / "data"), url, f"http://127.0.0.1:{peer}")
    with Process([*argv, *tls_etcd_args(ca, server)], tmp_path / "etcd.log"):
        yield url, ca, client


def test_client_certificates(tls_etcd):
    url, ca, client = tls_etcd
    config = Config.from_env(
        None,
        {
            "ETCD_ENDPOINTS": url,
            "ETCD_TRUSTED_CA_FILE": str(ca.cert),
            "ETCD_CERT_FILE": str(client.cert),
            "ETCD_KEY_FILE": str(client.key),
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
        Config.from_env(None, {"ETCD_ENDPOINTS": url, "ETCD_TRUSTED_CA_FILE": str(ca.cert)}),
        timeout=2.0,
    )
    with pytest.raises(DatastoreUnavailable):
        no_cert.get("/calicnm/v1/config/tls")
    no_cert.close()


def test_https_without_a_ca_is_refused_up_front():
    store = build_store(Config.from_env(None, {"ETCD_ENDPOINTS": "https://127.0.0.1:1"}))
    with pytest.raises(InvalidRequest, match="ETCD_TRUSTED_CA_FILE"):
        store.get("/x")
