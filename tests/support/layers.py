"""The import rules of engine/ and events/, checked statically (``make lint`` runs this module).

Every import counts, at module level and inside functions, except those under
``if TYPE_CHECKING:`` (they never run). Three rules:

1. **No cycle** between modules.
2. **Every arrow points down** the layers below (a module may import its own
   layer or a lower one). The facade sits on top of the tools, the tools on
   the distributed host, that on the shell, the shell on the log, the log on
   the pure core (docs/architecture.md draws it).
3. **The core and ``events`` stand alone:** ``engine.core`` imports only
   ``events`` and the standard library; ``events`` imports nothing from
   ``engine`` and nothing outside the standard library.

``python -m tests.support.layers [ROOT]`` prints every breach and exits 1 if
there is one.
"""

from __future__ import annotations

import ast
import sys
from collections import defaultdict
from dataclasses import dataclass
from pathlib import Path

__all__ = ["LAYERS", "Breach", "check", "imports_of", "main"]

#: Top to bottom: each entry is one layer, a tuple of module prefixes.
LAYERS: tuple[tuple[str, ...], ...] = (
    ("engine.__main__",),
    ("engine.cli",),
    ("engine",),  # the package itself: it re-exports the public names
    ("engine.integrations",),
    ("engine.tools",),
    ("engine.policy",),
    ("engine.aio",),
    ("engine.store", "engine.metrics"),
    ("engine._backend", "engine.identity"),
    ("engine.distributed",),
    ("engine.shell",),
    ("engine.log",),
    ("engine.core",),
    ("engine._time",),
    ("events",),
)
#: What may only import the standard library, itself and the packages named.
STANDALONE = {"engine.core": ("engine.core", "events"), "events": ("events",)}


@dataclass(frozen=True, slots=True)
class Breach:
    module: str
    imported: str
    line: int
    rule: str

    def __str__(self) -> str:
        return f"{self.module}:{self.line}: imports {self.imported}: {self.rule}"


def _modules(root: Path) -> dict[str, Path]:
    found = {}
    for package in ("engine", "events"):
        for path in sorted((root / package).rglob("*.py")):
            parts = path.relative_to(root).with_suffix("").parts
            name = ".".join(parts[:-1] if parts[-1] == "__init__" else parts)
            found[name] = path
    return found


def _type_checking(node: ast.If) -> bool:
    test = node.test
    return (isinstance(test, ast.Name) and test.id == "TYPE_CHECKING") or (
        isinstance(test, ast.Attribute) and test.attr == "TYPE_CHECKING")


def imports_of(module: str, source: str, known: set[str], is_package: bool = False) -> list[tuple[str, int]]:
    """(imported module, line) for every import ``module`` runs (``from a import b`` names ``a.b`` when that is
    a module, else ``a``); relative imports resolved; TYPE_CHECKING blocks left out."""
    tree = ast.parse(source)
    skipped: set[int] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.If) and _type_checking(node):
            skipped.update(id(n) for child in node.body for n in ast.walk(child))
    package = module if is_package else module.rpartition(".")[0]
    out = []
    for node in ast.walk(tree):
        if id(node) in skipped:
            continue
        if isinstance(node, ast.Import):
            out.extend((alias.name, node.lineno) for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                parts = package.split(".")
                base = ".".join(parts[: len(parts) - node.level + 1] + ([base] if base else []))
            for alias in node.names:
                full = f"{base}.{alias.name}"
                out.append((full if full in known else base, node.lineno))
    return out


def _layer(module: str) -> int | None:
    best, depth = None, -1
    for index, prefixes in enumerate(LAYERS):
        for prefix in prefixes:
            if (module == prefix or module.startswith(prefix + ".")) and len(prefix) > depth:
                best, depth = index, len(prefix)
    return best


def _within(module: str, prefixes: tuple[str, ...]) -> bool:
    return any(module == p or module.startswith(p + ".") for p in prefixes)


def _cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """Strongly connected components of more than one module (Tarjan, iterative)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on: set[str] = set()
    found: list[list[str]] = []
    counter = 0
    for start in sorted(graph):
        if start in index:
            continue
        work = [(start, iter(sorted(graph[start])))]
        index[start] = low[start] = counter
        counter += 1
        stack.append(start)
        on.add(start)
        while work:
            node, edges = work[-1]
            for nxt in edges:
                if nxt not in index:
                    index[nxt] = low[nxt] = counter
                    counter += 1
                    stack.append(nxt)
                    on.add(nxt)
                    work.append((nxt, iter(sorted(graph[nxt]))))
                    break
                if nxt in on:
                    low[node] = min(low[node], index[nxt])
            else:
                work.pop()
                if work:
                    low[work[-1][0]] = min(low[work[-1][0]], low[node])
                if low[node] == index[node]:
                    component = []
                    while True:
                        top = stack.pop()
                        on.discard(top)
                        component.append(top)
                        if top == node:
                            break
                    if len(component) > 1:
                        found.append(sorted(component))
    return found


def check(root: Path) -> list[Breach]:
    """Every breach of the three rules in the tree at ``root``."""
    modules = _modules(root)
    known = set(modules)
    graph: dict[str, set[str]] = defaultdict(set)
    breaches: list[Breach] = []
    stdlib = sys.stdlib_module_names
    for module, path in modules.items():
        graph[module]
        own_layer = _layer(module)
        for imported, line in imports_of(module, path.read_text(), known, path.name == "__init__.py"):
            top = imported.split(".")[0]
            for prefix, allowed in STANDALONE.items():
                if _within(module, (prefix,)) and not _within(imported, allowed) and top not in stdlib:
                    others = ", ".join(allowed[1:]) or "nothing but itself"
                    breaches.append(Breach(module, imported, line,
                                           f"{prefix} imports only {others} and the standard library"))
            if top not in ("engine", "events"):
                continue
            target = imported if imported in known else next(
                (m for m in sorted(known, key=len, reverse=True) if imported.startswith(m + ".")), imported)
            if target in known and target != module:
                graph[module].add(target)
            theirs = _layer(target)
            if own_layer is not None and theirs is not None and theirs < own_layer:
                breaches.append(Breach(module, imported, line, f"points up (layer {LAYERS[theirs][0]} is above "
                                       f"{LAYERS[own_layer][0]})"))
    for component in _cycles(graph):
        breaches.append(Breach(component[0], " -> ".join(component), 0, "an import cycle"))
    return breaches


def main(argv: list[str] | None = None) -> int:
    args = sys.argv[1:] if argv is None else argv
    root = Path(args[0]) if args else Path(__file__).resolve().parents[2]
    breaches = check(root)
    for breach in breaches:
        print(breach)
    print(f"layers: {len(breaches)} breach(es)" if breaches else "layers: every import points down, no cycle")
    return 1 if breaches else 0


if __name__ == "__main__":
    sys.exit(main())
