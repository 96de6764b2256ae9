"""`spectra train`: one RLVR run on TRL's GRPOTrainer, recording ΔW as it goes.

The steps of :func:`train`, in order:

1. resolve the configuration (organism preset or the study's values) and check every option;
2. find the model on disk (a local directory, a hub snapshot, or the organism, built once and cached) and
   load it through ``from_pretrained`` — the same path for all three;
3. attach the method (:mod:`spectra.train.methods`), after which W0 is only ever read back from the
   checkpoint's safetensors files;
4. build the data, the rewards (math-verify on the final ``\\boxed{}``), TRL's ``GRPOConfig`` for the
   loss, and the callbacks: :class:`~spectra.train.callback.SpectraCallback` (the one callback a user's
   own script adds: ΔW recorder, metrics logger, live geometry monitor, collapse alarm, live checks),
   the console line, held-out evaluation, the method's own (AdaLoRA's rank allocation);
5. train, resuming from the last trainer checkpoint with ``resume=True``: delta files and log rows
   written after that checkpoint belong to the abandoned trajectory and are removed first.

(Over 400 lines: preparing a run — model, method, data, callbacks, resume, distributed checks — is
one sequence; its parts are named functions below, each used once.)
"""

from __future__ import annotations

import dataclasses
import json
import re
import shutil
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from spectra.train.callback import SpectraCallback, free_name
from spectra.train.checkpoint import BaseCheckpoint, find_model_dir, load_pretrained, model_dtype
from spectra.train.config import ORGANISM, VLLM_SERVER_URL, TrainConfig, TrainConfigError
from spectra.train.data import build_dataset, load_rows
from spectra.train.eval.benchmarks import benchmark_name
from spectra.train.eval.evaluation import HeldOutEval
from spectra.train.methods import get_method
from spectra.train.methods.base import Method
from spectra.train.monitor import CollapseAlarm, GeometryMonitor, collapse_rule
from spectra.train.recorder import ConsoleLog, DeltaRecorder
from spectra.train.versions import versions

from spectra import load_run
from spectra.h5io import atomic_path, write_json
from spectra.store import read_jsonl

DEEPSPEED_CONFIGS = {"zero2": Path(__file__).parent / "deepspeed" / "zero2.json"}


@dataclass
class Session:
    """Everything a run is made of, ready to train (see :func:`prepare`)."""

    cfg: TrainConfig
    run_dir: Path
    model: Any
    tokenizer: Any
    method: Method
    base: BaseCheckpoint
    recorder: DeltaRecorder
    trainer: Any
    resume_from: Path | None
    monitor: GeometryMonitor | None = None  # live geometry (--monitor-every); None when off
    alarm: CollapseAlarm | None = None  # the collapse alarm on the monitor's series
    callback: SpectraCallback | None = None  # the one callback that holds recorder, monitor and alarm

    def train(self) -> Path:
        self.trainer.train(resume_from_checkpoint=str(self.resume_from) if self.resume_from else None)
        return self.run_dir


def train(cfg: TrainConfig, resume: bool = False) -> Path:
    """Run (or resume) one RLVR run; returns its run directory."""
    return prepare(cfg, resume).train()


