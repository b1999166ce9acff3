"""The house rules, checked on the source: no import cycle between project modules (module-level,
function-level and importlib imports all count), ``crf`` imports nothing of ``deeplab_v1``, nothing but
the CLI imports the runner, the rooms of docs/architecture.md (a model imports no data pipeline, engine,
stage or run machinery; the run context knows no particular network; the stages ask the model, not its
name), and no source file over 600 lines."""

from __future__ import annotations

import ast
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
PACKAGES = ("deeplab_v1", "crf")


def _module_name(path: Path) -> str:
    parts = list(path.relative_to(REPO).with_suffix("").parts)
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def _sources() -> dict[str, Path]:
    return {_module_name(p): p for pkg in PACKAGES for p in sorted((REPO / pkg).rglob("*.py"))}


def _imports(module: str, path: Path, known: set[str]) -> set[str]:
    """Project modules ``module`` imports anywhere in its file (importing a.b.c runs a and a.b too; a
    submodule's import of its own parent package, which is already running, does not count)."""
    package = module if path.name == "__init__.py" else module.rsplit(".", 1)[0]
    found: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        if isinstance(node, ast.Import):
            targets = [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.split(".")[: len(package.split(".")) - node.level + 1]
                mod = ".".join(base + ([node.module] if node.module else []))
            else:
                mod = node.module or ""
            targets = [mod] + [f"{mod}.{a.name}" for a in node.names]
        elif isinstance(node, ast.Call) and getattr(node.func, "attr", getattr(node.func, "id", "")) in (
                "import_module", "__import__") and node.args and isinstance(node.args[0], ast.Constant):
            name = str(node.args[0].value)
            if name.startswith("."):
                name = package + name if name != "." else package
            targets = [name]
        else:
            continue
        for t in targets:
            parts = t.split(".")
            for i in range(1, len(parts) + 1):
                cand = ".".join(parts[:i])
                if cand in known and cand != module and not module.startswith(cand + "."):
                    found.add(cand)
    return found


def _graph() -> dict[str, set[str]]:
    mods = _sources()
    return {m: _imports(m, p, set(mods)) for m, p in mods.items()}


def test_no_import_cycle():
    graph = _graph()
    done: set[str] = set()

    def visit(m: str, path: list[str]) -> None:
        assert m not in path, f"import cycle: {' -> '.join(path[path.index(m):] + [m])}"
        if m in done:
            return
        for n in sorted(graph[m]):
            visit(n, path + [m])
        done.add(m)

    for m in graph:
        visit(m, [])


def test_the_graph_sees_function_level_imports(tmp_path):
    """The check would catch a lazy import (the kind that used to hide cycles); the probe module is read
    from a temporary folder under the name ``crf._probe``, so the source tree is never written."""
    src = REPO / "crf" / "params.py"
    assert "crf.dense" not in _imports("crf.params", src, {"crf.dense", "crf.params"})
    fake = tmp_path / "_probe.py"
    fake.write_text("def f():\n    from .dense import dense_crf\n    import importlib\n    importlib.import_module('crf.params')\n")
    found = _imports("crf._probe", fake, {"crf.dense", "crf.params", "crf._probe"})
    assert found == {"crf.dense", "crf.params"}


def test_crf_never_imports_deeplab_v1():
    graph = _graph()
    bad = {m: sorted(n for n in deps if n.startswith("deeplab_v1")) for m, deps in graph.items() if m.startswith("crf")}
    assert not any(bad.values()), {m: d for m, d in bad.items() if d}


def test_nothing_but_the_cli_imports_the_runner():
    graph = _graph()
    users = sorted(m for m, deps in graph.items() if "deeplab_v1.runner" in deps)
    assert users == ["deeplab_v1.cli"]


#: What a network may not know: the data pipeline, the training / inference engine, the stages, the
#: run's context, configuration, folder layout and runner (docs/architecture.md, "Rooms").
MODEL_FORBIDDEN = ("deeplab_v1.data", "deeplab_v1.engine", "deeplab_v1.stages", "deeplab_v1.context",
                   "deeplab_v1.config", "deeplab_v1.layout", "deeplab_v1.runner", "deeplab_v1.evaluation")


def test_a_model_imports_no_data_pipeline_or_engine():
    graph = _graph()
    bad = {m: sorted(n for n in deps if n.startswith(MODEL_FORBIDDEN))
           for m, deps in graph.items() if m.startswith("deeplab_v1.models")}
    assert not any(bad.values()), {m: d for m, d in bad.items() if d}


def test_the_context_knows_no_particular_network():
    """``RunContext`` serves every model alike: what a network needs is asked of ``deeplab_v1.models``
    by the stages that build it."""
    deps = _graph()["deeplab_v1.context"]
    assert not sorted(n for n in deps if n.startswith("deeplab_v1.models"))


def test_the_data_pipeline_asks_the_process_not_the_crf_pool_for_cores():
    """The core count is the process's (``deeplab_v1.process.available_cores``); the data pipeline knows
    nothing of the CRF's worker pool."""
    graph = _graph()
    bad = {m: sorted(n for n in deps if n.startswith("crf.pool"))
           for m, deps in graph.items() if m.startswith("deeplab_v1.data")}
    assert not any(bad.values()), {m: d for m, d in bad.items() if d}


def test_only_the_runner_and_the_cli_import_the_stages():
    """Data flows one way: a stage may use the fingerprints, the context, the data and the engine, never the
    reverse (what two rooms share lives in the lower one, e.g. ``data.lists.choose_subset``)."""
    graph = _graph()
    users = sorted(m for m, deps in graph.items() if not m.startswith("deeplab_v1.stages")
                   and any(n.startswith("deeplab_v1.stages") for n in deps))
    assert users == ["deeplab_v1.cli", "deeplab_v1.runner"], users


def _name_tests(path: Path) -> list[str]:
    """``"..." in <...>.name`` (or ``not in``) tests in a file: a stage guessing a model's kind from its name."""
    found = []
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        if isinstance(node, ast.Compare) and isinstance(node.left, ast.Constant) and isinstance(node.left.value, str):
            for op, right in zip(node.ops, node.comparators):
                if isinstance(op, (ast.In, ast.NotIn)) and ast.unparse(right).endswith("model.name"):
                    found.append(f"{path.name}:{node.lineno}: {ast.unparse(node)}")
    return found


def test_the_stages_ask_the_model_not_its_name(tmp_path):
    probe = tmp_path / "probe.py"
    probe.write_text('if "xception" in ctx.cfg.model.name:\n    pass\n')
    assert _name_tests(probe) == ['probe.py:1: \'xception\' in ctx.cfg.model.name']  # the check sees one
    found = [hit for p in sorted((REPO / "deeplab_v1" / "stages").glob("*.py")) for hit in _name_tests(p)]
    assert not found, found


def test_no_source_file_over_600_lines():
    files = [p for pkg in (*PACKAGES, "tools") for p in (REPO / pkg).rglob("*.py")]
    long = {str(p.relative_to(REPO)): n for p in files if (n := len(p.read_text(encoding="utf-8").splitlines())) > 600}
    assert not long, long


def test_public_api_stays_importable():
    """The names users and scripts call (docs/architecture.md), wherever their modules moved."""
    from crf import CRFParams, dense_crf, run_search  # noqa: F401
    from crf.search import SearchConfig, run_search as run_search2  # noqa: F401
    from deeplab_v1.engine.inference import ScoreMap, predict  # noqa: F401
    from deeplab_v1.models import build_model  # noqa: F401
    from deeplab_v1.weights import load_init  # noqa: F401

    assert run_search is run_search2
    assert len(SearchConfig().coarse_grid()) == 96 and callable(SearchConfig.refine)


def test_the_schema_builds_no_model():
    """``deeplab_v1.config`` checks types, ranges and names: of the models it knows only ``MODEL_NAMES``, and
    nothing of the engine (the ``train.lr_mult`` patterns are checked where the model is built,
    ``stages.train.check_lr_mult``)."""
    path = REPO / "deeplab_v1" / "config.py"
    deps = _graph()["deeplab_v1.config"]
    assert not sorted(n for n in deps if n.startswith("deeplab_v1.engine")), deps
    assert not sorted(n for n in deps if n.startswith("deeplab_v1.models.")), deps  # no builder module
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        if isinstance(node, ast.ImportFrom) and node.level and (node.module or "").startswith("models"):
            assert [a.name for a in node.names] == ["MODEL_NAMES"], ast.unparse(node)
        if isinstance(node, ast.ImportFrom) and not node.level and (node.module or "").startswith("deeplab_v1.models"):
            assert [a.name for a in node.names] == ["MODEL_NAMES"], ast.unparse(node)
