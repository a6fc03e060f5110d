"""Helpers shared by the end-to-end tests (test modules import these, never each other)."""

from __future__ import annotations

import json
import sys

from lab.cluster import CalicnmHost
from lab.images import DEFAULT_IMAGE
from lab.paths import REPO
from lab.procs import run_bounded


def assert_nothing_left(host: CalicnmHost) -> None:
    """No veth, no /32 route, no allocation, no endpoint or network record."""
    assert host.links("cali", "tmp") == []
    assert [r for r in host.routes() if " dev cali" in r] == []
    stored = host.etcd_keys()
    assert [k for k in stored if "/endpoints/" in k] == []
    assert [k for k in stored if "/networks/" in k] == []
    for key, value in stored.items():
        if "/ipam/v4/blocks/" in key:
            assert json.loads(value)["allocations"] == {}, key


def http_ok(host: CalicnmHost, network: str, ip: str) -> bool:
    return host.fetch(network, f"http://{ip}/index.html").stdout.strip() == "hello"


def start_web(host: CalicnmHost, name: str, network: str, *extra: str) -> str:
    """A busybox httpd container ``name`` on ``network`` serving "hello"; its address."""
    host.docker(
        "run",
        "-d",
        "--net",
        network,
        "--name",
        name,
        *extra,
        DEFAULT_IMAGE,
        "sh",
        "-c",
        "echo hello > /www/index.html && exec httpd -f -v -p 80 -h /www",
    )
    return host.ip_of(name, network)


def run_quick_bench(module: str, out: str, timeout: float = 600) -> tuple[int | None, str]:
    """Run ``python -m MODULE --quick --out OUT`` from the repository root; (exit status,
    output), or (None, output) if it timed out.  On a timeout it gets SIGTERM, which
    unwinds its teardown, and only then SIGKILL, so nothing it built outlives the test."""
    argv = [sys.executable, "-m", module, "--quick", "--out", out]
    return run_bounded(argv, timeout, cwd=REPO)
