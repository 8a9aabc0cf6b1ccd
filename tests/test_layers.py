"""The layer picture of docs/architecture.md, enforced: imports only go downward.

Every `import modistill.X` in the package (module level or inside a function) is checked against
the layer order below; a module may import its own layer and the layers beneath it, never above.
"""

from __future__ import annotations

import ast
from pathlib import Path

PACKAGE = Path(__file__).resolve().parent.parent / "src" / "modistill"

# Bottom to top. The first path component under modistill/ names the layer (a module or a package).
LAYERS = [
    {"errors", "config", "io", "faults", "__init__"},
    {"losses"},
    {"models", "upcycle", "moe", "router_metrics", "info"},
    {"scenes"},
    {"data"},
    {"runtime"},
    {"teacher"},
    {"eval"},
    {"stages"},
    {"demo"},
    {"cli", "smoke"},
]
RANK = {name: rank for rank, names in enumerate(LAYERS) for name in names}


def _layer_of(module: str) -> str:
    return module.split(".")[1] if module.count(".") else "__init__"


def _imports(path: Path) -> list[tuple[int, str]]:
    found = []
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            found.append((node.lineno, node.module))
        elif isinstance(node, ast.Import):
            found.extend((node.lineno, alias.name) for alias in node.names)
    return [(line, name) for line, name in found if name == "modistill" or name.startswith("modistill.")]


def test_every_package_module_has_a_layer():
    names = {p.relative_to(PACKAGE).parts[0].removesuffix(".py") for p in PACKAGE.rglob("*.py")}
    assert names <= set(RANK), f"add these to LAYERS: {sorted(names - set(RANK))}"


def test_imports_only_go_downward():
    upward = []
    for path in sorted(PACKAGE.rglob("*.py")):
        own = path.relative_to(PACKAGE).parts[0].removesuffix(".py")
        for line, name in _imports(path):
            target = _layer_of(name) if name != "modistill" else "__init__"
            if RANK[target] > RANK[own]:
                upward.append(f"{path.relative_to(PACKAGE)}:{line} imports {name} ({own} is below {target})")
    assert not upward, "\n".join(upward)