def prepare(cfg: TrainConfig, resume: bool = False) -> Session:
    """Resolve, check, load, attach and wire up a run without training it yet."""
    from accelerate import PartialState
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()  # "Loading weights" bars; the console shows one line per step
    for old in ("gradient_checkpointing", "is_gradient_checkpointing"):  # transformers 5 renames, not ours
        warnings.filterwarnings("ignore", message=rf"`{old}\S*` is deprecated", category=FutureWarning)
    # cpu as GRPOConfig's use_cpu: launched processes on a CPU join one gloo group (MULTI_CPU) from here
    # on, so that the rollouts of a step are split over them (without it, accelerate's state says one
    # process until the trainer builds its own, and each process would take the whole batch)
    state = PartialState(cpu=not torch.cuda.is_available())
    _check_launch(state.num_processes)
    plain = state.distributed_type.name in ("NO", "MULTI_GPU", "MULTI_CPU") and cfg.deepspeed is None
    unsharded = plain or cfg.deepspeed == "zero2"
    if cfg.method == "adalora" and unsharded:  # a module AdaLoRA pruned to rank 0 saves (0, n) factors,
        # which PEFT's save takes for ungathered ZeRO-3/FSDP shards; parameters are never sharded here
        zero_rank = r"Adapter '.*': \d+ LoRA tensor\(s\) have invalid shape: [^ ]*:\((0, \d+|\d+, 0)\)"
        warnings.filterwarnings("ignore", message=zero_rank)
    auto_name = cfg.name is None and not resume
    asked = cfg  # as given: on resume only --max-steps may change what run.json holds
    cfg = cfg.resolve(num_processes=state.num_processes)
    if auto_name:  # runs/<method>, or runs/<method>-2, -3, … when taken: never write over a run
        cfg = dataclasses.replace(cfg, name=free_name(Path(cfg.out), cfg.name))
    run_dir = Path(cfg.out) / cfg.name
    resume_from = _check_run_dir(run_dir, resume)
    state.wait_for_everyone()  # every process has read the directory before the main one changes it
    if resume:
        stored = json.loads((run_dir / "run.json").read_text())
        _check_resume_options(asked, stored, run_dir)
        stored["max_steps"] = asked.max_steps or stored["max_steps"]
        cfg = TrainConfig.from_dict({**stored, "out": cfg.out}).resolve(num_processes=state.num_processes)
        if cfg.method == "adalora" and resume_from is not None:
            raise TrainConfigError(
                "--resume: AdaLoRA runs cannot be resumed (PEFT saves the adapter shrunk to its allocated "
                "ranks, which no longer fits the layers or the optimizer state); start a new run"
            )
        if resume_from is not None and _checkpoint_step(resume_from) >= cfg.max_steps:
            raise TrainConfigError(
                f"--resume: {run_dir} already reached step {_checkpoint_step(resume_from)} of its "
                f"{cfg.max_steps}; pass a larger --max-steps to train it further"
            )
    _check_accelerators(cfg)

    model_dir = find_model_dir(cfg.model)
    tokenizer, model = load_model(model_dir, cfg)
    method = get_method(cfg.method)
    torch.manual_seed(cfg.seed)
    model = method.apply(model, cfg)
    base = BaseCheckpoint(model_dir, dtype=next(model.parameters()).dtype)

    organism = cfg.dataset == ORGANISM
    rows = load_rows(cfg.dataset, cfg.dataset_split, cfg.problem_column, cfg.answer_column)
    train_set = build_dataset(rows, tokenizer, organism)
    eval_rows = None
    if cfg.eval_every and cfg.eval_dataset:
        eval_rows = load_rows(cfg.eval_dataset, cfg.eval_split, option="--eval-dataset")[: cfg.eval_problems]

    spectra_callback = SpectraCallback(
        cfg.out, cfg.name, delta_every=cfg.delta_every or 0, monitor_every=cfg.monitor_every,
        on_collapse=cfg.on_collapse, monitor_modules=cfg.monitor_modules,
        base_copy_limit_mb=cfg.base_copy_limit_mb, collapse_rule=collapse_rule(cfg),
    ).attach(model, method, base, run_dir, resume=resume_from is not None)  # fmt: skip
    assert spectra_callback.recorder is not None
    recorder = spectra_callback.recorder
    writer = recorder.writer  # makes no folder until the first write: a run that fails to start leaves none
    banner = (
        f"spectra train: {cfg.method} on {cfg.model} ({len(method.modules(model))} adapted modules), "
        f"{cfg.loss}, {cfg.max_steps} steps of {cfg.batch_size}×{cfg.num_generations} rollouts, "
        f"lr {cfg.lr:g} → {run_dir}"
        + (f" (resumed at step {_checkpoint_step(resume_from)})" if resume_from else "")
    )
    monitor, alarm = spectra_callback.monitor, spectra_callback.alarm
    # the banner first, then step 0's held-out evaluation
    callbacks: list[Any] = [ConsoleLog(cfg.max_steps, banner), *method.callbacks(model, cfg)]
    if eval_rows is not None:
        callbacks.append(
            HeldOutEval(
                writer, model, tokenizer, eval_rows, benchmark=benchmark_name(cfg.eval_dataset),
                every=cfg.eval_every, n=cfg.eval_k, max_new_tokens=cfg.max_completion_length,
                organism=cfg.eval_dataset == ORGANISM, temperature=cfg.temperature, seed=cfg.seed,
                resume=resume_from is not None,
            )
        )  # fmt: skip
    trainer = build_trainer(
        cfg, model, tokenizer, train_set, callbacks, method.optimizer(model, cfg), run_dir
    )
    from transformers.trainer_callback import PrinterCallback

    trainer.remove_callback(PrinterCallback)  # raw log dicts; ConsoleLog prints one short line per step
    # first of all callbacks: its geometry joins the logs reporters (and ConsoleLog) read
    trainer.callback_handler.callbacks.insert(0, spectra_callback)

    # Everything is in place: only now does the run directory change.
    if state.is_main_process:
        if resume:  # what followed the checkpoint belongs to the abandoned trajectory (all, without one)
            truncate_run(run_dir, _checkpoint_step(resume_from) if resume_from else -1)
            write_json(run_dir / "run.json", stored)
        else:
            targets = {"target_modules": method.targets(cfg), "adapted_modules": len(method.modules(model))}
            writer.write_config(
                {**cfg.to_dict(), **targets, "model_path": str(model_dir), "versions": versions()}
            )
    state.wait_for_everyone()
    return Session(
        cfg, run_dir, model, tokenizer, method, base, recorder, trainer, resume_from, monitor, alarm,
        spectra_callback,
    )


