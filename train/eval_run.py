"""`spectra eval`: Avg@k and Pass@k of a model, an adapter checkpoint or a run, on named benchmarks.

:func:`run_eval` does, in order:

1. check the options (:meth:`EvalConfig.check`), resolve every benchmark and load its problems, and
   resolve the target and its steps — so that a bad option fails in one line before a model loads;
2. per step (a run: ``--step last``, ``all`` or a list; anything else: once), build the weights
   (:mod:`spectra.train.run_model`), then per benchmark render the prompts, sample n completions per
   problem (:mod:`spectra.train.sampling`: vLLM or transformers), judge them with the training reward's
   own math-verify scorer, and summarise: Avg@n, Pass@k for each asked k, unparsable answers;
3. write one JSON per (benchmark, step, settings) to ``--out`` (default ``RUN/eval/`` for a run,
   ``eval/<model>/`` otherwise) with the settings, the weights' provenance, the summary and per-problem
   counts of correct and unparsable samples (enough to recompute Pass@k for any k ≤ n); on a run (unless
   ``--no-log``), append the summary row to ``eval.jsonl`` so that `spectra analyze` draws it with the
   mechanism curves.

Defaults: n = 16 samples per problem, k = 1 and n, the benchmark's own temperature, top-p and token
budget (:mod:`spectra.train.benchmarks`), seed = the run's seed (0 for a model).
"""

from __future__ import annotations

import dataclasses
import datetime
import gc
import json
import re
import sys
import tempfile
import time
import warnings
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from spectra.train.benchmarks import Benchmark, encode_prompt, get_benchmark, load_problems
from spectra.train.checkpoint import load_tokenizer, model_dtype
from spectra.train.config import ORGANISM, EvalError
from spectra.train.evaluation import Scored, score_completions
from spectra.train.run_model import Target, Weights, load_target, merges_weights, resolve_target, select_steps
from spectra.train.sampling import (
    Progress,
    Samples,
    Sampling,
    VLLMSampler,
    choose_backend,
    sample_completions,
)

from spectra.h5io import atomic_path, write_json
from spectra.store import RunWriter

#: ``start(label, total)`` → a function that advances that label's bar by a number of problems.
StartBar = Callable[[str, int], Progress]


