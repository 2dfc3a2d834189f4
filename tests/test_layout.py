"""The package's shape, checked: one DeepSpeed boundary, imports that follow the pipeline, no cycles,
no oversized modules. Imports are read from the source (module level and inside functions alike)."""

from __future__ import annotations

import ast
from pathlib import Path

PKG = Path(__file__).resolve().parent.parent / "dist_ft"


def _modules() -> dict[str, Path]:
    out = {}
    for p in PKG.rglob("*.py"):
        parts = list(p.relative_to(PKG.parent).with_suffix("").parts)
        if parts[-1] == "__init__":
            parts = parts[:-1]
        out[".".join(parts)] = p
    return out


def _imports(name: str, path: Path, known: set[str]) -> set[str]:
    """dist_ft modules `name` imports (the most specific known module of each import)."""
    pkg = name if path.name == "__init__.py" else name.rsplit(".", 1)[0]
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            targets = [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                anchor = pkg.split(".")[: len(pkg.split(".")) - (node.level - 1)]
                base = ".".join(anchor + ([node.module] if node.module else []))
            targets = [f"{base}.{a.name}" for a in node.names] + [base]
        else:
            continue
        for t in targets:
            while t and t not in known:
                t = t.rpartition(".")[0]
            if t and t != name:
                found.add(t)
    return found


def _graph() -> dict[str, set[str]]:
    mods = _modules()
    return {n: _imports(n, p, set(mods)) for n, p in mods.items()}


def test_only_the_engine_imports_deepspeed():
    users = sorted(
        str(p.relative_to(PKG.parent))
        for p in PKG.rglob("*.py")
        if any(
            isinstance(n, (ast.Import, ast.ImportFrom))
            and any(
                (getattr(n, "module", None) or "").startswith("deepspeed") or a.name.startswith("deepspeed")
                for a in n.names
            )
            for n in ast.walk(ast.parse(p.read_text()))
        )
    )
    # (and `dist-ft doctor`, which reads DeepSpeed's table of buildable ops, as ds_report does: it reports on
    # DeepSpeed and never drives it)
    assert users == [
        "dist_ft/doctor.py",
        "dist_ft/engine.py",
        "dist_ft/engine_sp.py",
        "dist_ft/engine_state.py",
    ]


def test_no_import_cycles():
    graph = _graph()
    # a module's own package is its namespace
    graph = {n: {d for d in deps if not n.startswith(d + ".")} for n, deps in graph.items()}
    state: dict[str, int] = {}

    def visit(n: str, path: list[str]) -> None:
        state[n] = 1
        for d in sorted(graph.get(n, ())):
            assert state.get(d) != 1, f"import cycle: {' -> '.join(path + [n, d])}"
            if d not in state:
                visit(d, path + [n])
        state[n] = 2

    for n in sorted(graph):
        if n not in state:
            visit(n, [])


def test_imports_follow_the_pipeline():
    graph = _graph()
    training = {
        "dist_ft.train",
        "dist_ft.engine",
        "dist_ft.engine_state",
        "dist_ft.checkpoint",
        "dist_ft.track",
    }
    rules = {  # module (or package prefix) -> what it must not import
        "dist_ft.model": {"dist_ft.data", "dist_ft.tasks", *training},
        "dist_ft.data": {
            "dist_ft.tasks",
            "dist_ft.model",
            "dist_ft.tokenizer",
            "dist_ft.inference",
            "dist_ft.evaluate",
            *training,
        },
        "dist_ft.tasks": {"dist_ft.model", "dist_ft.inference", "dist_ft.evaluate", *training},
        "dist_ft.inference": {
            "dist_ft.evaluate",
            *training,
        },  # load / generate / stream; scoring is evaluate's
        "dist_ft.evaluate": training,  # the engine is handed in, called like a model
        "dist_ft.adapters": {
            "dist_ft.data",
            "dist_ft.tasks",
            "dist_ft.inference",
            "dist_ft.model",
            *training,
        },
        "dist_ft.chat": training,
        "dist_ft.serve": training,
        "dist_ft.serve_queue": training,
        "dist_ft.harness": training,
        "dist_ft.demo": {"dist_ft.engine", "dist_ft.engine_state", "dist_ft.checkpoint"},
        "dist_ft.loss": {"dist_ft.data", "dist_ft.engine", "dist_ft.train"},
    }
    bad = [
        f"{n} imports {d}"
        for n, deps in graph.items()
        for prefix, banned in rules.items()
        if n == prefix or n.startswith(prefix + ".")
        for d in deps
        if any(d == b or d.startswith(b + ".") for b in banned)
    ]
    assert not bad, bad


MAX_LINES, MAX_COLUMNS = (
    400,
    110,
)  # lines per module as ruff formats them; characters per line (pyproject's ruff)


def test_modules_stay_small():
    """A module holds one job: at most MAX_LINES formatted lines of at most MAX_COLUMNS characters (ruff format
    wraps code; long strings and comments are wrapped by hand), so the limit cannot be met by writing wider."""
    big = {
        str(p.relative_to(PKG.parent)): n
        for p in PKG.rglob("*.py")
        if (n := len(p.read_text().splitlines())) > MAX_LINES
    }
    assert not big, big
    wide = [
        f"{p.relative_to(PKG.parent)}:{i}"
        for p in PKG.rglob("*.py")
        for i, line in enumerate(p.read_text().splitlines(), 1)
        if len(line) > MAX_COLUMNS
    ]
    assert not wide, f"{len(wide)} lines over {MAX_COLUMNS} characters, e.g. {wide[:5]}"


def test_faults_are_read_from_the_environment_in_one_place():
    """Test faults come in as a `Faults` value built once at the command line: no module imports a hooks module, and
    the DIST_FT_TEST_* names (an environ.get / [] / getenv needs the name as a string) appear only in faults.py."""
    hooks, readers = [], []
    for p in sorted(PKG.rglob("*.py")):
        rel = str(p.relative_to(PKG.parent))
        for n in ast.walk(ast.parse(p.read_text())):
            if isinstance(n, ast.Import):
                names = [a.name for a in n.names]
            elif isinstance(n, ast.ImportFrom):
                names = [n.module or "", *(a.name for a in n.names)]
            else:
                names = []
            hooks += [rel for name in names if "testhooks" in name.split(".")]
            if isinstance(n, ast.Constant) and isinstance(n.value, str) and "DIST_FT_TEST_" in n.value:
                readers.append(rel)
    assert not hooks, hooks
    assert not (PKG / "testhooks.py").exists()
    assert sorted(set(readers)) == ["dist_ft/faults.py"], readers
