"""The package layering of the README's Layout section, and no import cycles between modules.

The layering is read from the README sentence itself ("Packages import only what sits below
them: `a` ← `b`, `c` ← ..."), so the sentence and this test cannot drift apart:

    ←   the next level up (a package imports only packages on lower levels)
    ,   another package on the same level; the two do not import each other
    ↔   another package on the same level that it imports, and that imports it

A dotted name (`archipelago.cli`) is a module placed on its own level, above or below the rest of
its package. Every import statement counts: at the top, inside functions, relative ones (resolved
against the importing module). An import under `if TYPE_CHECKING:` never runs, so it counts for
the layering but cannot close an import cycle.
"""

from __future__ import annotations

import ast
import re
from collections import deque
from dataclasses import dataclass, field
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
LAYOUT_SENTENCE = "Packages import only what sits below them:"


@dataclass
class Layering:
    levels: dict[str, int]  # package, or dotted module placed on its own level -> level
    mutual: set[frozenset[str]] = field(default_factory=set)  # same-level pairs joined by ↔

    def unit(self, module: str) -> str:
        """The README name `module` falls under: the longest one equal to or above it."""
        parts = module.split(".")
        for n in range(len(parts), 0, -1):
            if ".".join(parts[:n]) in self.levels:
                return ".".join(parts[:n])
        raise KeyError(module)

    @property
    def packages(self) -> set[str]:
        return {name for name in self.levels if "." not in name}


def parse_layering(readme: str) -> Layering:
    """The layering in the README's sentence (its first sentence after LAYOUT_SENTENCE)."""
    start = readme.find(LAYOUT_SENTENCE)
    assert start >= 0, f"the README has no sentence starting {LAYOUT_SENTENCE!r}"
    text = readme[start + len(LAYOUT_SENTENCE):]
    tokens: list[str] = []
    pos = 0
    for m in re.finditer(r"`([\w.]+)`|←|↔|,|\.(?=\s|$)", text):
        between = text[pos:m.start()]
        assert not between.strip(), f"the layering sentence has {between.strip()!r} where a name or ←/,/↔ goes"
        pos = m.end()
        if m.group(0) == ".":
            break
        tokens.append(m.group(1) or m.group(0))
    names, seps = tokens[0::2], tokens[1::2]
    assert names and all(t not in "←↔," for t in names) and all(s in "←↔," for s in seps), tokens
    levels, mutual, level = {names[0]: 0}, set(), 0
    for sep, prev, name in zip(seps, names[:-1], names[1:], strict=True):
        level += sep == "←"
        assert name not in levels, f"{name} appears twice in the layering sentence"
        levels[name] = level
        if sep == "↔":
            mutual.add(frozenset((prev, name)))
    return Layering(levels, mutual)


@dataclass(frozen=True)
class Import:
    target: str  # a project module
    path: Path
    line: int
    type_only: bool  # under `if TYPE_CHECKING:`


def _module_files(root: Path, packages: set[str]) -> dict[str, tuple[Path, bool]]:
    """module name -> (file, is a package's __init__) for every .py file of `packages`."""
    out = {}
    for pkg in sorted(packages):
        for path in sorted((root / pkg).rglob("*.py")):
            parts = list(path.relative_to(root).with_suffix("").parts)
            is_init = parts[-1] == "__init__"
            out[".".join(parts[:-1] if is_init else parts)] = (path, is_init)
    return out


def _is_type_checking(test: ast.expr) -> bool:
    return (isinstance(test, ast.Name) and test.id == "TYPE_CHECKING") or (
        isinstance(test, ast.Attribute) and test.attr == "TYPE_CHECKING")


def _raw_imports(tree: ast.AST, package: str) -> list[tuple[list[str], int, bool]]:
    """([candidate module names, most specific first], line, type_only) per imported name."""
    out = []

    def visit(node: ast.AST, type_only: bool) -> None:
        if isinstance(node, ast.Import):
            out.extend(([a.name], node.lineno, type_only) for a in node.names)
        elif isinstance(node, ast.ImportFrom):
            if node.level:  # relative: from the importing module's package, level - 1 up
                base = package.split(".")[:len(package.split(".")) - (node.level - 1)]
                source = ".".join([*base, *([node.module] if node.module else [])])
            else:
                source = node.module or ""
            out.extend(([f"{source}.{a.name}", source], node.lineno, type_only) for a in node.names)
        for child in ast.iter_child_nodes(node):
            inside = type_only or (isinstance(node, ast.If) and _is_type_checking(node.test)
                                   and child in node.body)
            visit(child, inside)

    visit(tree, False)
    return out


