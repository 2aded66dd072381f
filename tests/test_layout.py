"""The repository's layout rules, read from the source: three floors (data_prep and dtm_ds below eval and
bench), no import cycles, no entrypoint imported as a library, no sys.path edits."""

import ast
import functools
import json
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
PACKAGES = ("data_prep", "dtm_ds", "eval", "bench")


def _modules() -> dict[str, Path]:
    found = {}
    for package in PACKAGES:
        for path in (ROOT / package).rglob("*.py"):
            name = ".".join(path.relative_to(ROOT).with_suffix("").parts).removesuffix(".__init__")
            found[name] = path
    return found


def _imports(path: Path, modules: dict[str, Path]) -> set[str]:
    """This repository's modules that ``path`` imports, at module level or inside functions."""
    names = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            names |= {alias.name for alias in node.names}
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            names |= {node.module} | {f"{node.module}.{alias.name}" for alias in node.names}
    return {name for name in names if name in modules}


def _scan() -> dict:
    """Every module's imports of this repository's modules (anywhere in the file), and the top-level
    packages morph.py imports."""
    modules = _modules()
    morph = ast.parse((ROOT / "dtm_ds" / "morph.py").read_text())
    roots = {a.name.split(".")[0] for n in ast.walk(morph) if isinstance(n, ast.Import) for a in n.names}
    roots |= {n.module.split(".")[0] for n in ast.walk(morph) if isinstance(n, ast.ImportFrom)}
    graph = {name: sorted(_imports(path, modules) - {name}) for name, path in modules.items()}
    deepspeed = sorted(name for name, path in modules.items() if _imports_deepspeed(path))
    return {"graph": graph, "morph_roots": sorted(roots), "deepspeed": deepspeed}


def _imports_deepspeed(path: Path) -> bool:
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import) and any(a.name.split(".")[0] == "deepspeed" for a in node.names):
            return True
        if isinstance(node, ast.ImportFrom) and (node.module or "").split(".")[0] == "deepspeed":
            return True
    return False


@functools.cache
def scan() -> dict:
    """``_scan()`` in a fresh interpreter: CPython 3.11's ``ast.parse`` can fail with "AST constructor
    recursion depth mismatch" after other tests changed the interpreter's recursion state."""
    code = "import json, tests.test_layout as t; print(json.dumps(t._scan()))"
    done = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, check=True)
    return json.loads(done.stdout)


def test_floors_and_entrypoints():
    for name, imported in scan()["graph"].items():
        if name.startswith(("dtm_ds", "data_prep")):
            assert not {m for m in imported if m.startswith(("eval", "bench"))}, name  # no upward imports
        if name.startswith("eval"):
            assert "dtm_ds.train" not in imported, name  # entrypoints are not libraries
        assert not {m for m in imported if m.startswith("tests")}, name
    roots = set(scan()["morph_roots"])
    assert roots <= {"collections", "typing", "torch"}, roots  # morph.py imports only torch


def test_no_import_cycles():
    """Imports between this repository's modules, at module level or inside functions, form no cycle."""
    graph = scan()["graph"]
    state: dict[str, int] = {}  # 1: on the current path, 2: done

    def visit(name: str, path: list[str]) -> None:
        state[name] = 1
        for dep in graph.get(name, ()):
            if state.get(dep) == 1:
                raise AssertionError("import cycle: " + " -> ".join([*path[path.index(dep) :], dep]))
            if dep not in state:
                visit(dep, [*path, dep])
        state[name] = 2

    for name in graph:
        if name not in state:
            visit(name, [name])


def test_no_sys_path_edits_but_the_pretraining_entrypoint():
    """Only ``deepspeed dtm_ds/train.py`` needs one: its own folder must not shadow top-level modules."""
    editing = sorted(str(path.relative_to(ROOT)) for path in _modules().values() if "sys.path" in path.read_text())
    assert editing == ["dtm_ds/train.py"]


def test_every_mutant_applies_to_the_source():
    """Each mutant's line occurs exactly once in its file: a refactor that moves the line must move the mutant."""
    from tests.mutants import MUTANTS

    stale = [(m.area, m.path) for m in MUTANTS if (ROOT / m.path).read_text().count(m.old) != 1]
    assert stale == []


def test_deepspeed_is_imported_by_the_engine_and_its_three_neighbours_only():
    """The engine (dtm_ds/engine.py) wraps DeepSpeed; besides it only the process-group set-up
    (distributed), the checkpoint format (checkpoint: its pickled classes, the universal conversion) and
    the ZeRO-3 consolidation of a saved student (pretrained) touch DeepSpeed's API."""
    assert scan()["deepspeed"] == ["dtm_ds.checkpoint", "dtm_ds.distributed", "dtm_ds.engine", "dtm_ds.pretrained"]


def test_the_data_package_imports_no_training_code():
    allowed = ("dtm_ds.data", "dtm_ds.config", "dtm_ds.devices", "dtm_ds.seeds", "data_prep")
    for name, imported in scan()["graph"].items():
        if name == "dtm_ds.data" or name.startswith("dtm_ds.data."):
            assert [m for m in imported if not m.startswith(allowed)] == [], name


def test_every_library_module_says_what_it_exports():
    """Each dtm_ds module has ``__all__``, and every name in it exists (internal names take a leading ``_``)."""
    import importlib

    modules = [n for n in _modules() if n.startswith("dtm_ds") and n not in ("dtm_ds", "dtm_ds.__main__")]
    missing, wrong = [], {}
    for name in modules:
        module = importlib.import_module(name)
        if not hasattr(module, "__all__"):
            missing.append(name)
        elif absent := [n for n in module.__all__ if not hasattr(module, n)]:
            wrong[name] = absent
    assert (missing, wrong) == ([], {})
