"""Import contracts. The server's layers (pyproject.toml, checked by import-linter): each imports only
those below it. Adaptors (and the compatibility package that re-exports them to the existing
gateway's adaptors) depend on their contract and libraries, never on the server in `proxy/`. What an
adaptor needs from the server is handed to it (`AdaptorContext`). And the tests and the benchmarks share
code only through `testing/`. Run by `make lint` as well."""

from __future__ import annotations

import ast
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
INDEPENDENT = ("adaptors", "resource_server_async")


def imported_modules(path: Path) -> set[str]:
    """Every module a file imports, at its top or inside a function."""
    names: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            names.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            names.add(node.module)
    return names


@pytest.mark.parametrize("package", INDEPENDENT)
def test_adaptors_never_import_the_server(package: str) -> None:
    offending = {
        str(path.relative_to(ROOT)): sorted(
            name for name in imported_modules(path) if name.split(".")[0] == "proxy"
        )
        for path in sorted((ROOT / package).rglob("*.py"))
    }
    assert {path: names for path, names in offending.items() if names} == {}


def test_the_contract_check_sees_a_violation(tmp_path: Path) -> None:
    module = tmp_path / "bad.py"
    module.write_text("def f():\n    from proxy.settings import GatewaySettings\n    import proxy.errors\n")
    assert {"proxy.settings", "proxy.errors"} <= imported_modules(module)


def lint_imports(root: Path) -> subprocess.CompletedProcess[str]:
    """The contracts in pyproject.toml, checked by import-linter against the packages under `root`."""
    return subprocess.run(
        [str(Path(sys.executable).with_name("lint-imports")), "--config", str(root / "pyproject.toml")],
        cwd=root,
        env={**os.environ, "PYTHONPATH": str(root)},
        capture_output=True,
        text=True,
    )


def test_the_server_keeps_its_layers() -> None:
    result = lint_imports(ROOT)
    assert result.returncode == 0, result.stdout + result.stderr


def test_a_layer_importing_one_above_it_breaks_the_contract(tmp_path: Path) -> None:
    for package in ("proxy", "adaptors", "resource_server_async"):
        shutil.copytree(ROOT / package, tmp_path / package, ignore=shutil.ignore_patterns("__pycache__"))
    shutil.copy(ROOT / "pyproject.toml", tmp_path)
    tally = tmp_path / "proxy" / "metrics" / "tally.py"
    tally.write_text(tally.read_text() + "\n\ndef _upward() -> None:\n    from proxy.core import usage\n")
    result = lint_imports(tmp_path)
    assert result.returncode != 0
    assert "proxy.metrics.tally -> proxy.core.usage" in result.stdout


SHARED_CODE = {
    "tests": ("bench",),
    "bench": ("tests",),
    "testing": ("tests", "bench", "proxy"),
}
"""The tests and the benchmarks share their fakes and servers through `testing/` only, never each other;
`testing/` stands on its own, and never borrows the gateway's code (a fake must not agree with the
gateway by sharing it)."""


def forbidden_imports(root: Path, package: str, forbidden: tuple[str, ...]) -> dict[str, list[str]]:
    """Each file of `package` under `root` that imports one of the `forbidden` top-level packages, with
    the modules it imports from them."""
    found = {}
    for path in sorted((root / package).rglob("*.py")):
        names = sorted(name for name in imported_modules(path) if name.split(".")[0] in forbidden)
        if names:
            found[str(path.relative_to(root))] = names
    return found


@pytest.mark.parametrize(("package", "forbidden"), SHARED_CODE.items())
def test_tests_and_benchmarks_share_code_through_testing_only(
    package: str, forbidden: tuple[str, ...]
) -> None:
    assert forbidden_imports(ROOT, package, forbidden) == {}


def test_the_shared_code_check_sees_a_violation(tmp_path: Path) -> None:
    (tmp_path / "testing" / "fakes").mkdir(parents=True)
    (tmp_path / "testing" / "fakes" / "bad.py").write_text(
        "import bench.common\nfrom tests.support import free_port\n\n"
        "def f():\n    from proxy.errors import x\n"
    )
    (tmp_path / "testing" / "good.py").write_text("from testing.ports import free_port\nimport aiohttp\n")
    (tmp_path / "bench").mkdir()
    (tmp_path / "bench" / "bad.py").write_text("from tests.fake_globus import FakeGlobus\n")
    assert forbidden_imports(tmp_path, "testing", SHARED_CODE["testing"]) == {
        "testing/fakes/bad.py": ["bench.common", "proxy.errors", "tests.support"]
    }
    assert forbidden_imports(tmp_path, "bench", SHARED_CODE["bench"]) == {
        "bench/bad.py": ["tests.fake_globus"]
    }
