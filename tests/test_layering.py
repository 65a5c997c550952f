"""The layers import downwards only: shared < stage1_tokenizer < stage2_ldm < pipelines, and no two modules import
each other, directly or round a longer loop. Every import statement counts, also those inside functions."""
import ast
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
LAYERS = ("shared", "stage1_tokenizer", "stage2_ldm", "pipelines")


def module_name(path: Path, root: Path) -> str:
    parts = path.relative_to(root).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def imported_modules(tree: ast.Module, modules: set[str]) -> set[str]:
    """The project modules that a module's import statements name: `from package import name` names the module
    package.name when there is one, else the package itself."""
    named = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            named.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            named.update(f"{node.module}.{alias.name}" if f"{node.module}.{alias.name}" in modules else node.module
                         for alias in node.names)
    return named & modules


def import_graph(root: Path) -> dict[str, set[str]]:
    """module -> the project modules it imports, for every module of the four layers under `root`."""
    paths = {module_name(path, root): path for layer in LAYERS for path in (root / layer).rglob("*.py")}
    return {name: imported_modules(ast.parse(path.read_text(), str(path)), set(paths)) - {name}
            for name, path in paths.items()}


def upward_imports(graph: dict[str, set[str]]) -> list[str]:
    layer = lambda module: LAYERS.index(module.split(".")[0])
    return sorted(f"{source} imports {target}" for source, targets in graph.items() for target in targets
                  if layer(target) > layer(source))


def import_cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """One loop through every strongly connected group of modules (Tarjan's algorithm)."""
    index, lowlink, stack, on_stack, groups = {}, {}, [], set(), []

    def visit(module: str) -> None:
        index[module] = lowlink[module] = len(index)
        stack.append(module)
        on_stack.add(module)
        for target in graph[module]:
            if target not in index:
                visit(target)
                lowlink[module] = min(lowlink[module], lowlink[target])
            elif target in on_stack:
                lowlink[module] = min(lowlink[module], index[target])
        if lowlink[module] == index[module]:
            group = []
            while not group or group[-1] != module:
                group.append(stack.pop())
                on_stack.discard(group[-1])
            if len(group) > 1:
                groups.append(sorted(group))

    for module in sorted(graph):
        if module not in index:
            visit(module)
    return groups


def test_no_module_imports_a_higher_layer():
    assert upward_imports(import_graph(REPO)) == []


def test_no_modules_import_each_other():
    assert import_cycles(import_graph(REPO)) == []


def test_the_checks_catch_a_back_edge_and_a_cycle(tmp_path):
    for name, text in {"shared/__init__.py": "", "stage1_tokenizer/__init__.py": "",
                       "stage1_tokenizer/decoder.py": "def build():\n    from stage2_ldm.dit import DiTBlock\n",
                       "stage2_ldm/__init__.py": "", "stage2_ldm/dit.py": "", "pipelines/__init__.py": "",
                       "pipelines/a.py": "from pipelines import b\n", "pipelines/b.py": "import pipelines.a\n"}.items():
        (tmp_path / name).parent.mkdir(exist_ok=True)
        (tmp_path / name).write_text(text)
    graph = import_graph(tmp_path)
    assert upward_imports(graph) == ["stage1_tokenizer.decoder imports stage2_ldm.dit"]
    assert import_cycles(graph) == [["pipelines.a", "pipelines.b"]]
