"""The package's architecture rules, counted from the source with ``ast`` (run in CI).

    import cycles among moe modules                    0
    imports that point up the layers below             0
    moe.* imports inside functions outside cli.py      at most 2 (each with a comment saying why)
    modules in one package (folder)                    at most 14
    lines in one module                                at most 450

The layers, lowest first (docs/ARCHITECTURE.md): a module may import its own layer and lower
ones only.

A module ``a`` imports ``b`` when it says ``import b``, ``from b import x`` (``b.x`` when ``x`` is
itself a module) or ``from a_pkg import b``; importing a submodule runs its package's
``__init__`` too, which counts as an import of the package. Prints a table of the figures and
exits 1 when a rule is broken, naming the offenders.

    python scripts/check_imports.py [--json FILE]
"""

from __future__ import annotations

import argparse
import ast
import json
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
PACKAGE = "moe"
LIMITS = {
    "cycles": 0,
    "upward_imports": 0,
    "function_imports": 2,
    "modules_per_package": 14,
    "module_lines": 450,
}
LAYERS = [
    ["moe", "moe.errors", "moe.config_io", "moe.runfiles", "moe.rundir"],
    ["moe.pod"],  # the hardware model: slices, virtual devices, cost of a compiled program
    ["moe.routing"],  # pure functions of router logits
    ["moe.parallel"],  # axes, meshes, the expert exchange, processes
    ["moe.config", "moe.config_sections", "moe.config_families"],  # the experiment schema
    ["moe.layers"],  # Flax modules from narrow specs
    ["moe.data", "moe.eval"],  # input pipeline; decoding and BLEU
    ["moe.training"],  # the experiment becomes objects and trains
    ["moe.pathways"],  # surgery on trained runs: extract, grow, learned pathways
    ["moe.serving"],  # serving a trained run: translate, quantize, distill, their costs
    ["moe.placement"],  # expert-to-device placement from routing statistics (moe place)
    ["moe.report"],  # documents from a run directory
    ["moe.cli", "moe.cli_args"],
]


def layer_of(module: str) -> int:
    """Index in LAYERS of the longest prefix naming ``module``'s layer."""
    best, rank = -1, len(LAYERS)
    for i, names in enumerate(LAYERS):
        for name in names:
            if (module == name or module.startswith(name + ".")) and len(name) > best:
                best, rank = len(name), i
    return rank


def modules(root: Path) -> dict[str, Path]:
    """``{"moe.training.loop": path}`` for every module of the package."""
    out = {}
    for path in sorted((root / PACKAGE).rglob("*.py")):
        parts = list(path.relative_to(root).with_suffix("").parts)
        if parts[-1] == "__init__":
            parts.pop()
        out[".".join(parts)] = path
    return out


def _targets(node: ast.AST, name: str, known: dict[str, Path]) -> list[str]:
    """The moe modules one import statement of module ``name`` loads."""
    if isinstance(node, ast.Import):
        found = [a.name for a in node.names]
    elif isinstance(node, ast.ImportFrom):
        base = node.module or ""
        if node.level:  # relative import
            pkg = name if known[name].name == "__init__.py" else name.rpartition(".")[0]
            for _ in range(node.level - 1):
                pkg = pkg.rpartition(".")[0]
            base = f"{pkg}.{base}" if base else pkg
        found = [f"{base}.{a.name}" if f"{base}.{a.name}" in known else base for a in node.names]
    else:
        return []
    out = []
    for mod in dict.fromkeys(found):
        while mod and mod not in known:  # `import moe.x.y.attr`-style: the longest module
            mod = mod.rpartition(".")[0]
        if mod.startswith(PACKAGE):
            out.append(mod)
    return out


def graph(known: dict[str, Path]) -> tuple[dict[str, set[str]], list[tuple[str, int, str]]]:
    """Import edges (module -> modules, parent packages included) and the moe imports that
    sit inside a function: (module, line, imported)."""
    edges: dict[str, set[str]] = {m: set() for m in known}
    inside: list[tuple[str, int, str]] = []
    for name, path in known.items():
        tree = ast.parse(path.read_text(encoding="utf-8"))
        functions = [
            n for n in ast.walk(tree) if isinstance(n, ast.FunctionDef | ast.AsyncFunctionDef)
        ]
        nested = {id(n) for f in functions for n in ast.walk(f) if n is not f}
        for node in ast.walk(tree):
            for target in _targets(node, name, known):
                if id(node) in nested:
                    inside.append((name, node.lineno, target))
                parts = target.split(".")
                for i in range(1, len(parts) + 1):  # a submodule runs its packages' __init__
                    dep = ".".join(parts[:i])
                    if dep in known and dep != name and not name.startswith(dep + "."):
                        edges[name].add(dep)
    return edges, inside


