"""The layout: entry points at the root, the library in one package, imports one way only.

Every import is read from the source with ast, those inside functions included, so a cycle
cannot hide behind a function-level import.
"""

import ast
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
PACKAGE = "dlrm_sparsity"
ROOT_SCRIPTS = {"evaluate_disk_savings", "evaluate_model_metrics", "evaluate_forward_time",
                "evaluate_memory_savings", "evaluate_activation_sparsity", "evaluate_compression",
                "make_report",
                "dlrm_forward_time", "sparse_utils", "train_dlrm", "synthetic_criteo"}
RUNNER_MAY_USE = {f"{PACKAGE}.errors", f"{PACKAGE}.device", f"{PACKAGE}.lazy"}  # not DLRM


def module_name(path: Path) -> str:
    parts = path.relative_to(REPO).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def modules() -> dict[str, Path]:
    found = {p.stem: p for p in REPO.glob("*.py")}
    found.update({module_name(p): p for p in (REPO / PACKAGE).rglob("*.py")})
    return found


def imports_of(path: Path, known: set[str]) -> set[str]:
    """The suite's own modules that a file imports, anywhere in it."""
    names = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            names |= {a.name for a in node.names}
        elif isinstance(node, ast.ImportFrom) and node.module:
            names.add(node.module)
            names |= {f"{node.module}.{a.name}" for a in node.names}
    return {n for n in names if n in known}


def graph() -> dict[str, set[str]]:
    found = modules()
    return {name: imports_of(path, set(found)) - {name} for name, path in found.items()}


def test_the_root_holds_the_entry_points_only():
    assert {p.stem for p in REPO.glob("*.py")} == ROOT_SCRIPTS


def test_nothing_in_the_package_imports_a_root_file():
    for name, deps in graph().items():
        if name.startswith(PACKAGE):
            assert not deps & ROOT_SCRIPTS, f"{name} imports {deps & ROOT_SCRIPTS}"


def test_the_runner_knows_rows_and_items_not_dlrm():
    for name, deps in graph().items():
        if name.startswith(f"{PACKAGE}.runner"):
            outside = {d for d in deps if not d.startswith(f"{PACKAGE}.runner")}
            assert outside <= RUNNER_MAY_USE | {PACKAGE}, f"{name} imports {outside}"


def test_there_is_no_import_cycle():
    edges = graph()
    state: dict[str, str] = {}

    def visit(node: str, trail: list[str]) -> None:
        state[node] = "open"
        for dep in sorted(edges.get(node, ())):
            assert state.get(dep) != "open", " -> ".join(trail + [node, dep])
            if dep not in state:
                visit(dep, trail + [node])
        state[node] = "done"

    for node in sorted(edges):
        if node not in state:
            visit(node, [])


def test_the_checker_sees_function_level_imports(tmp_path):
    path = tmp_path / "m.py"
    path.write_text("def f():\n    import evaluate_disk_savings\n"
                    "    from dlrm_sparsity import demo\n")
    assert imports_of(path, {"evaluate_disk_savings", "dlrm_sparsity.demo"}) == \
        {"evaluate_disk_savings", "dlrm_sparsity.demo"}


EXPERIMENT_SCRIPTS = sorted(n for n in ROOT_SCRIPTS if n.startswith("evaluate_"))
MAX_SCRIPT_LINES = 200


def test_no_experiment_script_imports_another():
    edges = graph()
    for name in EXPERIMENT_SCRIPTS:
        others = edges[name] & (set(EXPERIMENT_SCRIPTS) - {name})
        assert not others, f"{name} imports {others}"


def test_every_experiment_script_reads_in_one_sitting():
    for name in EXPERIMENT_SCRIPTS:
        lines = len((REPO / f"{name}.py").read_text().splitlines())
        assert lines <= MAX_SCRIPT_LINES, f"{name}.py has {lines} lines"
