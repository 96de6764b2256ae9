"""`TrainConfig`: every option of `spectra train`, in one dataclass that is written to ``run.json``.

Defaults follow the PEFT-under-RLVR benchmark study (rank 32, alpha 64, dropout 0.05, G = 8 rollouts
per prompt, lr 1e-5 constant with no warm-up, β = 0, DAPO loss). Options left at ``None`` are resolved by
:meth:`TrainConfig.resolve`: on a hub or local model they take the study's values; on the embedded model
organism (no ``--model``) they take the organism preset, which is sized for a 2-core CPU and a tiny model
that needs a larger learning rate to move in minutes. ``run.json`` always holds the resolved values.

The three losses map onto TRL's ``GRPOConfig``:

=========  ============================================================================================
``grpo``   ``loss_type="grpo"``: per-sequence length normalisation, group-std reward scaling
``dapo``   ``loss_type="dapo"``: token-level normalisation over the batch, clip-higher ε_high = 0.28,
           truncated completions masked out of the loss (``mask_truncated_completions``)
``dr_grpo`` ``loss_type="dr_grpo"``: a constant normaliser (no length normalisation) and no std scaling
=========  ============================================================================================
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field, fields
from typing import Any, Literal

from spectra.errors import SpectraError
from spectra.names import PROJECTIONS

LOSSES = ("grpo", "dapo", "dr_grpo")
ORGANISM = "organism"
#: Supervised warm-start steps of the default organism (``organism``); ``organism@N`` asks for N steps and
#: ``random-organism`` for none (the same architecture at its random initialisation).
ORGANISM_SFT_STEPS = 600
RANDOM_ORGANISM = "random-organism"
#: ``--report-to`` values and the package each needs (transformers' integrations).
REPORTERS = {"tensorboard": "tensorboard", "wandb": "wandb", "mlflow": "mlflow", "trackio": "trackio"}
#: The registry's method names (spectra.train.methods.METHODS holds one entry for each, in this order).
METHOD_NAMES = (
    "full", "lora", "rslora", "dora", "adalora", "miss", "pissa", "milora",
    "loraplus", "lorafa", "vera", "ia3", "lntuning", "quanta",
)  # fmt: skip
#: What ``spectra demo`` trains: LoRA, a structural variant, an SVD-initialised one, full fine-tuning.
DEMO_METHODS = ("lora", "dora", "pissa", "full")


class TrainConfigError(SpectraError):
    """An option of `spectra train` has a value it cannot take."""


class EvalError(SpectraError):
    """An option of `spectra eval` has a value it cannot take, or what it names does not exist."""


@dataclass
class TrainConfig:
    """The resolved configuration of one RLVR run (all of it goes to ``run.json``)."""

    # what to train
    model: str = ORGANISM  # hub id, local directory, or "organism"
    method: str = "lora"
    dataset: str = ORGANISM  # hub id[:config], a .jsonl/.json/.parquet file, or "organism"
    dataset_split: str = "train"
    problem_column: str | None = None
    answer_column: str | None = None
    eval_dataset: str | None = None  # held-out set for eval.jsonl; the organism's test split by default
    eval_split: str = "test"
    target_modules: tuple[str, ...] = PROJECTIONS

    # adapter
    rank: int = 32
    alpha: float = 64.0
    dropout: float = 0.05
    loraplus_lr_ratio: float = 16.0  # LoRA+: lr(B) / lr(A)
    quanta_d: int = 3  # QuanTA: number of tensor axes
    adalora_init_rank: int | None = None  # AdaLoRA: starting rank (default 1.5 × rank); rank is the target
    vera_rank: int | None = None  # VeRA: rank of the shared random matrices (default: rank)

    # RL
    loss: Literal["grpo", "dapo", "dr_grpo"] = "dapo"
    num_generations: int = 8
    batch_size: int | None = None  # prompts per optimizer step (rollouts = batch_size × num_generations)
    micro_batch_size: int | None = None  # completions per forward/backward pass (gradient accumulation)
    lr: float | None = None
    max_steps: int | None = None
    beta: float = 0.0
    epsilon: float = 0.2
    epsilon_high: float | None = None  # 0.28 for dapo, epsilon otherwise
    temperature: float = 1.0
    max_completion_length: int | None = None
    format_reward: float = 0.0  # weight of the format reward next to the accuracy reward (0: off)

    # recording and evaluation
    delta_every: int | None = None  # write deltas/step_NNNNNN.h5 every N optimizer steps (and at 0 and last)
    eval_every: int | None = None  # held-out Avg@k / Pass@k every N steps (0: off)
    eval_problems: int = 64
    eval_k: int = 4
    save_every: int | None = None  # trainer checkpoint (for --resume) every N steps
    base_copy_limit_mb: float = 512.0  # copy W0 into base/weights.h5 up to this size, else point at the files

    # where and how
    out: str = "runs"
    name: str | None = None  # run directory name (default: <method>)
    seed: int = 0
    precision: Literal["auto", "fp32", "bf16"] = "auto"
    gradient_checkpointing: bool | None = None  # trade compute for memory (study: on; organism: off)
    use_vllm: bool = False
    deepspeed: str | None = None  # "zero2" or a path to a DeepSpeed JSON config
    report_to: tuple[str, ...] = ()  # e.g. ("tensorboard",) or ("wandb",)
    logging_steps: int = 1
    resolved: bool = field(default=False, repr=False)

    # ----------------------------------------------------------------------------------------- presets

    def resolve(self, num_processes: int = 1) -> TrainConfig:
        """A copy with every ``None`` filled in (organism preset or the study's values), checked.

        ``num_processes`` (data-parallel processes) only enters the check that the rollouts of a step
        split evenly over the processes.
        """
        if self.resolved:
            self.check(num_processes)
            return self
        organism = self.model == ORGANISM
        preset = ORGANISM_PRESET if organism else STUDY_PRESET
        values = {
            k: (preset[k] if getattr(self, k) is None and k in preset else getattr(self, k)) for k in _names()
        }
        if organism and self.lr is None:
            values["lr"] = ORGANISM_LR.get(self.method, values["lr"])
        if values["epsilon_high"] is None:
            values["epsilon_high"] = 0.28 if self.loss == "dapo" else self.epsilon
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

        need(self.method in METHOD_NAMES, "method", "one of " + ", ".join(METHOD_NAMES))
        need(self.loss in LOSSES, "loss", "one of " + ", ".join(LOSSES))
        need(self.rank >= 1, "rank", "an integer ≥ 1")
        need(self.alpha > 0, "alpha", "a positive number")
        need(0 <= self.dropout < 1, "dropout", "a probability in [0, 1)")
        need(self.num_generations >= 2, "num-generations", "≥ 2 (GRPO compares rollouts within a group)")
        need(self.batch_size is not None and self.batch_size >= 1, "batch-size", "an integer ≥ 1")
        rollouts = (self.batch_size or 1) * self.num_generations
        need(
            rollouts % num_processes == 0,
            "batch-size",
            f"batch-size × num-generations ({rollouts}) divisible by the {num_processes} processes",
        )
        need(
            self.micro_batch_size is not None
            and self.micro_batch_size >= 1
            and (rollouts // num_processes) % self.micro_batch_size == 0,
            "micro-batch-size",
            f"a divisor of the rollouts per process per step ({rollouts // num_processes})",
        )
        need(self.lr is not None and self.lr > 0, "lr", "a positive learning rate")
        need(self.max_steps is not None and self.max_steps >= 1, "max-steps", "an integer ≥ 1")
        need(self.delta_every is not None and self.delta_every >= 0, "delta-every", "an integer ≥ 0 (0: off)")
        need(self.eval_every is not None and self.eval_every >= 0, "eval-every", "an integer ≥ 0 (0: off)")
        need(self.eval_k >= 1, "eval-k", "an integer ≥ 1")
        need(2 <= self.quanta_d <= 7, "quanta-d", "an integer from 2 to 7")
        need(self.vera_rank is None or self.vera_rank >= 1, "vera-rank", "an integer ≥ 1")
        need(
            self.adalora_init_rank is None or self.adalora_init_rank > self.rank,
            "adalora-init-rank",
            f"more than --rank {self.rank} (AdaLoRA prunes from the starting rank down to --rank)",
        )
        need(self.temperature > 0, "temperature", "a positive sampling temperature (RL samples rollouts)")
        need(self.format_reward >= 0, "format-reward", "a weight ≥ 0")
        need(self.epsilon >= 0, "epsilon", "a clipping range ≥ 0")
        need(
            self.epsilon_high is None or self.epsilon_high >= self.epsilon,
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
        need(
            not (self.deepspeed and self.method in ("lorafa", "loraplus")),
            "deepspeed",
            f"off with --method {self.method} (its PEFT optimizer is not a DeepSpeed optimizer)",
        )
        need(len(self.target_modules) > 0, "target-modules", "at least one module name suffix")
        need(self.precision in ("auto", "fp32", "bf16"), "precision", "auto, fp32 or bf16")
        need(
            self.max_completion_length is not None and self.max_completion_length >= 1,
            "max-completion-length",
            "an integer ≥ 1",
        )

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


def _installed(package: str) -> bool:
    import importlib.util

    return importlib.util.find_spec(package) is not None


def _names() -> list[str]:
    return [f.name for f in fields(TrainConfig)]


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
