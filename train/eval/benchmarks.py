"""The benchmark registry of `spectra eval`: where each math benchmark lives and how it is asked.

A :class:`Benchmark` names its source (a hub dataset id and split, a local file, or the organism), the
columns holding the problem and the answer, the prompt template, and the sampling settings the studies
use for it (overridable on the command line). The registered benchmarks:

=========  ==============================  =====  =================  ==========================
name       hub dataset                     split  columns            problems
=========  ==============================  =====  =================  ==========================
aime24     HuggingFaceH4/aime_2024         train  problem, answer    30 (AIME 2024 I and II)
aime25     math-ai/aime25                  test   problem, answer    30 (AIME 2025 I and II)
amc        AI-MO/aimo-validation-amc       train  problem, answer    83 (AMC 12, 2022 and 2023)
math500    HuggingFaceH4/MATH-500          test   problem, answer    500 (MATH test subset)
hmmt25     MathArena/hmmt_feb_2025         train  problem, answer    30 (HMMT February 2025)
minerva    math-ai/minervamath             test   question, answer   272 (Minerva's OCW set)
organism   built in (the model organism)   test   problem, answer    512 held-out additions
=========  ==============================  =====  =================  ==========================

Anything else given as ``--benchmark`` is a local ``.jsonl``/``.json``/``.parquet`` file or a hub id
(``owner/name[:config]``); its columns are found by name as for training data
(:func:`spectra.train.data.load_rows`), and it gets the ``math`` template and settings. Answers are
normalised the same way everywhere: a ``solution`` column gives its last ``\\boxed{}``, GSM8K's
``"… #### 72"`` gives ``72``, AMC's ``142.0`` compares equal to ``142``.

Templates: ``math`` is the studies' instruction, "{problem}\\nPlease reason step by step, and put your
final answer within \\boxed{}." (as a chat message when the tokenizer has a chat template, else plain
text); ``organism`` is the organism's own short prompt; ``plain`` is the problem alone. A custom
template is any text containing ``{problem}``.

Default sampling: temperature 0.6 and top-p 0.95 (the usual Avg@k setting of the RLVR studies) and
4096 new tokens, enough for the 1.5B models the studies train; long-reasoning models (R1-distilled) need
--max-tokens 32768, and a completion cut off at the limit is counted as ``truncated``. The organism
samples as in training (temperature 1, top-p 1, 40 tokens).
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from spectra.train.config import ORGANISM, ORGANISM_PRESET, EvalError
from spectra.train.data import FILE_TYPES, load_rows, make_prompt, prompt_ids

TEMPLATES = ("math", "organism", "plain")


@dataclass(frozen=True)
class Benchmark:
    """One evaluation set: where its rows come from, how they are asked, and how they are sampled."""

    name: str
    source: str  # hub id ("owner/name[:config]"), a local file, or "organism"
    split: str = "test"
    problem_column: str | None = None  # None: found by name (problem, question, query, prompt)
    answer_column: str | None = None  # None: found by name (answer, final_answer, …, solution)
    template: str = "math"  # a name in TEMPLATES, or text with "{problem}"
    temperature: float = 0.6
    top_p: float = 0.95
    max_tokens: int = 4096
    title: str = ""

    def columns_named_by_registry(self) -> bool:
        """True when the columns are the registry's own (then a missing one is the dataset's fault)."""
        entry = BENCHMARKS.get(self.name)
        return entry is not None and (entry.problem_column, entry.answer_column) == (
            self.problem_column,
            self.answer_column,
        )


BENCHMARKS: dict[str, Benchmark] = {
    b.name: b
    for b in (
        Benchmark("aime24", "HuggingFaceH4/aime_2024", "train", "problem", "answer", title="AIME 2024"),
        Benchmark("aime25", "math-ai/aime25", "test", "problem", "answer", title="AIME 2025"),
        Benchmark("amc", "AI-MO/aimo-validation-amc", "train", "problem", "answer", title="AMC 2022-23"),
        Benchmark("math500", "HuggingFaceH4/MATH-500", "test", "problem", "answer", title="MATH-500"),
        Benchmark("hmmt25", "MathArena/hmmt_feb_2025", "train", "problem", "answer", title="HMMT Feb 2025"),
        Benchmark("minerva", "math-ai/minervamath", "test", "question", "answer", title="Minerva math"),
        Benchmark(
            ORGANISM, ORGANISM, "test", "problem", "answer", template="organism", temperature=1.0,
            top_p=1.0, max_tokens=ORGANISM_PRESET["max_completion_length"], title="model organism (held out)",
        ),
    )
}  # fmt: skip


def get_benchmark(
    name: str,
    split: str | None = None,
    problem_column: str | None = None,
    answer_column: str | None = None,
    template: str | None = None,
) -> Benchmark:
    """The benchmark called ``name`` (case-insensitive), or a local file / hub id read the same way.

    ``split``, the columns and ``template`` override the registry's values."""
    key = benchmark_name(name)
    if key in BENCHMARKS:
        bench = BENCHMARKS[key]
    elif Path(name).suffix in FILE_TYPES or Path(name).expanduser().exists():
        bench = Benchmark(key, str(Path(name).expanduser()), "train")
    elif "/" in name and not name.startswith((".", "/", "~")):
        bench = Benchmark(key, name, "test")
    else:
        raise EvalError(
            f"--benchmark {name}: unknown benchmark; expected one of {', '.join(BENCHMARKS)}, "
            "a .jsonl/.json/.parquet file, or a hub dataset id (owner/name)"
        )
    if template is not None and template not in TEMPLATES and "{problem}" not in template:
        raise EvalError(
            f"--template {template!r}: expected one of {', '.join(TEMPLATES)} "
            "or a text containing {problem}"
        )
    changes: dict[str, Any] = {
        "split": split,
        "problem_column": problem_column,
        "answer_column": answer_column,
        "template": template,
    }
    return dataclasses.replace(bench, **{k: v for k, v in changes.items() if v is not None})


