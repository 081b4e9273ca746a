"""The project's layers, read from its source with `ast` (nothing is imported).

The bot runs on machines without torch and starts fast, so nothing under bot/ or jobs/ may import
torch or the trainer, even inside a function; a local worker process is started by name
(`importlib.import_module` in jobs/local_runner.py), which is a string, not an import. And no two
modules may import each other, directly or around a loop: a cycle makes what works depend on which
module happens to be imported first.
"""

from __future__ import annotations

import ast
import functools
from collections import deque
from collections.abc import Collection
from dataclasses import dataclass
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
PACKAGES = ("bot", "jobs", "trainer", "photos", "storage", "common", "bench", "tests")
HEAVY = ("torch", "diffusers", "transformers", "peft", "accelerate")

# What each package's modules may not import (by top-level name): the bot and the job protocol run
# without torch, the trainer reaches the bot only through jobs/, and the pure layers stay pure.
FORBIDDEN = {
    "bot": (*HEAVY, "trainer"),
    "jobs": (*HEAVY, "trainer", "bot", "storage"),
    "trainer": ("bot", "storage"),
    "photos": ("bot", "jobs", "trainer", "storage"),
    "common": ("bot", "jobs", "trainer", "storage"),
    "storage": ("bot", "trainer"),
}


@dataclass(frozen=True)
class Import:
    source: str  # the importing module
    target: str  # the module imported: a project module, or a third-party dotted name as written
    line: int
    type_checking: bool  # under `if TYPE_CHECKING:`, so never run


def module_name(path: Path) -> str:
    parts = path.relative_to(ROOT).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


@functools.cache
def project_modules() -> dict[str, Path]:
    return {module_name(path): path for package in PACKAGES for path in sorted((ROOT / package).rglob("*.py"))}


def resolve(name: str, modules: Collection[str]) -> str:
    """The project module `name` means (a package's attribute comes from its __init__), or `name`."""
    parts = name.split(".")
    for end in range(len(parts), 0, -1):
        if ".".join(parts[:end]) in modules:
            return ".".join(parts[:end])
    return name


def _is_type_checking(test: ast.expr) -> bool:
    return (isinstance(test, ast.Name) and test.id == "TYPE_CHECKING") or (
        isinstance(test, ast.Attribute) and test.attr == "TYPE_CHECKING")


class _Imports(ast.NodeVisitor):
    """Every import statement of one module, at any depth."""

    def __init__(self, module: str, is_package: bool, modules: Collection[str]) -> None:
        self.module, self.is_package, self.modules = module, is_package, modules
        self.found: list[Import] = []
        self._type_checking = False

    def visit_If(self, node: ast.If) -> None:
        if not _is_type_checking(node.test):
            self.generic_visit(node)
            return
        outer, self._type_checking = self._type_checking, True
        for child in node.body:
            self.visit(child)
        self._type_checking = outer
        for child in node.orelse:
            self.visit(child)

    def visit_Import(self, node: ast.Import) -> None:
        for alias in node.names:
            self._add(resolve(alias.name, self.modules), node.lineno)

    def visit_ImportFrom(self, node: ast.ImportFrom) -> None:
        if node.level:  # relative: from the module's package, one level up per further dot
            package = self.module.split(".") if self.is_package else self.module.split(".")[:-1]
            base = ".".join([*package[:len(package) - node.level + 1], *([node.module] if node.module else [])])
        else:
            base = node.module or ""
        for alias in node.names:
            submodule = f"{base}.{alias.name}"
            self._add(submodule if submodule in self.modules else resolve(base, self.modules), node.lineno)

    def _add(self, target: str, line: int) -> None:
        self.found.append(Import(self.module, target, line, self._type_checking))


@functools.cache
def all_imports() -> tuple[Import, ...]:
    found: list[Import] = []
    modules = project_modules()
    for module, path in modules.items():
        collector = _Imports(module, path.name == "__init__.py", modules)
        collector.visit(ast.parse(path.read_text(), filename=str(path)))
        found += collector.found
    return tuple(found)


def where(item: Import) -> str:
    return f"{project_modules()[item.source].relative_to(ROOT)}:{item.line}"


def top(name: str) -> str:
    return name.split(".")[0]


def test_the_source_is_read_and_imports_resolve_to_modules() -> None:
    """A guard for the checks below: they see every package, and each form of import."""
    modules = project_modules()
    assert {top(m) for m in modules} == set(PACKAGES) and len(modules) > 80
    edges = {(i.source, i.target) for i in all_imports()}
    assert ("bot.app", "bot.cogs.account") in edges  # `from bot.cogs import account` inside a method
    assert ("trainer.worker", "trainer.start_helpers") in edges  # `from trainer import start_helpers`
    assert ("jobs.runner", "jobs.payloads") in edges  # `from jobs.payloads import WorkItem`
    assert ("trainer.pipelines", "torch") in edges


