"""The package layering of docs/architecture.md, checked on the source with ``ast`` (nothing of the project is imported).

Every import statement counts: module level, inside functions, under ``if TYPE_CHECKING:``, relative ones (resolved
against the file's package). A violation names the file, the line and the import. Also checked: the wheel installs
only the project's own packages, and no tracked file cites a document outside the repository.
"""

from __future__ import annotations

import ast
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

try:
    import tomllib
except ModuleNotFoundError:  # Python 3.10
    import tomli as tomllib  # type: ignore[no-redef]

ROOT = Path(__file__).resolve().parents[1]
PRODUCTION = ("coordinator", "site_agent", "protos", "fedcommon", "strategies")
STDLIB = frozenset(sys.stdlib_module_names) | {"__future__"}
# Documents that are not part of the repository; nothing may point readers at them.
OUTSIDE_DOCS = ("DESIGN" + ".md", "FIELD" + "-NOTES", "STYLE" + ".md")


@dataclass(frozen=True)
class Import:
    """One imported module: where the statement is and the absolute dotted name it imports."""

    path: Path
    line: int
    module: str

    def __str__(self) -> str:
        shown = self.path.relative_to(ROOT) if self.path.is_relative_to(ROOT) else self.path
        return f"{shown}:{self.line}: imports {self.module}"


def _package_of(path: Path, root: Path) -> list[str]:
    """The dotted package a file belongs to, as parts (``coordinator/rounds/engine.py`` -> coordinator, rounds)."""
    return list(path.relative_to(root).with_suffix("").parts)[:-1]


