"""The architecture holds: layers point one way, the core stays free of gRPC and friends,
no private name crosses a module, ``serve`` loads no tool, and each guard can fail."""

from __future__ import annotations

import ast
import shutil
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
SOURCES = [
    ROOT / "sidecar" / "order_sidecar",
    ROOT / "clients" / "python" / "order_sidecar_client",
    ROOT / "tools" / "order_sidecar_tools",
]


def lint_imports(tree: Path) -> subprocess.CompletedProcess[str]:
    """Run import-linter's contracts (*tree*/pyproject.toml) over the packages in *tree*."""
    path = ":".join(str(tree / part) for part in ("sidecar", "clients/python", "tools"))
    return subprocess.run(
        [sys.executable, "-c", _RUN_LINTER, path],
        capture_output=True,
        text=True,
        cwd=tree,
        timeout=120,
        check=False,
    )


def test_import_contracts_are_kept() -> None:
    result = lint_imports(ROOT)
    assert result.returncode == 0, result.stdout + result.stderr
    assert "0 broken" in result.stdout


@pytest.mark.parametrize(
    ("module", "line", "contract"),
    [
        ("sidecar/order_sidecar/core/gates.py", "import grpc", "core imports no gRPC"),
        (
            "sidecar/order_sidecar/core/hints.py",
            "from order_sidecar.runtime import config",
            "layers point down",
        ),
        (
            "clients/python/order_sidecar_client/contract.py",
            "import order_sidecar",
            "client never imports the sidecar",
        ),
        (
            "sidecar/order_sidecar/cli/__init__.py",
            "import order_sidecar_tools.demo",
            "sidecar never imports the tools",
        ),
    ],
)
def test_a_reversed_import_breaks_a_contract(
    tmp_path: Path, module: str, line: str, contract: str
) -> None:
    """Each contract is shown to fail: a copy of the tree with one reversed import."""
    copy = tmp_path / "tree"
    for part in ("sidecar", "clients/python", "tools"):
        shutil.copytree(ROOT / part, copy / part, ignore=shutil.ignore_patterns("__pycache__"))
    (copy / "pyproject.toml").write_text((ROOT / "pyproject.toml").read_text())
    target = copy / module
    target.write_text(target.read_text() + f"\n{line}  # reversed on purpose\n")
    result = lint_imports(copy)
    assert result.returncode != 0, result.stdout
    assert "BROKEN" in result.stdout.upper()
    assert contract.split()[0].lower() in result.stdout.lower()


_RUN_LINTER = textwrap.dedent(
    """
    import sys
    sys.path[:0] = sys.argv[1].split(":")
    sys.argv[1:] = ["--no-cache"]
    from importlinter.cli import lint_imports_command
    lint_imports_command()
    """
)


def _imports(path: Path) -> list[tuple[str, str, int]]:
    """(module, name, line) of every ``from module import name`` in *path*."""
    found: list[tuple[str, str, int]] = []
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            found.extend((node.module, alias.name, node.lineno) for alias in node.names)
    return found


def private_imports(paths: list[Path]) -> list[str]:
    """Private names imported from another module, and private modules imported from
    outside their package: ``file:line module.name`` for each."""
    problems = []
    for path in paths:
        package = _package_of(path)
        for module, name, line in _imports(path):
            if module == "__future__":
                continue
            parts = module.split(".")
            private_module = next((p for p in parts if _is_private(p)), None)
            if _is_private(name) or (
                private_module and not package.startswith(module.rsplit(".", 1)[0])
            ):
                problems.append(f"{path.relative_to(ROOT)}:{line} {module}.{name}")
    return problems


def _is_private(name: str) -> bool:
    return name.startswith("_") and not (name.startswith("__") and name.endswith("__"))


def _package_of(path: Path) -> str:
    for source in SOURCES:
        if source in path.parents:
            return ".".join((source.name, *path.relative_to(source).parent.parts))
    return "tests"


def test_no_private_name_crosses_a_module() -> None:
    files = [p for source in SOURCES for p in source.rglob("*.py")]
    files += list((ROOT / "tests").rglob("*.py"))
    assert private_imports(files) == []


def test_the_private_name_check_catches_one() -> None:
    inside = ROOT / "tests" / "unit" / "_probe_private_import.py"
    inside.write_text("from order_sidecar_tools.bench.runner import _hidden\n")
    try:
        assert private_imports([inside]) == [
            "tests/unit/_probe_private_import.py:1 order_sidecar_tools.bench.runner._hidden"
        ]
    finally:
        inside.unlink()


def test_serve_loads_no_bench_or_demo_module() -> None:
    probe = textwrap.dedent(
        """
        import sys
        from order_sidecar.cli import build_parser, command_modules
        assert "bench" in command_modules() and "demo" in command_modules()
        build_parser("serve").parse_args(["serve"])
        import order_sidecar.cli.serve
        loaded = sorted(m for m in sys.modules if m.startswith("order_sidecar_tools")
                        or m.endswith((".bench", ".demo")) or "matplotlib" in m)
        print(loaded)
        """
    )
    result = subprocess.run(
        [sys.executable, "-c", probe], capture_output=True, text=True, timeout=60, check=True
    )
    assert result.stdout.strip() == "[]", result.stdout


def test_the_module_check_sees_a_tool_when_one_is_loaded() -> None:
    probe = (
        "import sys; from order_sidecar.cli import build_parser; build_parser('bench'); "
        "print(sorted(m for m in sys.modules if m.startswith('order_sidecar_tools')))"
    )
    result = subprocess.run(
        [sys.executable, "-c", probe], capture_output=True, text=True, timeout=60, check=True
    )
    assert "order_sidecar_tools.bench.runner" in result.stdout