def project_imports(root: Path, packages: set[str]) -> dict[str, list[Import]]:
    """module -> the project modules it imports (`from p import m` imports module p.m when
    there is one, else p; `import a.b.c` the closest module at or above a.b.c)."""
    files = _module_files(root, packages)
    out: dict[str, list[Import]] = {}
    for module, (path, is_init) in files.items():
        package = module if is_init else module.rpartition(".")[0]
        found = []
        for candidates, line, type_only in _raw_imports(ast.parse(path.read_text(), str(path)), package):
            for name in candidates:
                while name and name not in files:
                    name = name.rpartition(".")[0]
                if name:
                    break
            if name and name != module:
                found.append(Import(name, path, line, type_only))
        out[module] = list(dict.fromkeys(found))  # `from p import a, b`: one import of p per line
    return out


def layering_violations(imports: dict[str, list[Import]], layering: Layering, root: Path) -> list[str]:
    """One line per import of a higher level, or of the same level without ↔."""
    out = []
    for module, found in imports.items():
        here = layering.unit(module)
        for imp in found:
            there = layering.unit(imp.target)
            if there == here or layering.levels[there] < layering.levels[here]:
                continue
            if frozenset((here, there)) in layering.mutual:
                continue
            where = "above it" if layering.levels[there] > layering.levels[here] else "on its own level"
            out.append(f"{imp.path.relative_to(root)}:{imp.line}: {module} imports {imp.target}: "
                       f"{there} (level {layering.levels[there]}) is {where} "
                       f"({here}, level {layering.levels[here]})")
    return out


def _shortest_cycle(graph: dict[str, dict[str, Import]], members: set[str], first: str) -> list[str]:
    """The shortest way from `first` back to itself inside `members` (a strongly connected group)."""
    came_from: dict[str, str] = {}
    queue = deque([first])
    while queue:  # breadth first
        node = queue.popleft()
        if first in graph[node]:
            break
        for child in graph[node]:
            if child in members and child not in came_from and child != first:
                came_from[child] = node
                queue.append(child)
    path = [node]
    while path[-1] != first:
        path.append(came_from[path[-1]])
    return [*reversed(path), first]


def import_cycles(imports: dict[str, list[Import]], root: Path) -> list[str]:
    """One line per strongly connected group of modules: its shortest cycle, file:line per edge."""
    graph: dict[str, dict[str, Import]] = {m: {} for m in imports}
    for module, found in imports.items():
        for imp in found:
            if not imp.type_only:
                graph[module].setdefault(imp.target, imp)
    # Tarjan's strongly connected components, iteratively
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    groups: list[list[str]] = []
    for start in graph:
        if start in index:
            continue
        work = [(start, iter(graph[start]))]
        index[start] = low[start] = len(index)
        stack.append(start)
        on_stack.add(start)
        while work:
            node, children = work[-1]
            child = next(children, None)
            if child is not None:
                if child not in index:
                    index[child] = low[child] = len(index)
                    stack.append(child)
                    on_stack.add(child)
                    work.append((child, iter(graph[child])))
                elif child in on_stack:
                    low[node] = min(low[node], index[child])
                continue
            work.pop()
            if work:
                low[work[-1][0]] = min(low[work[-1][0]], low[node])
            if low[node] == index[node]:
                group = []
                while True:
                    member = stack.pop()
                    on_stack.discard(member)
                    group.append(member)
                    if member == node:
                        break
                if len(group) > 1:
                    groups.append(sorted(group))
    out = []
    for group in sorted(groups):
        members = set(group)
        path = min((_shortest_cycle(graph, members, first) for first in group), key=lambda c: (len(c), c))
        steps = ", ".join(f"{graph[a][b].path.relative_to(root)}:{graph[a][b].line}"
                          for a, b in zip(path, path[1:], strict=False))
        shape = f"{path[0]} <-> {path[1]}" if len(path) == 3 else " -> ".join(path)
        rest = sorted(members - set(path))
        out.append(f"import cycle {shape}: {steps}" + (f" (with {', '.join(rest)} in the same cycle group)"
                                                       if rest else ""))
    return out


