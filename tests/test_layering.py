"""The architecture, enforced: the analysis core stands alone, and inside it imports run one way.

Layers of the core, lowest first (docs/architecture.md): files → tensors → metrics → engine → tables →
pipeline → reports. A module may import modules of its own layer or of lower ones, never of a higher
one; within the core there is no import cycle; the files layer never imports the engine or the
metrics, and the engine never imports the store.
"""

from __future__ import annotations

import ast
import re
import subprocess
import sys
from pathlib import Path

CORE = Path(__file__).resolve().parents[1] / "spectra"
FORBIDDEN = (
    "trl",
    "peft",
    "transformers",
    "accelerate",
    "vllm",
    "deepspeed",
    "spectra.train",
    "spectra.probes",
    "spectra.cli",
)
LAYERS = {
    "files": ("errors", "names", "h5io", "codecs", "deltafile", "store", "writer"),
    "tensors": ("operators", "svd", "base", "synthetic"),
    "metrics": ("metrics",),
    "engine": ("engine",),
    "tables": ("tables", "stats"),
    "pipeline": ("run", "schedule", "pipeline", "shard"),
    "reports": ("figspec", "figures", "render", "report"),
}
ORDER = list(LAYERS)


def _layer(module: str) -> str:
    """The layer of ``spectra.x`` or ``spectra.metrics.y``."""
    top = module.split(".")[1]
    for layer, members in LAYERS.items():
        if top in members:
            return layer
    raise AssertionError(f"{module}: in no layer of tests/test_layering.py; add it to LAYERS")


def _core_imports() -> dict[str, set[str]]:
    """spectra module → the spectra modules it imports (anywhere in the file, lazily or not)."""
    graph: dict[str, set[str]] = {}
    for path in CORE.rglob("*.py"):
        rel = path.relative_to(CORE.parent).with_suffix("")
        name = ".".join(rel.parts).removesuffix(".__init__")
        if name == "spectra":
            continue  # the package's __init__ re-exports the public API of every layer
        deps = set()
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.ImportFrom) and node.module and node.module.startswith("spectra."):
                deps.add(node.module)
            elif isinstance(node, ast.Import):
                deps |= {a.name for a in node.names if a.name.startswith("spectra.")}
        graph[name] = {d for d in deps if d != name and not d.startswith(name + ".")}
    return graph


def test_core_sources_import_no_higher_layer():
    pattern = re.compile(
        r"^\s*(?:from|import)\s+(" + "|".join(re.escape(f) for f in FORBIDDEN) + r")\b", re.M
    )
    offenders = [
        f"{p.name}: {m.group(0).strip()}" for p in CORE.rglob("*.py") for m in pattern.finditer(p.read_text())
    ]
    assert offenders == []


def test_importing_the_core_loads_no_trainer_module():
    code = (
        "import sys, spectra, spectra.metrics, spectra.engine, spectra.store, spectra.pipeline, "
        "spectra.report; "
        f"print(sorted(m for m in sys.modules if m.split('.')[0] in {list(FORBIDDEN)!r}))"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "[]"


def test_core_imports_run_one_way():
    graph = _core_imports()
    upward = [
        f"{mod} ({_layer(mod)}) imports {dep} ({_layer(dep)})"
        for mod, deps in graph.items()
        for dep in deps
        if ORDER.index(_layer(dep)) > ORDER.index(_layer(mod))
    ]
    assert upward == []


def test_files_never_import_compute_and_the_engine_never_the_store():
    graph = _core_imports()
    files = [m for m in graph if _layer(m) == "files"]
    assert not [(m, d) for m in files for d in graph[m] if _layer(d) != "files"]
    assert not graph["spectra.engine"] & {"spectra.store", "spectra.writer", "spectra.pipeline"}


def test_the_pipeline_runs_one_way():
    """Inside the pipeline layer imports follow a ΔW's way: the run (and its caches) → the schedule → the
    entry point; neither the run nor the shards import the schedule or the entry point."""
    graph = _core_imports()
    assert not graph["spectra.run"] & {"spectra.schedule", "spectra.pipeline", "spectra.shard"}
    assert "spectra.pipeline" not in graph["spectra.schedule"]
    assert not graph["spectra.shard"] & {"spectra.schedule", "spectra.pipeline"}


def test_no_import_cycle_in_the_core():
    graph = _core_imports()
    state: dict[str, int] = {}  # 1 visiting, 2 done

    def visit(node: str, path: list[str]) -> list[str] | None:
        state[node] = 1
        for dep in sorted(graph.get(node, ())):
            if state.get(dep) == 1:
                return [*path, node, dep]
            if dep not in state and (cycle := visit(dep, [*path, node])):
                return cycle
        state[node] = 2
        return None

    cycles = [cycle for node in sorted(graph) if node not in state and (cycle := visit(node, []))]
    assert cycles == []


TRAIN = CORE.parent / "train"
#: What the trainer may import of evaluation: its callback and the benchmark names.
TRAINER_USES_OF_EVAL = {"spectra.train.eval.evaluation", "spectra.train.eval.benchmarks"}
#: What evaluation may import of the trainer: model loading, configuration and its errors, the answer
#: extraction the rewards share, the organism's task, and the data's prompt templates.
EVAL_USES_OF_TRAINER = (
    "checkpoint", "config", "versions", "answers", "math_worker", "rewards", "data", "organism",
)  # fmt: skip


def _train_imports() -> dict[str, set[str]]:
    """spectra.train module → the spectra.train modules it imports (anywhere in the file)."""
    graph: dict[str, set[str]] = {}
    for path in TRAIN.rglob("*.py"):
        rel = path.relative_to(TRAIN).with_suffix("")
        name = ".".join(("spectra", "train", *rel.parts)).removesuffix(".__init__")
        deps = set()
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.ImportFrom) and node.module and node.module.startswith("spectra.train"):
                deps.add(node.module)
        graph[name] = deps
    return graph


def test_evaluation_is_a_room_of_its_own():
    """The trainer uses evaluation only through its callback (and the benchmark names); evaluation uses
    the trainer's model loading and configuration, never the trainer itself."""
    graph = _train_imports()
    assert "spectra.train.eval.run" in graph  # the room exists where this test looks for it
    eval_mods = {m for m in graph if m.startswith("spectra.train.eval")}
    trainer_side = {m: deps for m, deps in graph.items() if m not in eval_mods}
    used = {m: {d for d in deps if d.startswith("spectra.train.eval")} for m, deps in trainer_side.items()}
    wrong = {m: sorted(d - TRAINER_USES_OF_EVAL) for m, d in used.items()}
    assert not {m: d for m, d in wrong.items() if d}
    allowed = {f"spectra.train.{m}" for m in EVAL_USES_OF_TRAINER}

    def permitted(d: str) -> bool:
        return d.startswith("spectra.train.eval") or d == "spectra.train" or any(
            d == a or d.startswith(a + ".") for a in allowed
        )

    outside = {m: sorted(d for d in graph[m] if not permitted(d)) for m in eval_mods}
    assert not {m: d for m, d in outside.items() if d}
