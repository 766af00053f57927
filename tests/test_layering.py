"""The layering the folders promise: the core (``states``, ``orchestrator``) speaks to no
SDK, transport or database, and imports nothing from the edges above it.

``python -m tests.test_layering`` prints which package imports which (for a review or an
issue note).
"""

from __future__ import annotations

import ast
import subprocess
import sys
from collections import defaultdict
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
CORE = ("states", "orchestrator")
# Packages of this repo above the core: the bot's edges, entry points, tools and tests.
EDGES = ("adapters", "simulator", "app", "cli", "bench", "tests")
# What the core must not load, directly or through anything it imports.
BANNED = ("botbuilder", "botframework", "msrest", "aiohttp", "redis", "fakeredis")


def modules(package: str) -> list[str]:
    return sorted(
        f"{package}.{path.stem}" if path.stem != "__init__" else package
        for path in (ROOT / package).glob("*.py")
    )


def imports_of(path: Path) -> set[str]:
    """Every module ``path`` imports, at any depth of the file (TYPE_CHECKING blocks too)."""
    found: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        if isinstance(node, ast.Import):
            found.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module and not node.level:
            found.add(node.module)
    return found


def first_party() -> dict[str, Path]:
    """Top-level package or module name -> its files' directory (or file)."""
    names = {path.stem: path for path in ROOT.glob("*.py")}
    names |= {path.parent.name: path.parent for path in ROOT.glob("*/__init__.py")}
    return names


def package_graph() -> dict[str, set[str]]:
    """Which first-party package imports which, and which of ``BANNED`` it imports directly."""
    packages = first_party()
    graph: dict[str, set[str]] = defaultdict(set)
    for name, where in packages.items():
        files = [where] if where.is_file() else sorted(where.rglob("*.py"))
        for path in files:
            for module in imports_of(path):
                top = module.split(".")[0]
                if top != name and (top in packages or top in BANNED):
                    graph[name].add(top)
    return graph


def test_the_core_imports_nothing_from_the_edges() -> None:
    graph = package_graph()
    for package in CORE:
        assert not graph[package] & set(EDGES), (package, graph[package] & set(EDGES))
        assert not graph[package] & set(BANNED), (package, graph[package] & set(BANNED))


def test_no_core_module_loads_an_sdk_a_transport_or_redis() -> None:
    """Imported one after another in a fresh interpreter: the first that loads a banned
    package is named (a static scan would miss what a third-party import drags in)."""
    probe = (
        "import importlib, sys\n"
        f"banned = {BANNED!r}\n"
        "for name in sys.argv[1:]:\n"
        "    importlib.import_module(name)\n"
        "    loaded = sorted({m.split('.')[0] for m in sys.modules} & set(banned))\n"
        "    if loaded:\n"
        "        print(name, *loaded)\n"
        "        break\n"
    )
    core = [name for package in CORE for name in modules(package)]
    assert "orchestrator.turn" in core and "states.call" in core
    result = subprocess.run(
        [sys.executable, "-c", probe, *core], cwd=ROOT, capture_output=True, text=True, check=True
    )
    assert result.stdout == "", f"loads {result.stdout.strip()}"


def test_the_probe_sees_a_module_that_does_load_the_sdk() -> None:
    """The check above can fail: the bot adapter does load botbuilder."""
    result = subprocess.run(
        [sys.executable, "-c", "import sys, adapters.bot; print('botbuilder' in sys.modules)"],
        cwd=ROOT,
        capture_output=True,
        text=True,
        check=True,
    )
    assert result.stdout.strip() == "True"


if __name__ == "__main__":
    for package, imported in sorted(package_graph().items()):
        print(f"{package:13} -> {', '.join(sorted(imported))}")
