"""The import rules of the design, checked on the source tree.

- One adapter per outside library: only the named module imports it.
- A pure core: the listed modules import no I/O module (they reach etcd
  only through the ``Store`` protocol they are handed).
- Imports run down, never back up: each module belongs to a layer, and
  imports only from its own group or from lower layers.
- Nothing under ``calicnm/`` imports the tests, the lab or the benchmarks.
"""

from __future__ import annotations

import ast
import pathlib

import pytest

ROOT = pathlib.Path(__file__).resolve().parents[2]
PACKAGE = ROOT / "calicnm"

ONLY_IMPORTER = {
    "flask": {"calicnm.plugin_api"},
    "werkzeug": {"calicnm.plugin_api"},
    "etcd3": {"calicnm.store.etcd"},
    "grpc": {"calicnm.store.etcd"},
    "pyroute2": {"calicnm.host.netlink"},
    "prometheus_client": {"calicnm.node.metrics"},
    "gunicorn": set(),
    "subprocess": {
        "calicnm.host.fastpath",
        "calicnm.host.iptables",
        "calicnm.host.ipsets",
        "calicnm.node.children",
        "calicnm.node.diags",
        "calicnm.routing.bird",
    },
}

CORE_MODULES = {
    "calicnm.errors",
    "calicnm.validation",
    "calicnm.model",
    "calicnm.blocks",
    "calicnm.policy",
    "calicnm.endpoint",
    "calicnm.profiles",
    "calicnm.ownership",
}
"""The pure core: top-level modules that take values and return values."""

PURE = CORE_MODULES | {
    "calicnm.ipam",
    "calicnm.agent_index",
    "calicnm.store.keys",
    "calicnm.store.kv",
    "calicnm.store.records",
    "calicnm.store.edits",
    "calicnm.routing.bgp",
    "calicnm.routing.encap",
    "calicnm.cli.table",
}
IO_MODULES = {"socket", "subprocess", "http", "os", "flask", "etcd3", "grpc", "pyroute2", "urllib"}

CORE = "core"
"""Top-level modules that are the pure core (records, policy, plans)."""

LAYERS: dict[str, int] = {
    CORE: 0,
    "calicnm.faults": 0,
    "calicnm.config": 1,
    "calicnm.store": 1,
    "calicnm.host": 1,
    "calicnm.ipam": 2,
    "calicnm.agent_index": 2,
    "calicnm.routing": 3,
    "calicnm.driver": 4,
    "calicnm.wiring": 5,
    "calicnm.node": 6,
    "calicnm.cli": 7,
    "calicnm.plugin_api": 7,
}
"""A module imports from its own group or from a group of a lower layer.
Groups on one layer (``store`` and ``host``) do not import each other."""


def module_name(path: pathlib.Path) -> str:
    parts = path.relative_to(ROOT).with_suffix("").parts
    if parts[-1] == "__init__":
        parts = parts[:-1]
    return ".".join(parts)


def group(module: str) -> str:
    if module == "calicnm" or module in CORE_MODULES:
        return CORE
    for name in sorted(LAYERS, key=len, reverse=True):
        if module == name or module.startswith(name + "."):
            return name
    raise AssertionError(f"{module} belongs to no layer; add it to LAYERS or CORE_MODULES")


def imports(path: pathlib.Path) -> list[str]:
    tree = ast.parse(path.read_text())
    found = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            found += [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom) and node.module:
            if node.module == "calicnm":
                found += [f"calicnm.{alias.name}" for alias in node.names]
            else:
                found += [node.module]
                found += [f"{node.module}.{alias.name}" for alias in node.names]
    return found


MODULES = sorted(PACKAGE.rglob("*.py"))
NAMES = {module_name(p) for p in MODULES}


@pytest.mark.parametrize("path", MODULES, ids=module_name)
def test_third_party_libraries_stay_behind_their_adapter(path):
    me = module_name(path)
    for name in imports(path):
        top = name.split(".")[0]
        if top in ONLY_IMPORTER:
            assert me in ONLY_IMPORTER[top], f"{me} imports {name}"
        assert top not in ("tests", "lab", "bench"), f"{me} imports {name}"


@pytest.mark.parametrize("module", sorted(PURE))
def test_pure_core_does_no_io(module):
    path = ROOT / (module.replace(".", "/") + ".py")
    for name in imports(path):
        assert name.split(".")[0] not in IO_MODULES, f"{module} imports {name}"


@pytest.mark.parametrize("path", MODULES, ids=module_name)
def test_imports_run_down_the_layers(path):
    me = module_name(path)
    mine = group(me)
    for name in imports(path):
        if not name.startswith("calicnm") or name not in NAMES:
            continue  # a name imported from a module, or an outside library
        theirs = group(name)
        if theirs == mine:
            continue
        assert LAYERS[theirs] < LAYERS[mine], (
            f"{me} ({mine}, layer {LAYERS[mine]}) imports {name} "
            f"({theirs}, layer {LAYERS[theirs]}): imports must run down"
        )


def test_every_module_has_a_layer_and_the_card_modules_stay_put():
    for name in NAMES:
        group(name)
    for card in ("plugin_api", "ipam", "endpoint", "profiles"):
        assert (PACKAGE / f"{card}.py").is_file()
