"""Print the shape of src/imgcls: modules and lines per package, the longest functions, the
functions with the most parameters, import statements inside functions (per package, and those
that re-import what the module imports at the top), import cycles between modules, and private
names imported from another module. Used for the before/after figures of the redesigns (issues 14
and 27).

    python tools/code_shape.py [src/imgcls]
"""

from __future__ import annotations

import ast
import sys
from collections import defaultdict
from pathlib import Path


def module_name(path: Path, root: Path) -> str:
    parts = list(path.relative_to(root.parent).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def imports_of(tree: ast.Module, name: str, is_package: bool, known: set[str]) -> list[tuple[str, list[str]]]:
    """(imported module, names) for every import of a project module, absolute or relative."""
    found = []
    package = name if is_package else name.rpartition(".")[0]
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            found += [(alias.name, []) for alias in node.names if alias.name in known]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                parent = package.split(".")
                parent = parent[: len(parent) - node.level + 1]
                base = ".".join(parent + ([base] if base else []))
            names = [alias.name for alias in node.names]
            if base in known:
                # `from pkg import module` imports a module, not a name
                mods = [f"{base}.{n}" for n in names if f"{base}.{n}" in known]
                found += [(m, []) for m in mods]
                rest = [n for n in names if f"{base}.{n}" not in known]
                if rest or not mods:
                    found.append((base, rest))
    return found


def imported_modules(node: ast.Import | ast.ImportFrom) -> set[str]:
    """The modules an import statement loads (relative ones as written, dots included)."""
    if isinstance(node, ast.Import):
        return {alias.name for alias in node.names}
    return {"." * node.level + (node.module or "")}


def function_imports(tree: ast.Module) -> tuple[int, int]:
    """(import statements inside functions, those among them from a module that the file already
    imports at its top: that module is loaded with the file, so start-up cannot be the reason)."""
    top: set[str] = set()
    for node in tree.body:
        if isinstance(node, ast.Import):
            top |= imported_modules(node)
        elif isinstance(node, ast.ImportFrom):
            top |= imported_modules(node)
            # `from pkg import module` loads pkg.module too
            base = imported_modules(node).pop()
            top |= {f"{base.rstrip('.')}.{alias.name}" for alias in node.names}
    inside = again = 0
    for func in ast.walk(tree):
        if not isinstance(func, (ast.FunctionDef, ast.AsyncFunctionDef)):
            continue
        for node in ast.walk(func):
            # counted once, in the innermost function that holds it
            if isinstance(node, (ast.Import, ast.ImportFrom)) and innermost(func, node):
                inside += 1
                again += imported_modules(node) <= top
    return inside, again


def innermost(func: ast.AST, target: ast.AST) -> bool:
    """Whether target sits in func without another function between them."""
    for child in ast.iter_child_nodes(func):
        if child is target:
            return True
        if isinstance(child, (ast.FunctionDef, ast.AsyncFunctionDef, ast.Lambda)):
            continue
        if innermost(child, target):
            return True
    return False


def cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """Strongly connected components with more than one module (Tarjan)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on: set[str] = set()
    out: list[list[str]] = []

    def visit(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        on.add(v)
        for w in graph.get(v, ()):
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
    for v in graph:
        if v not in index:
            visit(v)
    return out


def main(root: Path) -> None:
    files = sorted(root.rglob("*.py"))
    names = {module_name(f, root): f for f in files}
    known = set(names)
    per_package: dict[str, list[int]] = defaultdict(lambda: [0, 0, 0, 0])
    functions = []
    graph: dict[str, set[str]] = defaultdict(set)
    private = []
    for name, path in names.items():
        text = path.read_text()
        tree = ast.parse(text)
        is_package = path.name == "__init__.py"
        package = name if is_package else name.rpartition(".")[0]
        per_package[package][0] += 1
        per_package[package][1] += len(text.splitlines())
        inside, again = function_imports(tree)
        per_package[package][2] += inside
        per_package[package][3] += again
        for node in ast.walk(tree):
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
                args = node.args
                n_params = len(args.posonlyargs + args.args + args.kwonlyargs)
                n_params -= bool(args.args and args.args[0].arg in ("self", "cls"))
                functions.append((node.end_lineno - node.lineno + 1, n_params, f"{name}.{node.name}"))
        for target, imported in imports_of(tree, name, is_package, known):
            if target != name and not name.startswith(target + "."):
                # a package importing its own modules (or a module its parent) is not a cycle edge
                graph[name].add(target)
            private += [
                f"{name} imports {target}.{n}"
                for n in imported
                if n.startswith("_") and not n.startswith("__")
            ]
        for node in ast.walk(
            tree
        ):  # private names of other libraries (loguru's logger._core, hydra._internal)
            if isinstance(node, ast.ImportFrom) and node.module and not node.level:
                if (
                    node.module != "__future__"
                    and any(part.startswith("_") for part in node.module.split("."))
                    and node.module.split(".")[0] != "imgcls"
                ):
                    private.append(f"{name} imports from {node.module}")
            if isinstance(node, ast.Attribute) and node.attr in ("_core",):
                private.append(f"{name} uses .{node.attr}")
    total_files = sum(v[0] for v in per_package.values())
    total_lines = sum(v[1] for v in per_package.values())
    total_inside = sum(v[2] for v in per_package.values())
    total_again = sum(v[3] for v in per_package.values())
    print(f"{total_lines} lines in {total_files} modules")
    for package, (count, lines, _, _) in sorted(per_package.items()):
        print(f"  {package:<28} {count:>3} modules {lines:>6} lines")
    print(
        f"imports inside functions: {total_inside} ({total_again} from a module the file imports at the top)"
    )
    for package, (_, _, inside, again) in sorted(per_package.items()):
        print(f"  {package:<28} {inside:>4} inside functions {again:>4} from a module imported at the top")
    print("ten longest functions:")
    for length, n_params, qual in sorted(functions, reverse=True)[:10]:
        print(f"  {length:>4} lines {n_params:>3} params  {qual}")
    print("most parameters:")
    for n_params, length, qual in sorted(((p, n, q) for n, p, q in functions), reverse=True)[:5]:
        print(f"  {n_params:>4} params {length:>4} lines  {qual}")
    print(
        f"functions over 50 lines: {sum(1 for f in functions if f[0] > 50)}; over 80: {sum(1 for f in functions if f[0] > 80)}"
    )
    found = cycles(graph)
    print(f"import cycles: {len(found)}")
    for comp in found:
        print("  " + " <-> ".join(comp))
    print(f"private names across modules: {len(private)}")
    for line in private:
        print("  " + line)


if __name__ == "__main__":
    main(Path(sys.argv[1] if len(sys.argv) > 1 else "src/imgcls").resolve())