# ------------------------------------------------------------------------------------------------ model


def _dtype(cfg: TrainConfig) -> torch.dtype:
    return model_dtype(cfg.precision)


def load_model(model_dir: Path, cfg: TrainConfig) -> tuple[Any, Any]:
    """Tokenizer and causal LM of the run's model (:func:`spectra.train.checkpoint.load_pretrained`)."""
    return load_pretrained(model_dir, _dtype(cfg), f"--model {cfg.model}")


# --------------------------------------------------------------------------------------------- trainer


def grpo_config(cfg: TrainConfig, output_dir: Path):
    """TRL's ``GRPOConfig`` for the configuration (the loss choices are documented in ``config.py``; sapo's
    temperatures and vespo's k, λ are TRL's defaults, cispo's cap on ρ is ``epsilon_high``)."""
    from accelerate import PartialState
    from trl import GRPOConfig

    rollouts = cfg.batch_size * cfg.num_generations // PartialState().num_processes  # per process
    bf16 = _dtype(cfg) == torch.bfloat16
    return GRPOConfig(
        output_dir=str(output_dir),
        per_device_train_batch_size=cfg.micro_batch_size,
        gradient_accumulation_steps=rollouts // cfg.micro_batch_size,
        num_generations=cfg.num_generations,
        max_completion_length=cfg.max_completion_length,
        temperature=cfg.temperature,
        learning_rate=cfg.lr,
        lr_scheduler_type="constant",
        warmup_steps=0,
        weight_decay=0.0,
        max_steps=cfg.max_steps,
        beta=cfg.beta,
        epsilon=cfg.epsilon,
        epsilon_high=cfg.epsilon_high,
        loss_type="grpo" if cfg.loss == "gspo" else cfg.loss,  # GSPO: GRPO's loss on a sequence-level ρ
        importance_sampling_level="sequence" if cfg.loss in ("gspo", "luspo") else "token",
        scale_rewards="none" if cfg.loss == "dr_grpo" else "group",
        mask_truncated_completions=cfg.loss == "dapo",
        reward_weights=[1.0, cfg.format_reward] if cfg.format_reward else None,
        logging_steps=cfg.logging_steps,
        save_strategy="steps",
        save_steps=cfg.save_every,
        save_total_limit=2,
        report_to=list(cfg.report_to) or "none",
        seed=cfg.seed,
        data_seed=cfg.seed,
        bf16=bf16,
        use_cpu=not torch.cuda.is_available(),
        use_vllm=cfg.use_vllm,
        vllm_mode=cfg.vllm_mode,
        **_vllm_server(cfg),
        deepspeed=str(DEEPSPEED_CONFIGS.get(cfg.deepspeed, cfg.deepspeed)) if cfg.deepspeed else None,
        disable_tqdm=True,
        gradient_checkpointing=cfg.gradient_checkpointing,
        dataloader_num_workers=0,
    )