# ---- the project ---------------------------------------------------------------------------------


def project_layering() -> Layering:
    return parse_layering((ROOT / "README.md").read_text())


def test_the_readme_layering_names_every_package():
    layering = project_layering()
    on_disk = {p.name for p in ROOT.iterdir() if (p / "__init__.py").is_file() and p.name != "tests"}
    assert layering.packages == on_disk, "the README's layering sentence and the packages differ"
    for name in layering.levels:
        assert (ROOT / name.replace(".", "/")).is_dir() or (ROOT / f"{name.replace('.', '/')}.py").is_file(), name


def test_packages_import_only_what_sits_below_them():
    layering = project_layering()
    violations = layering_violations(project_imports(ROOT, layering.packages), layering, ROOT)
    assert not violations, "imports against the README's layering:\n" + "\n".join(violations)


def test_no_two_modules_import_each_other():
    cycles = import_cycles(project_imports(ROOT, project_layering().packages), ROOT)
    assert not cycles, "import cycles between project modules:\n" + "\n".join(cycles)


# ---- the checker itself, on a small tree ----------------------------------------------------------


def test_the_checker_reports_an_upward_import_and_cycles(tmp_path):
    files = {
        "README.md": "x\n\nPackages import only what sits below them: `low` ← `mid`, `side` ← `top` ↔ `peer`"
                     " ← `low.cli`. Then other words.\n",
        "low/__init__.py": "",
        "low/codec.py": "import os\n\n\ndef f():\n    from top import run  # noqa\n",
        "low/cli.py": "import top.run\nimport mid\n",
        "mid/__init__.py": "from . import a\n",
        "mid/a.py": "from .b import thing\nimport low.codec\n",
        "mid/b.py": "from mid import a\n\nthing = 1\n",
        "mid/sub/__init__.py": "",
        "mid/sub/c.py": "from .. import b\nfrom ..a import thing\n",
        "side/__init__.py": "from mid.b import thing\n",
        "side/x.py": "from typing import TYPE_CHECKING\n\nimport side.y\n\nif TYPE_CHECKING:\n"
                     "    from side.y import Y\n",
        "side/y.py": "from typing import TYPE_CHECKING\n\nif TYPE_CHECKING:\n    from side import x\n"
                     "    from mid import a\nY = 1\n",
        "top/__init__.py": "",
        "top/run.py": "import peer\nimport side.x\n\n\ndef g():\n    from . import loop\n",
        "top/loop.py": "from peer import q\n",
        "peer/__init__.py": "",
        "peer/q.py": "import top.loop as t\n",
    }
    for name, text in files.items():
        (tmp_path / name).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / name).write_text(text)
    layering = parse_layering((tmp_path / "README.md").read_text())
    assert layering.levels == {"low": 0, "mid": 1, "side": 1, "top": 2, "peer": 2, "low.cli": 3}
    assert layering.mutual == {frozenset(("top", "peer"))}
    imports = project_imports(tmp_path, layering.packages)
    assert {i.target for i in imports["top.run"]} == {"peer", "side.x", "top.loop"}  # relative, in a function
    assert {i.target for i in imports["mid.sub.c"]} == {"mid.b", "mid.a"}
    assert {i.target for i in imports["mid"]} == {"mid.a"}
    violations = layering_violations(imports, layering, tmp_path)
    assert violations == [
        "low/codec.py:5: low.codec imports top.run: top (level 2) is above it (low, level 0)",
        "side/__init__.py:1: side imports mid.b: mid (level 1) is on its own level (side, level 1)",
        "side/y.py:5: side.y imports mid.a: mid (level 1) is on its own level (side, level 1)",
    ]  # low.cli is above everything; top and peer import each other (↔); TYPE_CHECKING counts here
    assert import_cycles(imports, tmp_path) == [
        "import cycle mid.a <-> mid.b: mid/a.py:1, mid/b.py:1",
        "import cycle peer.q <-> top.loop: peer/q.py:1, top/loop.py:1",
    ]  # side.y -> side.x only under TYPE_CHECKING: no cycle
