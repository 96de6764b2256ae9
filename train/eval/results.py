"""What `spectra eval` writes: one JSON per (benchmark, step, settings), a row of the run's eval.jsonl, and
optionally every completion (docs/format.md, "eval/").

The JSON holds the settings, the weights' provenance, the summary (Avg@n, Pass@k for each asked k,
unparsable and truncated shares, mean length) and per-problem counts of correct and unparsable samples:
enough to recompute Pass@k for any k ≤ n.
"""

from __future__ import annotations

import dataclasses
import datetime
import json
import sys
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
from spectra.train.config import ORGANISM
from spectra.train.eval.evaluation import Scored
from spectra.train.eval.run_model import Weights
from spectra.train.eval.sampling import Samples, Sampling

from spectra.h5io import atomic_path

if TYPE_CHECKING:
    from spectra.train.eval.run import Plan, Task


def result_filename(task: Task, step: int | None, seed: int, backend: str) -> str:
    """``<benchmark>[-stepNNNNNN]-n<n>-T<temperature>-seed<seed>[-first<N>][-vllm].json`` (``-first<N>``
    when only the first N problems are asked: ``--limit``, or a run's held-out subset): another sample
    count, temperature, seed, problem subset or backend (whose random streams differ) does not overwrite a
    result; the same ones evaluated again do (other settings are recorded inside)."""
    at = f"-step{step:06d}" if step is not None else ""
    first = f"-first{len(task.problems)}" if len(task.problems) < task.total else ""
    engine = "-vllm" if backend == "vllm" else ""
    return f"{task.bench.name}{at}-n{task.n}-T{task.temperature:g}-seed{seed}{first}{engine}.json"


def result_record(
    p: Plan,
    task: Task,
    step: int | None,
    weights: Weights,
    sampling: Sampling,
    samples: Samples,
    scored: Scored,
    seconds: float,
    device: torch.device,
    dtype: torch.dtype,
) -> dict[str, Any]:
    """The JSON of one benchmark at one step (see the module docstring)."""
    from spectra.train.versions import versions

    bench, run = task.bench, p.target.run
    return {
        "benchmark": bench.name,
        "title": bench.title,
        "source": bench.source,
        "split": bench.split if bench.source == ORGANISM or not Path(bench.source).suffix else None,
        "template": bench.template,
        "target": p.cfg.target,
        "run": run.config.get("name") if run else None,
        "method": run.config.get("method") if run else None,
        "step": step,
        "model": str(p.target.model_dir),
        "weights": weights.note,
        "weights_complete": weights.complete,
        "merge_rounded_away": weights.rounded_away,
        **dataclasses.asdict(sampling),
        "ks": task.ks,
        "limit": p.cfg.limit,
        "problems_total": task.total,
        "backend": p.backend,
        "batch_size": p.cfg.generate_batch_size() if p.backend == "transformers" else None,
        "gpu_memory_utilization": p.cfg.gpu_memory_utilization if p.backend == "vllm" else None,
        "device": str(device),
        "dtype": str(dtype).removeprefix("torch."),
        "problems": len(task.problems),
        **scored.summary(task.ks),
        "unparsable_count": sum(not ok for group in scored.parsed for ok in group),
        **samples.summary(),
        "completions": sum(len(group) for group in samples.texts),
        "seconds": round(seconds, 3),
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "command": " ".join(sys.argv),
        "versions": versions(),
        "per_problem": [
            {
                "index": i,
                "answer": r["answer"],
                "correct": sum(c),
                "unparsable": sum(not ok for ok in parsed),
                "tokens_mean": round(sum(tokens) / len(tokens), 2),
            }
            for i, (r, c, parsed, tokens) in enumerate(
                zip(task.problems, scored.correct, scored.parsed, samples.tokens, strict=True)
            )
        ],
    }


def eval_row(result: dict[str, Any]) -> dict[str, Any]:
    """The line appended to the run's eval.jsonl (the summary without the per-problem detail)."""
    keep = (
        "step", "benchmark", "problems", "n", "temperature", "top_p", "max_tokens", "seed", "unparsable",
        "truncated", "tokens_mean", "backend",
    )  # fmt: skip
    row = {k: result[k] for k in keep}
    row |= {k: v for k, v in result.items() if k.startswith(("avg@", "pass@"))}
    if not result["weights_complete"]:
        row["weights_complete"] = False
    return row | {"source": "spectra eval"}


def write_completions(path: Path, task: Task, prompts: list[str], samples: Samples, scored: Scored) -> None:
    """Per problem: the problem, its answer, the prompt as the model saw it, and each completion with its
    boxed answer, whether it was correct and whether it was cut off."""
    from spectra.train.answers import last_boxed

    with atomic_path(path) as tmp, open(tmp, "w") as fh:
        for i, r in enumerate(task.problems):
            row = {
                "index": i, **r, "prompt": prompts[i], "completions": samples.texts[i],
                "boxed": [last_boxed(t) for t in samples.texts[i]], "correct": scored.correct[i],
                "truncated": samples.truncated[i], "tokens": samples.tokens[i],
            }  # fmt: skip
            fh.write(json.dumps(row) + "\n")