def _vllm_server(cfg: TrainConfig) -> dict[str, Any]:
    """GRPOConfig's address of the ``trl vllm-serve`` server (``--vllm-mode server``); TRL's defaults else."""
    if not (cfg.use_vllm and cfg.vllm_mode == "server"):
        return {}
    out: dict[str, Any] = {"vllm_server_base_url": (cfg.vllm_server_url or VLLM_SERVER_URL).rstrip("/")}
    if cfg.vllm_group_port is not None:
        out["vllm_group_port"] = cfg.vllm_group_port
    return out


def build_trainer(cfg, model, tokenizer, train_set, callbacks, optimizer, run_dir: Path):
    """The GRPOTrainer with the accuracy reward (and the format reward when weighted).

    TRL's trainer with one hook (:mod:`spectra.train.grpo`): rollouts are sampled with the policy in eval
    mode, adapter dropout off, as the studies' vLLM sampling from merged weights; the training forward
    keeps ``--dropout``."""
    from spectra.train.grpo import GRPOTrainer
    from spectra.train.rewards import accuracy_reward, format_reward

    rewards = [accuracy_reward, format_reward] if cfg.format_reward else [accuracy_reward]
    return GRPOTrainer(
        model=model,
        reward_funcs=rewards,
        args=grpo_config(cfg, run_dir / "checkpoints"),
        train_dataset=train_set,
        processing_class=tokenizer,
        callbacks=callbacks,
        optimizers=(optimizer, None),
    )


# ----------------------------------------------------------------------------------- run dir and resume


def _check_run_dir(run_dir: Path, resume: bool) -> Path | None:
    """Refuse to write over a run; on resume, the newest *complete* trainer checkpoint (None: resume from
    step 0). Newer partial checkpoints (a kill during a save) are skipped with a warning; :func:`truncate_run`
    removes them with the rest of the abandoned tail."""
    if not resume:
        if (run_dir / "run.json").exists():
            raise TrainConfigError(
                f"--name: {run_dir} already holds a run; pass --resume to continue it, or another --name"
            )
        return None
    if not (run_dir / "run.json").exists():
        raise TrainConfigError(f"--resume: {run_dir} has no run.json; there is no run to resume")
    checkpoints = _checkpoints(run_dir / "checkpoints")
    newest = next((c for c in reversed(checkpoints) if _complete(c)), None)
    kept = _checkpoint_step(newest) if newest else -1
    partial = [c.name for c in checkpoints if _checkpoint_step(c) > kept]
    if partial:
        warnings.warn(
            f"--resume: {run_dir / 'checkpoints'}: skipped partial checkpoint(s) {', '.join(partial)} "
            f"(interrupted while saving); resuming from {newest.name if newest else 'step 0'}",
            stacklevel=2,
        )
    return newest


def _checkpoints(ckpt_dir: Path) -> list[Path]:
    """The trainer's ``checkpoint-N`` folders, by step."""
    from transformers.trainer_utils import PREFIX_CHECKPOINT_DIR

    if not ckpt_dir.is_dir():
        return []
    name = re.compile(rf"{PREFIX_CHECKPOINT_DIR}-\d+")
    found = [p for p in ckpt_dir.iterdir() if name.fullmatch(p.name) and p.is_dir()]
    return sorted(found, key=_checkpoint_step)


def _complete(checkpoint: Path) -> bool:
    """Whether a trainer checkpoint was saved to the end.

    ``Trainer._save_checkpoint`` (transformers 5) writes, in order and from one process: the model (or
    adapter) weights, the optimizer and scheduler, the grad scaler, the RNG state, and last
    ``trainer_state.json`` (not atomically); only then does it delete older checkpoints (rotation), so a
    kill there leaves the newest one complete. A checkpoint is complete when its ``trainer_state.json``
    parses and holds the folder's step. (Multi-process runs: each process writes its own RNG file before
    that, unsynchronised: a narrow window this rule does not see.)
    """
    from transformers.trainer import TRAINER_STATE_NAME

    try:
        state = json.loads((checkpoint / TRAINER_STATE_NAME).read_text())
    except (OSError, ValueError):
        return False
    return isinstance(state, dict) and state.get("global_step") == _checkpoint_step(checkpoint)