@dataclass
class EvalConfig:
    """Every option of `spectra eval` (None: the benchmark's or the run's own value)."""

    target: str
    benchmarks: tuple[str, ...] = ()  # empty: the run's held-out set, with training's eval settings
    n: int | None = None  # samples per problem (None: 16, or the run's eval_k for its held-out set)
    ks: tuple[int, ...] | None = None  # Pass@k for these k (None: 1 and n)
    temperature: float | None = None
    top_p: float | None = None
    max_tokens: int | None = None
    steps: str = "last"  # runs only: last, all, or "0,50,100"
    seed: int | None = None
    limit: int | None = None  # the first N problems of each benchmark
    split: str | None = None
    problem_column: str | None = None
    answer_column: str | None = None
    template: str | None = None
    batch_size: int | None = None  # sequences per generate call (transformers backend; None: 256)
    backend: str = "auto"
    gpu_memory_utilization: float | None = None  # vLLM's share of memory (None: vLLM's default)
    precision: str = "auto"
    device: str | None = None
    out: str | None = None
    save_completions: bool = False
    log_run: bool = True  # a run: append the summary row to its eval.jsonl

    def check(self) -> None:
        """One-line errors for values no evaluation can take."""
        for option, value in (("n", self.n), ("max-tokens", self.max_tokens), ("limit", self.limit)):
            if value is not None and value < 1:
                raise EvalError(f"--{option} {value}: expected a positive integer")
        if self.seed is not None and self.seed < 0:
            raise EvalError(f"--seed {self.seed}: expected an integer ≥ 0")
        for k in self.ks or ():
            if k < 1:
                raise EvalError(f"--k {k}: expected k ≥ 1")
        if self.temperature is not None and self.temperature < 0:
            raise EvalError(f"--temperature {self.temperature}: expected ≥ 0 (0: greedy)")
        if self.top_p is not None and not 0 < self.top_p <= 1:
            raise EvalError(f"--top-p {self.top_p}: expected 0 < top-p ≤ 1")
        if self.batch_size is not None and self.batch_size < 1:
            raise EvalError(f"--batch-size {self.batch_size}: expected a positive integer")
        if self.gpu_memory_utilization is not None and not 0 < self.gpu_memory_utilization <= 1:
            raise EvalError(
                f"--gpu-memory-utilization {self.gpu_memory_utilization}: expected a fraction in (0, 1]"
            )
        if self.precision not in ("auto", "bf16", "fp32"):
            raise EvalError(f"--precision {self.precision}: expected auto, bf16 or fp32")
        if self.device is not None and not re.fullmatch(r"cpu|cuda(:\d+)?", self.device):
            raise EvalError(f"--device {self.device}: expected cpu, cuda or cuda:N")
        if self.device and self.device.startswith("cuda") and not torch.cuda.is_available():
            raise EvalError(f"--device {self.device}: no CUDA GPU is visible")


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
    if target.step is not None or target.run is None:
        if cfg.steps != "last":
            where = (
                "a trainer checkpoint is one step" if target.step is not None else f"{cfg.target} is a model"
            )
            raise EvalError(f"--step {cfg.steps}: only a run directory has steps to choose; {where}")
        steps: list[int | None] = [target.step]
    else:
        steps = list(select_steps(target.run, cfg.steps))
    seed = cfg.seed if cfg.seed is not None else int(run.get("seed", 0))
    if cfg.out:
        out = Path(cfg.out)
    elif target.run is not None:
        out = target.run.path / "eval"
    else:
        out = Path("eval") / target.label
    return Plan(cfg, target, steps, tasks, backend, seed, out)


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
    sampler = _Sampler(p, device, log)
    try:
        for step in p.steps:
            rows += _eval_step(p, step, sampler, device, start_bar, log)
    finally:
        sampler.close()
    return rows


def _eval_step(
    p: Plan,
    step: int | None,
    sampler: _Sampler,
    device: torch.device,
    start_bar: StartBar | None,
    log: Callable[[str], None],
) -> list[dict[str, Any]]:
    """Every benchmark at one step (or on the model itself): build the weights, hand them to the
    sampler, sample, score, write."""
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
        result = _result(p, task, step, weights, sampling, samples, scored, seconds, device, dtype)
        path = p.out / _filename(task, step, p.seed, p.backend)
        write_json(path, result)
        if cfg.save_completions:
            text = [tokenizer.decode(x) for x in ids]
            _write_completions(path.with_suffix(".completions.jsonl"), task, text, samples, scored)
        if p.target.run is not None and cfg.log_run:
            RunWriter(p.target.run.path).append_metrics(_eval_row(result), "eval.jsonl")
        rows.append({**result, "file": str(path)})
    return rows


