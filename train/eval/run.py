"""`spectra eval`: Avg@k and Pass@k of a model, an adapter checkpoint or a run, on named benchmarks.

:func:`run_eval` does, in order:

1. :func:`plan`: check the options (:class:`~spectra.train.eval.config.EvalConfig`), resolve every
   benchmark and load its problems, resolve the target and its steps, and check each step's delta file
   (metadata only) — so that a bad option or a damaged step fails in one line before a model loads;
2. per step (a run: ``--step last``, ``all`` or a list; anything else: once), build the weights
   (:mod:`spectra.train.eval.run_model`), then per benchmark render the prompts, sample n completions per
   problem (:mod:`spectra.train.eval.sampling_session`: vLLM or transformers, one engine across steps), judge
   them with the training reward's own math-verify scorer, and summarise: Avg@n, Pass@k for each asked
   k, unparsable answers;
3. write one JSON per (benchmark, step, settings) to ``--out`` (default ``RUN/eval/`` for a run,
   ``eval/<model>/`` otherwise; :mod:`spectra.train.eval.results`) and, on a run (unless ``--no-log``),
   append the summary row to ``eval.jsonl`` so that `spectra analyze` draws it with the mechanism curves.

A damaged step (its delta file missing, not a regular file, truncated or damaged, lacking a module, or
holding a non-finite or wrongly shaped ΔW: :class:`~spectra.train.eval.run_model.DamagedStep`) is found before
anything of that step is written. Asked alone, it is a one-line error; among several steps, it is
reported in one line naming the file and module and skipped, as `spectra analyze` does, and the other
steps are evaluated (an error if none is left).

Defaults: n = 16 samples per problem, k = 1 and n, the benchmark's own temperature, top-p and token
budget (:mod:`spectra.train.eval.benchmarks`), seed = the run's seed (0 for a model).
"""

from __future__ import annotations

import time
import warnings
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from spectra.train.checkpoint import load_tokenizer, model_dtype
from spectra.train.config import EvalError
from spectra.train.eval.benchmarks import Benchmark, encode_prompt, get_benchmark, load_problems
from spectra.train.eval.config import EvalConfig
from spectra.train.eval.evaluation import score_completions
from spectra.train.eval.results import eval_row, result_filename, result_record, write_completions
from spectra.train.eval.run_model import (
    DamagedStep,
    Target,
    Weights,
    check_step,
    load_target,
    merges_weights,
    resolve_target,
    select_steps,
)
from spectra.train.eval.sampling import Progress, Sampling, choose_backend
from spectra.train.eval.sampling_session import SamplingSession

from spectra import RunWriter
from spectra.h5io import write_json

__all__ = ["EvalConfig", "Plan", "Task", "eval_dtype", "plan", "run_eval"]

#: ``start(label, total)`` → a function that advances that label's bar by a number of problems.
StartBar = Callable[[str, int], Progress]


@dataclass
class Task:
    """One benchmark as it will be run: its problems and sampling settings, all resolved."""

    bench: Benchmark
    problems: list[dict[str, str]]
    total: int  # problems in the benchmark before --limit
    n: int
    ks: list[int]
    temperature: float
    top_p: float
    max_tokens: int


@dataclass
class Plan:
    """What one `spectra eval` call will do, resolved and checked."""

    cfg: EvalConfig
    target: Target
    steps: list[int | None]
    tasks: list[Task]
    backend: str
    seed: int
    out: Path
    #: steps chosen but left out, each with the one-line reason (a damaged delta file: see ``plan``)
    skipped: dict[int, str] = field(default_factory=dict)