def cycles(edges: dict[str, set[str]]) -> list[list[str]]:
    """The strongly connected components with more than one module (Tarjan)."""
    index, low, stack, on, out = {}, {}, [], set(), []
    counter = [0]

    def visit(v):
        index[v] = low[v] = counter[0]
        counter[0] += 1
        stack.append(v)
        on.add(v)
        for w in sorted(edges[v]):
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            comp = []
            while True:
                w = stack.pop()
                on.discard(w)
                comp.append(w)
                if w == v:
                    break
            if len(comp) > 1:
                out.append(sorted(comp))

    sys.setrecursionlimit(10000)
    for v in sorted(edges):
        if v not in index:
            visit(v)
    return out


def check(root: Path = ROOT) -> dict:
    known = modules(root)
    edges, inside = graph(known)
    outside_cli = [x for x in inside if x[0] != f"{PACKAGE}.cli"]
    packages: dict[str, int] = {}
    for path in known.values():
        folder = str(path.parent.relative_to(root))
        packages[folder] = packages.get(folder, 0) + 1
    lines = {
        str(p.relative_to(root)): len(p.read_text(encoding="utf-8").splitlines())
        for p in known.values()
    }
    found = cycles(edges)
    upward = [
        f"{a} imports {b}" for a, deps in edges.items() for b in deps if layer_of(b) > layer_of(a)
    ]
    return {
        "modules": len(known),
        "cycles": found,
        "upward_imports": sorted(upward),
        "function_imports": [f"{m}:{line} imports {t}" for m, line, t in outside_cli],
        "largest_packages": dict(sorted(packages.items(), key=lambda kv: -kv[1])[:5]),
        "largest_modules": dict(sorted(lines.items(), key=lambda kv: -kv[1])[:5]),
        "broken": {
            "cycles": len(found) > LIMITS["cycles"],
            "upward_imports": len(upward) > LIMITS["upward_imports"],
            "function_imports": len(outside_cli) > LIMITS["function_imports"],
            "modules_per_package": max(packages.values()) > LIMITS["modules_per_package"],
            "module_lines": max(lines.values()) > LIMITS["module_lines"],
        },
    }


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--json", help="also write the figures as JSON here")
    args = parser.parse_args()
    result = check()
    if args.json:
        Path(args.json).write_text(json.dumps(result, indent=1))
    pkg, mod = result["largest_packages"], result["largest_modules"]
    found = {
        "cycles": ("import cycles", len(result["cycles"])),
        "upward_imports": ("imports that point up the layers", len(result["upward_imports"])),
        "function_imports": (
            "moe imports inside functions (not cli.py)",
            len(result["function_imports"]),
        ),
        "modules_per_package": (
            f"modules in the largest package ({next(iter(pkg))})",
            max(pkg.values()),
        ),
        "module_lines": (f"lines of the largest module ({next(iter(mod))})", max(mod.values())),
    }
    rows = [(what, n, LIMITS[rule]) for rule, (what, n) in found.items()]
    width = max(len(r[0]) for r in rows)
    print(f"{'rule':<{width}}  {'found':>5}  {'limit':>5}")
    for what, found, limit in rows:
        print(f"{what:<{width}}  {found:>5}  {limit:>5}{'  <- over' if found > limit else ''}")
    for comp in result["cycles"]:
        print("cycle: " + " -> ".join(comp))
    for line in result["upward_imports"]:
        print("upward: " + line)
    for line in result["function_imports"]:
        print("inside a function: " + line)
    broken = [k for k, v in result["broken"].items() if v]
    if broken:
        print(f"check_imports: broken rules: {', '.join(broken)}")
        return 1
    print(f"check_imports: {result['modules']} modules, all rules hold")
    return 0


if __name__ == "__main__":
    sys.exit(main())
