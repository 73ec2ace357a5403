"""The package's shape, checked over its source with ``ast`` so that it stays true: imports only down the
stages and no import circles (function-level imports included), imports at the top where nothing calls for
a lazy one, and functions that fit on a screen."""
from __future__ import annotations

import ast
import re
from pathlib import Path

import pytest
from tests.helpers import REPO

PACKAGE = REPO / "segkit"
MAX_FUNCTION_LINES = 60

# Lazy imports of segkit's own modules, each with its reason. Everything else is imported at the top.
LAZY_ALLOWED = {
    "segkit/__init__.py": "the public API is imported on first use: `import segkit` costs nothing",
    "segkit/commands/": "every command's parser is built at start-up: `segkit check` and `--help` must not import torch",
    "segkit/data/readers/__init__.py": "a project URL is read by segkit.labelstudio.project (httpx), which "
                                       "itself reads its export with these readers: imported when a URL is given",
}


def module_name(path: Path) -> str:
    parts = path.relative_to(REPO).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


MODULES = {module_name(p): p for p in PACKAGE.rglob("*.py")}


def _runtime_nodes(tree: ast.Module):
    """Every node that runs, leaving out ``if TYPE_CHECKING:`` blocks (annotations only)."""
    todo = list(tree.body)
    while todo:
        node = todo.pop()
        if isinstance(node, ast.If) and getattr(node.test, "id", getattr(node.test, "attr", "")) == "TYPE_CHECKING":
            todo.extend(node.orelse)
            continue
        yield node
        todo.extend(ast.iter_child_nodes(node))


def imported_modules(name: str, node: ast.Import | ast.ImportFrom) -> list[str]:
    """The segkit modules an import statement in module ``name`` loads."""
    if isinstance(node, ast.Import):
        return [a.name for a in node.names if a.name in MODULES]
    base = node.module or ""
    if node.level:
        package = name.split(".") if MODULES[name].name == "__init__.py" else name.split(".")[:-1]
        base = ".".join(package[:len(package) - node.level + 1] + ([base] if base else []))
    found = [f"{base}.{a.name}" if f"{base}.{a.name}" in MODULES else base for a in node.names]
    return [m for m in found if m in MODULES and m != name]


def import_graph() -> dict[str, set[str]]:
    graph = {}
    for name, path in MODULES.items():
        nodes = _runtime_nodes(ast.parse(path.read_text()))
        graph[name] = {m for n in nodes if isinstance(n, (ast.Import, ast.ImportFrom)) for m in imported_modules(name, n)}
    return graph


def find_cycle(graph: dict[str, set[str]]) -> list[str] | None:
    """One import circle of ``graph`` (as the path round it), or None."""
    state: dict[str, int] = {}  # 1: on the current path, 2: done
    path: list[str] = []

    def visit(node: str) -> list[str] | None:
        state[node] = 1
        path.append(node)
        for nxt in sorted(graph[node]):
            if state.get(nxt) == 1:
                return path[path.index(nxt):] + [nxt]
            if nxt not in state and (cycle := visit(nxt)):
                return cycle
        path.pop()
        state[node] = 2
        return None

    for node in sorted(graph):
        if node not in state and (cycle := visit(node)):
            return cycle
    return None


def test_the_checker_finds_a_circle():
    assert find_cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == ["a", "b", "c", "a"]
    assert find_cycle({"a": {"b"}, "b": set(), "c": {"a", "b"}}) is None
    tree = ast.parse("from segkit.engine import loops, runs\nimport segkit.tasks\nfrom . import base\n")
    found = [imported_modules("segkit.tasks.instance", n) for n in tree.body]
    assert found == [["segkit.engine.loops", "segkit.engine.runs"], ["segkit.tasks"], ["segkit.tasks.base"]]


def test_segkit_has_no_import_circles():
    graph = import_graph()
    assert len(graph) > 50 and graph["segkit.engine.trainer"] >= {"segkit.tasks", "segkit.engine.loops"}
    cycle = find_cycle(graph)
    assert cycle is None, "import circle: " + " -> ".join(cycle)


# The stages of segkit, lowest first: a module imports only from its own stage and those before it, so that
# each folder can be read (and tested) knowing only what is below it. The package's own __init__ (the public
# API, imported lazily) stands above them all.
STAGES = ("version", "atomic", "data", "labelstudio", "structures", "models", "evaluation", "tasks", "inference",
          "engine", "serve", "commands", "cli", "__main__")
# Imports up the stages, each lazy (inside the function that needs it) and with its reason.
UPWARD_ALLOWED = {
    ("segkit.data.readers", "segkit.labelstudio.project"): "load_dataset() takes a Label Studio project URL as it "
    "takes a folder; the project's reader is above the data it reads, so it is imported when a URL is given",
}


def stage(module: str) -> str | None:
    """The stage folder (or top-level module) of a segkit module; None for the package itself."""
    parts = module.split(".")
    return parts[1] if len(parts) > 1 else None


