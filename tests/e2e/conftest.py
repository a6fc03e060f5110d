from __future__ import annotations

import os
import shutil
from collections.abc import Iterator
from pathlib import Path

import pytest

from lab.cluster import CalicnmHost, single_host


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    for item in items:
        if "/e2e/" in str(item.fspath):
            item.add_marker(pytest.mark.e2e)


def require_e2e() -> None:
    if os.geteuid() != 0:
        pytest.skip("end-to-end tests need root")
    for tool in ("dockerd", "etcd", "iptables"):
        if shutil.which(tool) is None:
            pytest.fail(f"{tool} is not installed; run 'make test', which installs it")


@pytest.fixture(scope="module")
def host(tmp_path_factory: pytest.TempPathFactory) -> Iterator[CalicnmHost]:
    """One emulated host (netns + calicnm node with embedded etcd + dockerd)
    shared by a test module; each test cleans up what it creates."""
    require_e2e()
    workdir: Path = tmp_path_factory.mktemp("host")
    with single_host(workdir) as h:
        yield h