def plan(cfg: EvalConfig) -> Plan:
    """Check everything that can be checked without a model (see the module docstring, step 1)."""
    cfg.check()
    backend = choose_backend(cfg.backend)
    override = (cfg.split, cfg.problem_column, cfg.answer_column, cfg.template)
    benches = [get_benchmark(b, *override) for b in cfg.benchmarks]  # before any download
    if len({b.name for b in benches}) < len(benches):
        raise EvalError(f"--benchmark: the same benchmark is named twice ({', '.join(cfg.benchmarks)})")
    target = resolve_target(cfg.target)
    run = target.run.config if target.run else {}
    if target.step is not None or target.run is None:
        if cfg.steps != "last":
            where = (
                "a trainer checkpoint is one step" if target.step is not None else f"{cfg.target} is a model"
            )
            raise EvalError(f"--step {cfg.steps}: only a run directory has steps to choose; {where}")
        steps: list[int | None] = [target.step]
    else:
        steps = list(select_steps(target.run, cfg.steps))
    skipped = _damaged_steps(target, steps)  # local files: before any benchmark is downloaded
    if benches:
        tasks = [_task(cfg, b, cfg.n or 16, cfg.limit, None) for b in benches]
    elif run.get("eval_dataset"):  # the run's held-out set, asked as training asked it
        held = get_benchmark(run["eval_dataset"], cfg.split or run.get("eval_split"), *override[1:])
        training = {
            "temperature": run.get("temperature"),
            "top_p": 1.0,
            "max_tokens": run.get("max_completion_length"),
        }
        tasks = [
            _task(
                cfg, held, cfg.n or run.get("eval_k") or 16, cfg.limit or run.get("eval_problems"), training
            )
        ]
    else:
        raise EvalError("--benchmark: expected at least one benchmark (e.g. --benchmark math500)")
    seed = cfg.seed if cfg.seed is not None else int(run.get("seed", 0))
    if cfg.out:
        out = Path(cfg.out)
    elif target.run is not None:
        out = target.run.path / "eval"
    else:
        out = Path("eval") / target.label
    return Plan(cfg, target, [s for s in steps if s not in skipped], tasks, backend, seed, out, skipped)


def _damaged_steps(target: Target, steps: list[int | None]) -> dict[int, str]:
    """The steps whose delta file cannot be opened or lacks modules (:func:`check_step`, metadata only),
    each with its error. One step asked: its error is raised here, before a model loads; several: the
    damaged ones are reported and skipped, as `spectra analyze` does, unless none is left."""
    damaged: dict[int, str] = {}
    for step in steps:
        if target.run is not None and step is not None and merges_weights(target, step):
            try:
                check_step(target.run, step)
            except DamagedStep as e:
                if len(steps) == 1:
                    raise
                damaged[step] = str(e)
    if damaged and len(damaged) == len(steps):
        raise DamagedStep(f"no step can be evaluated; step {min(damaged)}: {damaged[min(damaged)]}")
    return damaged


def _task(cfg: EvalConfig, bench: Benchmark, n: int, limit: int | None, training: dict | None) -> Task:
    ks = sorted(set(cfg.ks or (1, n)))
    if ks[-1] > n:
        raise EvalError(f"--k {ks[-1]}: larger than --n {n}; Pass@k needs at least k samples per problem")
    problems = load_problems(bench)
    defaults = training or {}

    def pick(option: Any, name: str) -> Any:
        if option is not None:
            return option
        return defaults.get(name) if defaults.get(name) is not None else getattr(bench, name)

    return Task(
        bench, problems[:limit] if limit else problems, len(problems), n, ks,
        pick(cfg.temperature, "temperature"), pick(cfg.top_p, "top_p"), pick(cfg.max_tokens, "max_tokens"),
    )  # fmt: skip


def eval_dtype(precision: str, device: torch.device, merges: bool) -> torch.dtype:
    """``--precision``; ``auto`` is bf16 on a GPU that has it, except for weights made by adding an
    update to the base (a run's ΔW, a PEFT adapter), which stay float32: in bf16, W0 + ΔW rounds back to
    W0 wherever the update is below half a bf16 step of W0, and the evaluated model would not be the
    trained one."""
    if precision != "auto":
        return model_dtype(precision)
    if device.type == "cuda" and not merges and torch.cuda.is_bf16_supported():
        return torch.bfloat16
    return torch.float32