def benchmark_name(source: str) -> str:
    """The name results are filed under (``eval.jsonl``, result files), the same for training's held-out
    evaluations and `spectra eval`: the registry's name for a registered name or hub id, a file's stem,
    else a hub id's last part."""
    key = source.strip()
    for bench in BENCHMARKS.values():
        if key.lower() in (bench.name, bench.source.lower()):
            return bench.name
    if Path(key).suffix in FILE_TYPES:
        return Path(key).stem
    return key.split(":")[0].rstrip("/").rsplit("/", 1)[-1]


def load_problems(bench: Benchmark, limit: int | None = None) -> list[dict[str, str]]:
    """``[{"problem", "answer"}, …]`` of ``bench`` (the first ``limit`` rows when given)."""
    if bench.source == ORGANISM and bench.split not in ("train", "test"):
        raise EvalError(f"--split {bench.split}: the organism has the splits train and test")
    named_by = f"the registry's {bench.name}" if bench.columns_named_by_registry() else None
    rows = load_rows(
        bench.source, bench.split, bench.problem_column, bench.answer_column,
        option=f"--benchmark {bench.name}", columns_from=named_by,
    )  # fmt: skip
    return rows[:limit] if limit else rows


def encode_prompt(bench: Benchmark, problem: str, tokenizer: Any) -> list[int]:
    """The token ids the model continues for ``problem``: the template filled in (through the chat
    template where the ``math`` template meets a chat tokenizer), tokenized as in training."""
    if bench.template == "organism":
        prompt = make_prompt(problem, tokenizer, organism=True)
    elif bench.template == "math":
        prompt = make_prompt(problem, tokenizer, organism=False)
    elif bench.template == "plain":
        prompt = problem
    else:
        prompt = bench.template.replace("{problem}", problem)
    return prompt_ids(prompt, tokenizer)
