"""The layout cannot rot: imports between top-level packages run downward, with no circle.

Read from the source with `ast`, so a lazy import inside a function counts as much as
one at the top of a module.
"""

import ast
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]

# Lower layers first. A package may import itself and any package of a lower layer;
# packages of one layer do not import each other.
LAYERS: tuple[tuple[str, ...], ...] = (
    ("policy",),  # model math shared by every stage
    ("shapes",),  # the embedded world: data, ShapesEval, the tiny model's pretraining
    ("rewards",),  # scorers, self-confidence, the reward server
    ("actors",),  # Ray actor shells and the reward pool
    ("learner",),  # the driver, the DeepSpeed ranks, the config
    ("studies", "bench"),  # research and measurement on top of the service
)
RANK = {pkg: i for i, layer in enumerate(LAYERS) for pkg in layer}


def project_modules() -> dict[str, Path]:
    """Dotted module name -> file, for every module of the layered packages."""
    modules = {}
    for pkg in RANK:
        for path in sorted((REPO / pkg).rglob("*.py")):
            parts = path.relative_to(REPO).with_suffix("").parts
            name = ".".join(parts[:-1] if parts[-1] == "__init__" else parts)
            modules[name] = path
    return modules


def imported(path: Path, name: str, modules: dict[str, Path]) -> set[str]:
    """The project modules that the module ``name`` at ``path`` imports."""
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    found = set()
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            targets = [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:  # relative: resolve against the importing package
                anchor = package.split(".")[: len(package.split(".")) - node.level + 1]
                base = ".".join([*anchor, base] if base else anchor)
            targets = [base] + [f"{base}.{alias.name}" for alias in node.names]
        else:
            continue
        for target in targets:
            # The longest project module that the target names or lies inside.
            while target and target not in modules:
                target = target.rpartition(".")[0]
            if target and target != name:
                found.add(target)
    return found


def import_graph() -> dict[str, set[str]]:
    modules = project_modules()
    return {name: imported(path, name, modules) for name, path in modules.items()}


def test_every_import_between_packages_runs_downward():
    upward = []
    for name, targets in import_graph().items():
        src = name.split(".")[0]
        for target in sorted(targets):
            dst = target.split(".")[0]
            if dst != src and RANK[dst] >= RANK[src]:
                upward.append(f"{name} -> {target}")
    assert not upward, "imports that run upward or sideways (see LAYERS):\n" + "\n".join(upward)


def test_no_module_imports_itself_in_a_circle():
    graph = import_graph()
    state: dict[str, int] = {}  # 1: on the current path, 2: done
    circles = []

    def visit(node: str, path: list[str]) -> None:
        state[node] = 1
        for nxt in sorted(graph[node]):
            if state.get(nxt) == 1:
                circles.append(" -> ".join([*path[path.index(nxt):], nxt]))
            elif nxt not in state:
                visit(nxt, [*path, nxt])
        state[node] = 2

    for node in sorted(graph):
        if node not in state:
            visit(node, [node])
    assert not circles, "import circles:\n" + "\n".join(circles)


def test_every_top_level_package_is_placed_in_a_layer():
    packages = {p.parent.name for p in REPO.glob("*/__init__.py")}
    assert packages == set(RANK), f"place new packages in LAYERS: {sorted(packages - set(RANK))}"


def test_the_checker_sees_an_upward_import(tmp_path):
    # The rule must be able to fail: a policy module importing learner is reported.
    path = tmp_path / "bad.py"
    path.write_text("def f():\n    from learner.config import Config\n")
    modules = {"policy.bad": path, "learner.config": path, "learner": path}
    assert imported(path, "policy.bad", modules) == {"learner.config"}