def run_eval(
    cfg: EvalConfig, start_bar: StartBar | None = None, log: Callable[[str], None] = print
) -> list[dict[str, Any]]:
    """Evaluate and write the results (see the module docstring); returns one summary row per
    (step, benchmark), in order, each with the path of its JSON file under ``file``."""
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()  # "Loading weights" bars: the console shows one bar per benchmark
    for old in ("gradient_checkpointing", "is_gradient_checkpointing"):  # transformers 5 renames, not ours
        warnings.filterwarnings("ignore", message=rf"`{old}\S*` is deprecated", category=FutureWarning)
    p = plan(cfg)
    device = torch.device(cfg.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    rows = []
    if cfg.gpu_memory_utilization is not None and p.backend != "vllm":
        log(f"note: --gpu-memory-utilization is for vLLM; the {p.backend} backend ignores it")
    if cfg.batch_size is not None and p.backend == "vllm":
        log("note: --batch-size is for transformers; vLLM batches by itself and ignores it")
    for step, error in p.skipped.items():
        log(f"error: step {step} skipped: {error}")
    sampler = SamplingSession(
        p.backend, p.target.model_dir, device, seed=p.seed, batch_size=cfg.generate_batch_size(),
        gpu_memory_utilization=cfg.gpu_memory_utilization, log=log,
    )  # fmt: skip
    try:
        for step in p.steps:
            try:
                rows += _eval_step(p, step, sampler, device, start_bar, log)
            except DamagedStep as e:  # raised while the weights are built, before anything is written
                if len(p.steps) + len(p.skipped) == 1:
                    raise
                log(f"error: step {step} skipped: {e}")
                p.skipped[step] = str(e)  # type: ignore[index]
    finally:
        sampler.close()
    if not rows and p.skipped:
        first = min(p.skipped)
        raise DamagedStep(f"no step could be evaluated; step {first}: {p.skipped[first]}")
    return rows


def _eval_step(
    p: Plan,
    step: int | None,
    sampler: SamplingSession,
    device: torch.device,
    start_bar: StartBar | None,
    log: Callable[[str], None],
) -> list[dict[str, Any]]:
    """Every benchmark at one step (or on the model itself): build the weights, hand them to the
    sampler, sample, score, write. A damaged step raises :class:`DamagedStep` before anything is
    written."""
    cfg = p.cfg
    dtype = eval_dtype(cfg.precision, device, merges_weights(p.target, step))
    only_tokenizer = p.backend == "vllm" and p.target.run is None and p.target.adapter_dir is None
    if only_tokenizer:  # vLLM loads the model itself
        tokenizer, model, weights = (
            load_tokenizer(p.target.model_dir, cfg.target),
            None,
            Weights(f"model {p.target.model_dir}"),
        )
    else:
        tokenizer, model, weights = load_target(p.target, step, dtype)
    where = p.target.label + (f" step {step}" if step is not None else "")
    log(f"{where}: {weights.note} ({str(dtype).removeprefix('torch.')}, {p.backend} on {device})")
    if weights.rounded_away > 0.01:
        log(
            f"warning: {weights.rounded_away:.1%} of the update's entries round away in {dtype}; "
            "use --precision fp32"
        )
    prompts = [[encode_prompt(t.bench, r["problem"], tokenizer) for r in t.problems] for t in p.tasks]
    longest = max(len(ids) for group in prompts for ids in group) + max(t.max_tokens for t in p.tasks)
    sampler.load(model, tokenizer, dtype, longest)
    del model
    rows = []
    for task, ids in zip(p.tasks, prompts, strict=True):
        sampling = Sampling(task.n, task.max_tokens, task.temperature, task.top_p, p.seed)
        advance = start_bar(f"{where} {task.bench.name}", len(ids)) if start_bar else None
        t0 = time.perf_counter()
        samples = sampler.sample(ids, sampling, advance)
        seconds = time.perf_counter() - t0
        scored = score_completions(samples.texts, [r["answer"] for r in task.problems])
        result = result_record(p, task, step, weights, sampling, samples, scored, seconds, device, dtype)
        path = p.out / result_filename(task, step, p.seed, p.backend)
        write_json(path, result)
        if cfg.save_completions:
            text = [tokenizer.decode(x) for x in ids]
            write_completions(path.with_suffix(".completions.jsonl"), task, text, samples, scored)
        if p.target.run is not None and cfg.log_run:
            RunWriter(p.target.run.path).append_metrics(eval_row(result), "eval.jsonl")
        rows.append({**result, "file": str(path)})
    return rows
