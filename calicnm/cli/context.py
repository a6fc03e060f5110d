"""What every CLI command shares: its context (settings, a lazily built
store) and its two ways of speaking (plain lines, JSON)."""

from __future__ import annotations

import argparse
import json
from collections.abc import Callable
from typing import Any

from calicnm.config import Config
from calicnm.ipam import Allocator
from calicnm.model import Network
from calicnm.store.etcd import EtcdStore
from calicnm.wiring import build_store


class Context:
    def __init__(self, args: argparse.Namespace) -> None:
        self.args = args
        self.config, self.sources = Config.load(args)
        self._store: EtcdStore | None = None

    @property
    def store(self) -> EtcdStore:
        if self._store is None:
            self._store = build_store(self.config, timeout=3.0)
        return self._store

    @property
    def ipam(self) -> Allocator:
        return Allocator(self.store, self.config.hostname)

    def close(self) -> None:
        if self._store is not None:
            self._store.close()


def out(text: str) -> None:
    print(text)


def emit_json(data: Any) -> None:
    print(json.dumps(data, indent=2, sort_keys=True))


Command = Callable[[Context], int]


def network_label(network: Network | None, network_id: str) -> str:
    if network is None:
        return f"(deleted) {network_id[:12]}"
    return network.docker_name or f"(unnamed) {network_id[:12]}"
