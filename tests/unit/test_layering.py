"""The import rules of the design: one adapter per third-party library, a
pure core, and no production module importing the tests."""

import ast
import pathlib

import pytest

PACKAGE = pathlib.Path(__file__).resolve().parents[2] / "calicnm"

ONLY_IMPORTER = {
    "flask": {"plugin_api"},
    "werkzeug": {"plugin_api"},
    "etcd3": {"datastore"},
    "grpc": {"datastore"},
    "pyroute2": {"plumbing"},
    "gunicorn": set(),
    "subprocess": {"iptables", "ipsets", "children", "diags", "bird"},
}
PURE = {"model", "blocks", "endpoint", "keys", "errors", "table", "policy", "profiles"}
IO_MODULES = {"socket", "subprocess", "http", "os", "flask", "etcd3", "pyroute2", "urllib"}


def imports(path):
    tree = ast.parse(path.read_text())
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            yield from (alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module:
            yield node.module


MODULES = sorted(p for p in PACKAGE.glob("*.py"))


@pytest.mark.parametrize("path", MODULES, ids=lambda p: p.stem)
def test_third_party_libraries_stay_behind_their_adapter(path):
    for name in imports(path):
        top = name.split(".")[0]
        if top in ONLY_IMPORTER:
            assert path.stem in ONLY_IMPORTER[top], f"{path.stem} imports {name}"
        assert top != "tests", f"{path.stem} imports the tests"


@pytest.mark.parametrize("stem", sorted(PURE))
def test_pure_core_does_no_io(stem):
    for name in imports(PACKAGE / f"{stem}.py"):
        assert name.split(".")[0] not in IO_MODULES, f"{stem} imports {name}"
