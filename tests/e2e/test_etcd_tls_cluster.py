"""Two hosts on one etcd that takes only TLS with client certificates, as the
README's multi-host setup says to run it; and the node's warning when an etcd
off the host is reached without TLS."""

from __future__ import annotations

import re
from pathlib import Path

from lab.cluster import CalicnmHost, wait_until
from lab.etcd import etcd_argv
from lab.fabric import FABRIC_ADDRESS, Fabric
from lab.paths import CALICNM
from lab.tls import TestCA, tls_etcd_args
from tests.e2e.helpers import start_web

WARNING = "is not on this host and not TLS"


def test_two_hosts_on_an_etcd_with_client_certificates(tmp_path: Path) -> None:
    ca = TestCA(tmp_path / "ca")
    server = ca.server([FABRIC_ADDRESS])
    url = f"https://{FABRIC_ADDRESS}:2379"
    argv = etcd_argv("dc", str(tmp_path / "etcd"), url, f"http://{FABRIC_ADDRESS}:2380")
    with (
        Fabric() as fabric,
        fabric.netns.process([*argv, *tls_etcd_args(ca, server)], tmp_path / "etcd.log"),
    ):
        hosts: list[CalicnmHost] = []
        try:
            for name in ("tls1", "tls2"):
                att = fabric.add_host()
                client = ca.client(name)
                host = CalicnmHost(
                    att.host,
                    att.address,
                    tmp_path / name,
                    name,
                    etcd_endpoints=url,
                    extra_env={
                        "ETCD_TRUSTED_CA_FILE": str(ca.cert),
                        "ETCD_CERT_FILE": str(client.cert),
                        "ETCD_KEY_FILE": str(client.key),
                    },
                )
                hosts.append(host)
                host.start()
            a, b = hosts
            for host in hosts:
                host.create_network("secure")
                assert WARNING not in (host.workdir / "node.log").read_text()
            web = start_web(a, "webtls", "secure")
            assert wait_until(
                lambda: b.fetch("secure", f"http://{web}/index.html").stdout.strip() == "hello",
                30,
                "a container on tls2 reaches one on tls1",
            )
            # Without a client certificate etcd refuses: a clear one-line error.
            bare = {
                k: v for k, v in b.env().items() if k not in ("ETCD_CERT_FILE", "ETCD_KEY_FILE")
            }
            refused = b.netns.run([CALICNM, "pool", "show"], check=False, env=bare)
            assert refused.returncode == 1
            # calicnm's own report is one line (gRPC's C core may log the TLS
            # failure above it; its logging ignores GRPC_VERBOSITY).
            last = refused.stderr.strip().splitlines()[-1]
            assert re.fullmatch(r"calicnm: error: etcd is unreachable at .*", last)
        finally:
            for host in reversed(hosts):
                host.close()