class _Sampler:
    """The chosen backend, kept across the steps of one call: transformers on each step's model, or one
    vLLM engine. The engine reads a run's rebuilt weights from a temporary directory, and later steps
    reload theirs into it in place (:meth:`VLLMSampler.reload`); a new engine is built only where this
    vLLM cannot reload, or when the precision changes."""

    def __init__(self, p: Plan, device: torch.device, log: Callable[[str], None] = print):
        self.p, self.device, self.log = p, device, log
        self.model: Any = None
        self.tokenizer: Any = None
        self.vllm: VLLMSampler | None = None
        self.dtype: torch.dtype | None = None
        self.tmp: tempfile.TemporaryDirectory | None = None

    def load(self, model: Any, tokenizer: Any, dtype: torch.dtype, max_len: int) -> None:
        """Sample from ``model`` from now on (None: the target's own directory, vLLM only)."""
        self.tokenizer = tokenizer
        if self.p.backend == "vllm":
            self._load_vllm(model, tokenizer, dtype, max_len)
        else:
            self.model = None  # the previous step's weights go before the next ones arrive
            gc.collect()
            self.model = model.to(self.device)

    def _load_vllm(self, model: Any, tokenizer: Any, dtype: torch.dtype, max_len: int) -> None:
        """Save the weights for vLLM, reload them into the engine or build one; the previous step's
        folder is removed once the engine no longer reads it (a failure removes the new one)."""
        model_dir, tmp = Path(self.p.target.model_dir), None
        try:
            if model is not None:  # rebuilt or merged weights: vLLM reads them from disk
                tmp = tempfile.TemporaryDirectory(prefix="spectra-eval-")
                model.save_pretrained(tmp.name, safe_serialization=True)
                tokenizer.save_pretrained(tmp.name)
                model_dir = Path(tmp.name)
            t0 = time.perf_counter()
            if self.vllm is not None and dtype == self.dtype and self.vllm.reload(model_dir):
                self.log(f"vLLM: weights reloaded in place ({time.perf_counter() - t0:.1f} s)")
            else:
                self._stop_engine()
                self.log("vLLM: starting an engine (its warnings go to stderr)")
                self.vllm = VLLMSampler(
                    model_dir, dtype, seed=self.p.seed, max_model_len=max_len,
                    gpu_memory_utilization=self.p.cfg.gpu_memory_utilization,
                )  # fmt: skip
                self.log(f"vLLM: engine ready ({time.perf_counter() - t0:.0f} s)")
        except BaseException:
            if tmp is not None:
                tmp.cleanup()
            raise
        if self.tmp is not None:
            self.tmp.cleanup()
        self.tmp, self.dtype = tmp, dtype

    def sample(self, prompts: Sequence[list[int]], sampling: Sampling, progress: Progress | None) -> Samples:
        if self.vllm is not None:
            return self.vllm.sample(prompts, sampling, progress=progress)
        return sample_completions(
            self.model,
            self.tokenizer,
            prompts,
            sampling,
            batch_size=_batch_size(self.p.cfg),
            progress=progress,
        )

    def _stop_engine(self) -> None:
        if self.vllm is not None:
            self.vllm.close()
        self.vllm = None

    def close(self) -> None:
        self._stop_engine()
        self.model = None
        gc.collect()
        if torch.cuda.is_available():
            torch.cuda.empty_cache()
        if self.tmp is not None:
            self.tmp.cleanup()
            self.tmp = None


def _batch_size(cfg: EvalConfig) -> int:
    """Sequences per ``generate`` call of the transformers backend."""
    return cfg.batch_size or 256


def _filename(task: Task, step: int | None, seed: int, backend: str) -> str:
    """``<benchmark>[-stepNNNNNN]-n<n>-T<temperature>-seed<seed>[-first<N>][-vllm].json`` (``-first<N>``
    when only the first N problems are asked: ``--limit``, or a run's held-out subset): another sample
    count, temperature, seed, problem subset or backend (whose random streams differ) does not overwrite a
    result; the same ones evaluated again do (other settings are recorded inside)."""
    at = f"-step{step:06d}" if step is not None else ""
    first = f"-first{len(task.problems)}" if len(task.problems) < task.total else ""
    engine = "-vllm" if backend == "vllm" else ""
    return f"{task.bench.name}{at}-n{task.n}-T{task.temperature:g}-seed{seed}{first}{engine}.json"


def _result(
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
    from spectra.train.trainer import versions

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
        "batch_size": _batch_size(p.cfg) if p.backend == "transformers" else None,
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


def _eval_row(result: dict[str, Any]) -> dict[str, Any]:
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


def _write_completions(path: Path, task: Task, prompts: list[str], samples: Samples, scored: Scored) -> None:
    """Per problem: the problem, its answer, the prompt as the model saw it, and each completion with its
    boxed answer, whether it was correct and whether it was cut off."""
    from spectra.train.rewards import last_boxed

    with atomic_path(path) as tmp, open(tmp, "w") as fh:
        for i, r in enumerate(task.problems):
            row = {
                "index": i, **r, "prompt": prompts[i], "completions": samples.texts[i],
                "boxed": [last_boxed(t) for t in samples.texts[i]], "correct": scored.correct[i],
                "truncated": samples.truncated[i], "tokens": samples.tokens[i],
            }  # fmt: skip
            fh.write(json.dumps(row) + "\n")