def test_relative_imports_resolve_from_the_modules_package() -> None:
    modules = {"a", "a.b", "a.b.c", "a.b.d", "a.e"}

    def targets(module: str, is_package: bool, source: str) -> list[str]:
        collector = _Imports(module, is_package, modules)
        collector.visit(ast.parse(source))
        return [i.target for i in collector.found]

    assert targets("a.b.c", False, "from . import d\nfrom .d import x\nfrom .. import e\nfrom ..e import y") == [
        "a.b.d", "a.b.d", "a.e", "a.e"]
    assert targets("a.b", True, "from . import c\nfrom .. import e") == ["a.b.c", "a.e"]
    assert targets("a.b.c", False, "from a.b import nothing_of_note\nimport a.b.d.attr") == ["a.b", "a.b.d"]
    seen = _Imports("a.b.c", False, modules)
    seen.visit(ast.parse("import typing\nif typing.TYPE_CHECKING:\n    import a.e\nelse:\n    import a.b\n"))
    assert [(i.target, i.type_checking) for i in seen.found] == [("typing", False), ("a.e", True), ("a.b", False)]


def test_each_package_imports_only_the_layers_below_it() -> None:
    """FORBIDDEN, for every import at any depth. Those that only a type checker reads count too:
    they name a dependency all the same."""
    wrong = [f"{where(i)} imports {i.target}" for i in all_imports()
             if top(i.target) in FORBIDDEN.get(top(i.source), ())]
    assert not wrong, "\n".join(wrong)


def test_nothing_the_bot_runs_imports_torch_or_its_libraries() -> None:
    """Through any chain of imports: the bot's process never loads the trainer's libraries."""
    graph = runtime_graph()
    seen, queue = set(), deque(m for m in project_modules() if top(m) == "bot")
    heavy: list[str] = []
    while queue:
        module = queue.popleft()
        if module in seen:
            continue
        seen.add(module)
        heavy += [f"{where(i)} imports {i.target}" for i in all_imports()
                  if i.source == module and not i.type_checking and top(i.target) in HEAVY]
        queue.extend(graph.get(module, {}))
    assert not heavy, "\n".join(heavy)


def runtime_graph() -> dict[str, dict[str, Import]]:
    """Module -> the project modules it imports when run (each with its first import of it)."""
    graph: dict[str, dict[str, Import]] = {}
    for item in all_imports():
        if not item.type_checking and item.target in project_modules() and item.target != item.source:
            graph.setdefault(item.source, {}).setdefault(item.target, item)
    return graph


def cycles(graph: dict[str, dict[str, Import]]) -> list[list[str]]:
    """Each import cycle as a chain of modules back to its first: for every edge that lies on a
    cycle, the shortest way back from its end to its start (rotations of one cycle counted once)."""
    found: set[tuple[str, ...]] = set()
    for start in sorted(graph):
        for after in sorted(graph[start]):
            back = shortest_path(graph, after, start)
            if back is not None:
                cycle = [start, *back[:-1]]
                first = cycle.index(min(cycle))
                found.add(tuple(cycle[first:] + cycle[:first]))
    return [[*cycle, cycle[0]] for cycle in sorted(found)]


def shortest_path(graph: dict[str, dict[str, Import]], start: str, end: str) -> list[str] | None:
    came_from: dict[str, str | None] = {start: None}
    queue = deque([start])
    while queue:
        module = queue.popleft()
        if module == end:
            path = [module]
            while (previous := came_from[path[-1]]) is not None:
                path.append(previous)
            return path[::-1]
        for target in sorted(graph.get(module, {})):
            if target not in came_from:
                came_from[target] = module
                queue.append(target)
    return None


def test_cycles_are_found_and_told_as_chains() -> None:
    edge = Import("x", "y", 1, False)
    graph = {"a": {"b": edge}, "b": {"c": edge, "a": edge}, "c": {"a": edge}, "d": {"a": edge}}
    assert cycles(graph) == [["a", "b", "a"], ["a", "b", "c", "a"]]
    assert cycles({"a": {"b": edge}, "b": {}}) == []


def test_no_modules_import_each_other_around_a_loop() -> None:
    """Imports inside functions count (they run too); those under `if TYPE_CHECKING:` do not."""
    graph = runtime_graph()
    told = [" -> ".join(f"{module} ({where(graph[module][after])})" if after else module
                        for module, after in zip(cycle, [*cycle[1:], None], strict=True))
            for cycle in cycles(graph)]
    assert not told, "import cycles:\n" + "\n".join(told)
