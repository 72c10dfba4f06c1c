"""Flower stays inside the Flower adapter: only ``coordinator/flower/``, ``site_agent/flower/`` and (lazily)
``fedcommon/flowerwire.py`` import ``flwr``, and nothing outside them imports those modules (checked on the source)."""

from __future__ import annotations

import ast
from pathlib import Path

from test_layering import PRODUCTION, ROOT, imports_of

ADAPTER_DIRS = (ROOT / "coordinator" / "flower", ROOT / "site_agent" / "flower")
WIRE = ROOT / "fedcommon" / "flowerwire.py"


def _in_adapter(path: Path) -> bool:
    return any(path.is_relative_to(d) for d in ADAPTER_DIRS)


def _is(module: str, prefix: str) -> bool:
    return module == prefix or module.startswith(prefix + ".")


def test_only_the_flower_adapter_imports_flwr() -> None:
    bad = [str(i) for pkg in PRODUCTION for p in sorted((ROOT / pkg).rglob("*.py"))
           if not _in_adapter(p) and p != WIRE for i in imports_of(p) if _is(i.module, "flwr")]
    bad += [str(i) for pkg in PRODUCTION for p in sorted((ROOT / pkg).rglob("*.py")) if not _in_adapter(p)
            for i in imports_of(p) if _is(i.module, "coordinator.flower") or _is(i.module, "site_agent.flower")]
    assert not bad, "flwr belongs to the Flower adapter only:\n" + "\n".join(bad)


def test_flowerwire_imports_flwr_only_inside_functions() -> None:
    tree = ast.parse(WIRE.read_text(encoding="utf-8"))
    top = [n for n in tree.body if isinstance(n, (ast.Import, ast.ImportFrom))]
    assert not [n.lineno for n in top if any(_is(m, "flwr") for m in _names(n))]


def _names(node: ast.Import | ast.ImportFrom) -> list[str]:
    return [a.name for a in node.names] if isinstance(node, ast.Import) else [node.module or ""]