def _checkpoint_step(path: Path) -> int:
    return int(path.name.rsplit("-", 1)[1])


def _check_resume_options(asked: TrainConfig, stored: dict[str, Any], run_dir: Path) -> None:
    """On resume the run keeps its configuration: refuse an option given with another value."""
    defaults = TrainConfig()
    for f in dataclasses.fields(TrainConfig):
        if f.name in ("max_steps", "out", "name", "resolved"):
            continue
        value = getattr(asked, f.name)
        if value != getattr(defaults, f.name) and f.name in stored:
            have = stored[f.name]
            if (list(value) if isinstance(value, tuple) else value) != have:
                option = "--" + f.name.replace("_", "-")
                raise TrainConfigError(
                    f"{option}: {value!r} differs from {have!r} in {run_dir / 'run.json'}; a resumed run "
                    "keeps its configuration (only --max-steps may change)"
                )


def truncate_run(run_dir: Path, step: int) -> None:
    """Remove what a run wrote after ``step``: later delta files, later metrics/eval rows, and later
    trainer checkpoints (partial ones: ``step`` is the newest complete checkpoint's, or -1 without one)."""
    for later in (c for c in _checkpoints(run_dir / "checkpoints") if _checkpoint_step(c) > step):
        shutil.rmtree(later)
    run = load_run(run_dir)
    for later in (s for s in run.steps if s > step):
        run.delta_path(later).unlink(missing_ok=True)
    for name in ("metrics.jsonl", "eval.jsonl"):
        path = run_dir / name
        if not path.exists():
            continue
        rows = read_jsonl(path)
        if rows.empty or "step" not in rows:
            continue
        kept = rows[rows["step"] <= step]
        with atomic_path(path) as tmp:
            Path(tmp).write_text("".join(json.dumps(_clean(r)) + "\n" for r in kept.to_dict("records")))


def _clean(row: dict[str, Any]) -> dict[str, Any]:
    out = {}
    for k, v in row.items():
        if isinstance(v, float) and v != v:  # NaN from a column the row did not have
            continue
        out[k] = v.item() if hasattr(v, "item") else v
    return out


# ------------------------------------------------------------------------------------------------ misc


def _check_launch(num_processes: int) -> None:
    """Warn when ``accelerate launch --cpu --num_processes N`` (N > 1) started one process: its multi-CPU
    launcher is mpirun, and without it accelerate starts the command once (it sets MASTER_ADDR only when
    asked for several processes)."""
    import os

    cpu = os.environ.get("ACCELERATE_USE_CPU", "").lower() in ("1", "true", "yes")
    if cpu and "MASTER_ADDR" in os.environ and num_processes == 1:
        warnings.warn(
            "spectra train: `accelerate launch --cpu` started one process (its multi-CPU launcher is "
            "mpirun); for N processes on the CPU run `torchrun --nproc_per_node N -m spectra.cli.main "
            "train ...` or `accelerate launch --multi_gpu --num_processes N ...`",
            stacklevel=3,
        )


def _check_accelerators(cfg: TrainConfig) -> None:
    import importlib.util

    if cfg.use_vllm:
        if importlib.util.find_spec("vllm") is None:
            raise TrainConfigError(
                "--use-vllm: vllm is not installed; install it with pip install 'spectra-rlvr[gpu]'"
            )
        if not torch.cuda.is_available():
            raise TrainConfigError("--use-vllm: vLLM needs a CUDA GPU and none is visible")
    if cfg.deepspeed:
        if importlib.util.find_spec("deepspeed") is None:
            raise TrainConfigError(
                "--deepspeed: deepspeed is not installed; install it with pip install 'spectra-rlvr[gpu]'"
            )
        if cfg.deepspeed not in DEEPSPEED_CONFIGS and not Path(cfg.deepspeed).is_file():
            raise TrainConfigError(
                f"--deepspeed {cfg.deepspeed}: expected zero2 or the path of a DeepSpeed JSON config"
            )
        if not torch.cuda.is_available():
            raise TrainConfigError("--deepspeed: DeepSpeed training needs a CUDA GPU and none is visible")