def upward_imports(graph: dict[str, set[str]]) -> list[str]:
    """Every import of ``graph`` from a stage to a later one, as ``a -> b``, but the allowed ones."""
    return sorted(f"{a} -> {b}" for a, targets in graph.items() if stage(a) is not None for b in targets
                  if (stage(b) is None or STAGES.index(stage(b)) > STAGES.index(stage(a)))
                  and (a, b) not in UPWARD_ALLOWED)


def test_every_stage_folder_is_in_the_order():
    found = {stage(m) for m in MODULES} - {None}
    assert found == set(STAGES), f"stages missing from STAGES: {found - set(STAGES)}; gone: {set(STAGES) - found}"


def test_the_checker_finds_an_upward_import():
    graph = {"segkit.data.x": {"segkit.engine.y"}, "segkit.engine.y": {"segkit.data.x", "segkit"}}
    assert upward_imports(graph) == ["segkit.data.x -> segkit.engine.y", "segkit.engine.y -> segkit"]


def test_imports_only_go_down_the_stages():
    graph = import_graph()
    assert graph["segkit.inference.predictor"] >= {"segkit.models.checkpoint", "segkit.tasks"}  # the graph is real
    up = upward_imports(graph)
    assert not up, "imports up the stages (move the code down, or allow a lazy one with its reason):\n" + "\n".join(up)


def test_no_two_stage_folders_import_each_other():
    graph = import_graph()
    edges = {(stage(a), stage(b)) for a, targets in graph.items() for b in targets
             if stage(a) and stage(b) and stage(a) != stage(b) and (a, b) not in UPWARD_ALLOWED}
    both = sorted(f"{x} <-> {y}" for x, y in edges if (y, x) in edges and x < y)
    assert not both, both


def test_allowed_upward_imports_are_lazy():
    for (a, b) in UPWARD_ALLOWED:
        tree = ast.parse(MODULES[a].read_text())
        top = [n for n in tree.body if isinstance(n, (ast.Import, ast.ImportFrom)) and b in imported_modules(a, n)]
        assert not top and b in import_graph()[a], (a, b)


def _lazy_segkit_imports(path: Path) -> list[str]:
    tree = ast.parse(path.read_text())
    top = {id(n) for n in tree.body}
    return [f"{path.relative_to(REPO)}:{n.lineno} {ast.unparse(n)}" for n in _runtime_nodes(tree)
            if isinstance(n, (ast.Import, ast.ImportFrom)) and id(n) not in top
            and imported_modules(module_name(path), n)]


def test_segkit_imports_its_own_modules_at_the_top():
    lazy = [line for path in sorted(PACKAGE.rglob("*.py"))
            if not any(str(path.relative_to(REPO)).startswith(k) for k in LAZY_ALLOWED)
            for line in _lazy_segkit_imports(path)]
    assert not lazy, "imports to move to the top (or to allow, with the reason):\n" + "\n".join(lazy)


def _source_files() -> list[Path]:
    files = [*PACKAGE.rglob("*.py"), REPO / "demo.py", REPO / "train.py", *(REPO / "utils").glob("*.py"),
             *(REPO / "bench").glob("*.py")]
    return sorted(files)


@pytest.mark.parametrize("path", _source_files(), ids=lambda p: str(p.relative_to(REPO)))
def test_functions_fit_on_a_screen(path):
    tree = ast.parse(path.read_text())
    long = [f"{n.name} ({n.end_lineno - n.lineno + 1} lines, line {n.lineno})" for n in ast.walk(tree)
            if isinstance(n, (ast.FunctionDef, ast.AsyncFunctionDef))
            and n.end_lineno - n.lineno + 1 > MAX_FUNCTION_LINES]
    assert not long, f"{path.relative_to(REPO)}: functions over {MAX_FUNCTION_LINES} lines: {', '.join(long)}"


MAX_README_LINES = 250


def test_the_readme_is_short_and_its_links_resolve():
    """The README is read in five minutes; the rest is in docs/ (whose links `mkdocs build --strict` checks)."""
    readme = (REPO / "README.md").read_text()
    assert len(readme.splitlines()) <= MAX_README_LINES
    links = re.findall(r"\]\(([^)\s]+)\)", readme)
    local = [link.split("#")[0] for link in links if not link.startswith(("http://", "https://", "#"))]
    assert local and all((REPO / link).exists() for link in local), [link for link in local if not (REPO / link).exists()]


def test_the_sites_home_page_is_the_readme_with_its_links_into_docs_made_relative():
    """docs/index.md is a placeholder the site's hook fills with README.md: one text, never two drifting copies."""
    import importlib.util

    spec = importlib.util.spec_from_file_location("readme_home", REPO / "docs" / "readme_home.py")
    hook = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(hook)
    readme = (REPO / "README.md").read_text()
    home = hook.readme_as_home(readme)
    assert readme.startswith("---\n") and home.lstrip().startswith("# segkit")
    assert "](docs/" in readme and "](docs/" not in home and "](train.md)" in home
    for link in re.findall(r"\]\(([^)\s#]+)", home):
        assert link.startswith(("http://", "https://")) or (REPO / "docs" / link).exists(), link
    assert "README.md" in (REPO / "docs" / "index.md").read_text()
    assert (REPO / "mkdocs.yml").read_text().count("docs/readme_home.py") == 1
