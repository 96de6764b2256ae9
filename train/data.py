"""Training and held-out data: a hub id, a local jsonl/json/parquet file, or the organism's task.

Every source becomes rows ``{"problem", "answer", "prompt"}``. Columns are found by name: the problem
in the first of ``problem, question, query, prompt`` present, the answer in the first of ``answer,
final_answer, expected_answer, gt_answer, solution`` (``--problem-column``/``--answer-column`` override).
Answers are normalised the way the common math sets store them: a ``solution`` column gives its last
``\\boxed{}``, and GSM8K's ``"… #### 72"`` gives ``72``.

Prompts: the organism uses its own short template; any other model gets :data:`MATH_TEMPLATE`, as a
chat message when its tokenizer has a chat template (TRL's conversational format) and as plain text
otherwise.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from spectra.train.config import ORGANISM, TrainConfigError

from spectra.errors import first_line

MATH_TEMPLATE = "{problem}\nPlease reason step by step, and put your final answer within \\boxed{{}}."
PROBLEM_COLUMNS = ("problem", "question", "query", "prompt")
ANSWER_COLUMNS = ("answer", "final_answer", "expected_answer", "gt_answer", "solution")
FILE_TYPES = {".jsonl": "json", ".json": "json", ".parquet": "parquet"}


def load_rows(
    source: str,
    split: str = "train",
    problem_column: str | None = None,
    answer_column: str | None = None,
    option: str = "--dataset",
    columns_from: str | None = None,
) -> list[dict[str, str]]:
    """``[{"problem", "answer"}, …]`` from ``source`` (see the module docstring); ``option`` names the
    command-line option in errors, and ``columns_from`` what named the columns when not the user (the
    benchmark registry)."""
    if source == ORGANISM:
        from spectra.train.organism import organism_problems

        return [{"problem": r["problem"], "answer": r["answer"]} for r in organism_problems(split)]
    table = _load_table(source, split, option)
    columns = list(table.column_names)
    pcol = _pick(columns, problem_column, PROBLEM_COLUMNS, source, option, "problem", columns_from)
    acol = _pick(columns, answer_column, ANSWER_COLUMNS, source, option, "answer", columns_from)
    rows = []
    for i, r in enumerate(table):
        answer = normalise_answer(r[acol], acol)
        if answer is None:
            raise TrainConfigError(f"{option} {source}: row {i} has no usable answer in column {acol!r}")
        rows.append({"problem": str(r[pcol]), "answer": answer})
    if not rows:
        raise TrainConfigError(f"{option} {source}: split {split!r} has no rows")
    return rows


def _load_table(source: str, split: str, option: str) -> Any:
    import datasets

    datasets.disable_progress_bars()
    path = Path(source).expanduser()
    if path.suffix in FILE_TYPES or path.exists():
        if not path.is_file():
            raise TrainConfigError(
                f"{option} {source}: no such file; expected a .jsonl, .json or .parquet file"
            )
        if path.suffix not in FILE_TYPES:
            raise TrainConfigError(
                f"{option} {source}: unsupported file type; expected .jsonl, .json or .parquet"
            )
        if path.stat().st_size == 0:
            raise TrainConfigError(f"{option} {source}: the file is empty; expected one problem per row")
        try:
            with _quiet_datasets():  # its own log line of the failure would be a second line
                return datasets.load_dataset(FILE_TYPES[path.suffix], data_files=str(path), split="train")
        except Exception as e:
            raise TrainConfigError(
                f"{option} {source}: could not be read as {path.suffix[1:]} ({first_line(_root_cause(e))})"
            ) from None
    name, _, config = source.partition(":")
    try:
        return datasets.load_dataset(name, config or None, split=split)
    except Exception as e:
        hint = ""
        if "Couldn't reach" in str(e) and os.environ.get("HF_HUB_OFFLINE", "0") in ("0", ""):
            hint = "; without network, HF_HUB_OFFLINE=1 reads a copy already in the hub cache at once"
        raise TrainConfigError(
            f"{option} {source}: could not load split {split!r} from the hub ({first_line(e)}){hint}"
        ) from None


@contextmanager
def _quiet_datasets() -> Iterator[None]:
    """The datasets library's logging silenced (it logs a failure before raising it)."""
    logger = logging.getLogger("datasets")
    level = logger.level
    logger.setLevel(logging.CRITICAL + 1)
    try:
        yield
    finally:
        logger.setLevel(level)


def _root_cause(e: BaseException) -> BaseException:
    """The innermost explicit cause of an exception (datasets wraps a parse error in a generic one)."""
    seen = {id(e)}
    while e.__cause__ is not None and id(e.__cause__) not in seen:
        e = e.__cause__
        seen.add(id(e))
    return e


def _pick(
    columns: list[str],
    chosen: str | None,
    candidates: tuple[str, ...],
    source: str,
    option: str,
    what: str,
    columns_from: str | None = None,
) -> str:
    if chosen is not None:
        if chosen not in columns:
            if columns_from:
                raise TrainConfigError(
                    f"{option}: {source} has no column {chosen!r} ({columns_from} {what} column); "
                    f"its columns are {', '.join(columns)}"
                )
            raise TrainConfigError(
                f"--{what}-column {chosen}: not a column of {source}; its columns are {', '.join(columns)}"
            )
        return chosen
    for c in candidates:
        if c in columns:
            return c
    raise TrainConfigError(
        f"{option} {source}: no {what} column; expected one of {', '.join(candidates)} "
        f"(or --{what}-column NAME); found {', '.join(columns)}"
    )


def normalise_answer(value: Any, column: str) -> str | None:
    """The bare ground-truth answer: last ``\\boxed{}`` of a solution, the tail of GSM8K's ``####``."""
    from spectra.train.rewards import last_boxed

    if value is None:
        return None
    text = str(value).strip()
    if "####" in text:
        return text.rsplit("####", 1)[1].strip().replace(",", "")
    if column == "solution" or "\\boxed" in text:
        return last_boxed(text)
    return text or None


def make_prompt(problem: str, tokenizer: Any, organism: bool) -> str | list[dict[str, str]]:
    """The prompt TRL samples from: the organism's template, a chat message, or plain text."""
    if organism:
        from spectra.train.organism import organism_prompt

        return organism_prompt(problem)
    text = MATH_TEMPLATE.format(problem=problem)
    if getattr(tokenizer, "chat_template", None):
        return [{"role": "user", "content": text}]
    return text


def prompt_ids(prompt: str | list[dict[str, str]], tokenizer: Any) -> list[int]:
    """The token ids the model continues, tokenized as TRL tokenizes rollout prompts: chat messages by
    ``apply_chat_template(tokenize=True)`` (the template's own special tokens, nothing added twice),
    plain text by the tokenizer with its special tokens."""
    if isinstance(prompt, str):
        return list(tokenizer(prompt)["input_ids"])
    encoded = tokenizer.apply_chat_template(
        [prompt], tokenize=True, add_generation_prompt=True, return_dict=True
    )
    return list(encoded["input_ids"][0])


def build_dataset(rows: list[dict[str, str]], tokenizer: Any, organism: bool):
    """A ``datasets.Dataset`` with the columns GRPOTrainer and the rewards read: prompt, answer."""
    import datasets

    return datasets.Dataset.from_list(
        [{"prompt": make_prompt(r["problem"], tokenizer, organism), "answer": r["answer"]} for r in rows]
    )