def imports_of(path: Path, root: Path = ROOT) -> list[Import]:
    """Every import statement in ``path`` (any depth), relative ones made absolute.

    Args:
        path: a Python source file under ``root``.
        root: the folder the top-level packages are in (the repository).

    Returns:
        One entry per imported module (``from a import b`` yields ``a``; ``import a.b, c`` yields ``a.b`` and ``c``).
    """
    tree = ast.parse(path.read_text(encoding="utf-8"), filename=str(path))
    found: list[Import] = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            found += [Import(path, node.lineno, alias.name) for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                package = _package_of(path, root)
                base = package[: len(package) - (node.level - 1)]
                module = ".".join(base + ([node.module] if node.module else []))
                if not node.module:  # ``from . import x``: each name may be a submodule
                    found += [Import(path, node.lineno, f"{module}.{alias.name}") for alias in node.names]
                    continue
            else:
                module = node.module or ""
            found.append(Import(path, node.lineno, module))
    return found


def _top(module: str) -> str:
    return module.split(".", 1)[0]


def _sources(package: str) -> list[Path]:
    return sorted((ROOT / package).rglob("*.py"))


def _violations(package: str, allowed: object) -> list[str]:
    """Imports in ``package`` for which ``allowed(import)`` is false, as ``file:line: imports X`` lines."""
    return [str(i) for p in _sources(package) for i in imports_of(p) if not allowed(i)]  # type: ignore[operator]


def _is(module: str, *prefixes: str) -> bool:
    return any(module == p or module.startswith(p + ".") for p in prefixes)


def test_coordinator_and_site_agent_never_import_each_other() -> None:
    # Execute
    bad = _violations("coordinator", lambda i: not _is(i.module, "site_agent"))
    bad += _violations("site_agent", lambda i: not _is(i.module, "coordinator"))
    # Assert
    assert not bad, "coordinator and site_agent must not import each other:\n" + "\n".join(bad)


def test_strategies_import_only_stdlib_torch_numpy_and_themselves() -> None:
    # Execute
    bad = _violations("strategies", lambda i: _top(i.module) in STDLIB or _is(i.module, "torch", "numpy", "strategies"))
    # Assert
    assert not bad, "strategies/ is pure aggregation math (stdlib, torch, numpy):\n" + "\n".join(bad)


def _protos_allowed(i: Import) -> bool:
    if _top(i.module) in STDLIB or _is(i.module, "grpc", "google.protobuf", "safetensors", "cryptography", "protos"):
        return True
    # The code generator itself (dev extra grpcio-tools) runs protoc; nothing imports it at run time.
    return i.path == ROOT / "protos" / "generate.py" and _is(i.module, "grpc_tools")


def test_protos_import_only_the_wire_libraries() -> None:
    # Execute
    bad = _violations("protos", _protos_allowed)
    # Assert
    assert not bad, "protos/ is the protocol only (no torch, numpy or project code):\n" + "\n".join(bad)


def test_fedcommon_imports_neither_side_nor_the_sandbox() -> None:
    # Execute
    bad = _violations("fedcommon", lambda i: not _is(i.module, "coordinator", "site_agent", "sandbox", "bench"))
    # Assert
    assert not bad, "fedcommon/ is shared by both sides and depends on neither:\n" + "\n".join(bad)


def test_production_packages_never_import_sandbox_or_bench() -> None:
    # Execute
    bad = [v for pkg in PRODUCTION for v in _violations(pkg, lambda i: not _is(i.module, "sandbox", "bench"))]
    # Assert
    assert not bad, "production code must not depend on the demo or the benchmarks:\n" + "\n".join(bad)


def test_the_import_scan_sees_every_kind_of_import_statement(tmp_path: Path) -> None:
    # Prepare: a module with a function-level, a TYPE_CHECKING and a relative import, inside a fake package.
    src = tmp_path / "strategies" / "sub" / "m.py"
    src.parent.mkdir(parents=True)
    src.write_text("from typing import TYPE_CHECKING\nif TYPE_CHECKING:\n    import coordinator.config\n"
                   "def f():\n    from site_agent import agent\n    return agent\n"
                   "from .. import fedavg\nfrom ..x import y\nimport numpy as np, torch.nn\n")
    # Execute
    got = [(i.line, i.module) for i in imports_of(src, root=tmp_path)]
    # Assert
    assert sorted(got) == [(1, "typing"), (3, "coordinator.config"), (5, "site_agent"), (7, "strategies.fedavg"),
                           (8, "strategies.x"), (9, "numpy"), (9, "torch.nn")]


def test_the_wheel_installs_only_the_projects_own_packages() -> None:
    # Prepare
    pyproject = tomllib.loads((ROOT / "pyproject.toml").read_text(encoding="utf-8"))
    # Execute
    include = pyproject["tool"]["setuptools"]["packages"]["find"]["include"]
    tops = {pattern.rstrip("*").rstrip(".") for pattern in include}
    # Assert
    assert tops.isdisjoint({"deploy", "bench", "tests", "docs"}), include
    assert set(PRODUCTION) <= tops, include


def _tracked_text_files() -> list[Path]:
    """Tracked .py/.md/.sh/.toml files (``git ls-files``; without git, every such file outside hidden/venv folders)."""
    suffixes = {".py", ".md", ".sh", ".toml"}
    try:
        out = subprocess.run(["git", "ls-files", "-z"], cwd=ROOT, capture_output=True, check=True, timeout=60).stdout
        paths = [ROOT / p for p in out.decode().split("\0") if p]
    except (OSError, subprocess.CalledProcessError):
        paths = [p for p in ROOT.rglob("*") if not any(part.startswith(".") or part in ("venv", "__pycache__")
                                                       for part in p.relative_to(ROOT).parts)]
    me = Path(__file__).resolve()
    return sorted(p for p in paths if p.suffix in suffixes and p.is_file() and p.resolve() != me)


def test_nothing_cites_documents_outside_the_repository() -> None:
    # Execute
    bad = [f"{p.relative_to(ROOT)}:{n}: cites {name}"
           for p in _tracked_text_files()
           for n, line in enumerate(p.read_text(encoding="utf-8", errors="replace").splitlines(), 1)
           for name in OUTSIDE_DOCS if name in line]
    # Assert
    assert not bad, "documents outside the repository (write it in docs/ instead):\n" + "\n".join(bad)
