"""Write an imported run: one ordinary run directory, complete or not there at all.

The run is built in a hidden temporary folder beside its destination (``out/.<name>.import-*``) and
renamed into place only when every step is written, so a kill leaves nothing that ``spectra analyze``
takes for a run. ``run.json`` keeps the import's identity (BASE, each snapshot's folder, step and the
size and modification time of its weight files): importing the same thing again is a no-op, and a
different import into an existing name is refused.

W0 is never copied: ``base/pointer.json`` names BASE's safetensors files and, per record, the tensor.
"""

from __future__ import annotations

import glob
import json
import math
import shutil
import tempfile
import warnings
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import Any

from spectra.train.importing.errors import SourceError
from spectra.train.importing.pair import pair_records, pair_updates, plan_pair
from spectra.train.importing.sources import Snapshot, Sources, find_snapshots
from spectra.train.importing.weights import ModelFiles, resolve_local

from spectra import RunWriter, __version__
from spectra.h5io import write_json

Progress = Callable[[int, int, str], None]


class SourceWarning(UserWarning):
    """Something an import could not take as given (tensors in one model only, a foreign adapter base)."""


def import_run(
    base: str,
    sources: Sequence[str],
    out: str | Path = "runs",
    name: str | None = None,
    *,
    step: int | None = None,
    strict: bool = False,
    progress: Progress | None = None,
) -> Path:
    """Import ``sources`` against ``base`` into ``out/name`` and return the run directory (module
    docstring). ``step``: the step of a model or adapter SOURCE (default 1); ``strict``: tensors present
    in one model only are an error instead of a warning."""
    if not sources:
        raise SourceError("spectra import: give at least one SOURCE after BASE")
    if step is not None and step < 0:
        raise SourceError(f"--step {step}: expected a step ≥ 0")
    if name is not None:
        _check_name(name)
    if Path(out).exists() and not Path(out).is_dir():
        raise SourceError(f"--out {out}: not a folder; expected the folder the run directory is written in")
    base_dir = resolve_local(base, "BASE")
    base_files = ModelFiles(base_dir, "BASE")
    found = find_snapshots(sources, step)
    if not found.snapshots:
        reasons = "; ".join(f"{p}: {r}" for p, r in found.skipped[:3])
        raise SourceError(f"SOURCE {' '.join(sources)}: nothing to import ({reasons or 'no snapshots'})")
    for path, reason in found.skipped:
        warnings.warn(f"{path}: skipped: {reason}", SourceWarning, stacklevel=2)
    target = run_dir_of(out, sources, name)
    name = target.name
    identity = _identity(base_dir, found)
    if target.exists():
        _check_existing(target, identity)
        return target

    Path(out).mkdir(parents=True, exist_ok=True)
    for stale in Path(out).glob(f".{glob.escape(name)}.import-*"):  # what a killed import of this name left
        shutil.rmtree(stale, ignore_errors=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{name}.import-", dir=out))
    try:
        _write(RunWriter(tmp), name, base, base_dir, base_files, found, identity, strict, progress)
        tmp.rename(target)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return target


def _write(
    writer: RunWriter,
    name: str,
    base: str,
    base_dir: Path,
    base_files: ModelFiles,
    found: Sources,
    identity: dict[str, Any],
    strict: bool,
    progress: Progress | None,
) -> None:
    records: dict[str, str] = {}  # record → BASE tensor name, over every step
    steps: list[int] = []
    skipped = list(found.skipped)
    methods: dict[str, Any] = {}
    for snap in found.snapshots:
        try:
            if snap.kind == "model":
                _same_method("full", methods.get("method"), snap)
                recs = _write_model_step(writer, snap, base_files, strict, progress)
                methods.setdefault("method", "full")
            else:
                recs, info = _write_adapter_step(
                    writer, snap, base_dir, base, progress, methods.get("method")
                )
                for key, value in info.items():
                    methods.setdefault(key, value)
        except SourceError as e:
            if len(found.snapshots) == 1:
                raise
            skipped.append((str(snap.path), str(e)))
            warnings.warn(f"{snap.origin}: skipped: {e}", SourceWarning, stacklevel=2)
            continue
        records.update(recs)
        steps.append(snap.step)
    if not steps:
        raise SourceError(f"nothing could be imported: {skipped[0][0]}: {skipped[0][1]}")
    files = sorted({str(base_files.entries[t].file) for t in records.values()})
    writer.write_base_pointer(files, records)
    n_logged = _write_log(writer, found.trainer_state)
    writer.write_config(
        {
            "name": name,
            "model": base,
            "model_path": str(base_dir.resolve()),
            **methods,
            "imported": {
                **identity,
                "steps": steps,
                "skipped": [{"path": p, "reason": r} for p, r in skipped],
                "trainer_state": None if found.trainer_state is None else str(found.trainer_state),
                "logged_rows": n_logged,
            },
            "spectra_version": __version__,
        }
    )


def _write_model_step(
    writer: RunWriter, snap: Snapshot, base: ModelFiles, strict: bool, progress: Progress | None
) -> dict[str, str]:
    other = ModelFiles(snap.path, "SOURCE")
    plan = plan_pair(base, other)
    one_side = [f"{n} (BASE only)" for n in plan.only_base] + [f"{n} (SOURCE only)" for n in plan.only_other]
    if one_side:
        text = f"{snap.path}: {len(one_side)} tensors are in one model only: {', '.join(one_side[:5])}"
        if strict:
            raise SourceError(text + " (--strict)")
        warnings.warn(text, SourceWarning, stacklevel=3)
    total = len(plan.tensors)

    def counted() -> Iterator:
        for i, item in enumerate(pair_updates(plan, base, other), 1):
            if progress is not None:
                progress(i, total, f"step {snap.step}")
            yield item

    writer.write_delta(snap.step, counted())
    return pair_records(plan, base)


def _write_adapter_step(
    writer: RunWriter,
    snap: Snapshot,
    base_dir: Path,
    base: str,
    progress: Progress | None,
    method: str | None = None,
) -> tuple[dict[str, str], dict[str, Any]]:
    """``method``: the method of the run's earlier steps (an adapter of another one is refused)."""
    from spectra.train.checkpoint import BaseCheckpoint
    from spectra.train.importing.adapters import read_adapter

    ckpt = BaseCheckpoint(base_dir)
    said = _declared_base(snap.path)
    foreign = bool(said) and not _same_model(said, base, base_dir)
    try:
        update = read_adapter(snap.path, ckpt)
    except SourceError as e:  # e.g. shapes that do not fit: say which base the adapter was trained on
        if foreign:
            raise SourceError(f"{e} (the adapter was trained on {said!r}, not on BASE {base!r})") from None
        raise
    _same_method(update.method, method, snap)
    if foreign:
        warnings.warn(
            f"{snap.path}: adapter was trained on {said!r}, imported against BASE {base!r}",
            SourceWarning,
            stacklevel=3,
        )
    writer.write_delta(snap.step, update.delta.modules, update.delta.shared)
    if progress is not None:
        progress(1, 1, f"step {snap.step}")
    records = {rec: ckpt.tensor_name(module, param) for rec, (module, param) in update.base_tensors.items()}
    cfg = update.config
    info = {
        "method": update.method,
        "rank": cfg.get("r") if isinstance(cfg.get("r"), int) else cfg.get("target_r"),
        "alpha": cfg.get("lora_alpha"),
        "dropout": cfg.get("lora_dropout"),
        "target_modules": cfg.get("target_modules"),
        "peft_type": cfg.get("peft_type"),
        "adapter_config": cfg,
    }
    return records, {k: v for k, v in info.items() if v is not None}


def _same_method(found: str, earlier: str | None, snap: Snapshot) -> None:
    """One run, one method: run.json names a single method for every step (SourceError otherwise)."""
    if earlier is not None and found != earlier:
        raise SourceError(
            f"{snap.path}: its update is {found}, but the run's earlier steps are {earlier}; "
            "a run holds one method: import it under another --name"
        )


def _declared_base(folder: Path) -> str | None:
    """The adapter config's ``base_model_name_or_path`` (None if absent or unreadable: read_adapter says
    what is wrong with the config)."""
    try:
        said = json.loads((folder / "adapter_config.json").read_text()).get("base_model_name_or_path")
    except (OSError, ValueError, AttributeError):
        return None
    return said if isinstance(said, str) and said else None


def _same_model(said: str, base: str, base_dir: Path) -> bool:
    said_path = Path(said).expanduser()
    if said_path.exists():
        return said_path.resolve() == base_dir.resolve()
    return said.rstrip("/") in (base.rstrip("/"), base_dir.name) or base_dir.match(
        f"*{said.replace('/', '--')}*"
    )


def _write_log(writer: RunWriter, trainer_state: Path | None) -> int:
    """``log_history`` of a trainer_state.json as metrics.jsonl rows (TRL's ``reward`` keeps its name, so
    the report draws it); the closing summary row goes to train_summary.json. Returns rows written."""
    if trainer_state is None:
        return 0
    try:
        history = json.loads(trainer_state.read_text()).get("log_history", [])
    except (OSError, ValueError, AttributeError) as e:
        warnings.warn(
            f"{trainer_state}: unreadable, no training log imported ({e})", SourceWarning, stacklevel=3
        )
        return 0
    n = 0
    for entry in history if isinstance(history, list) else []:
        if not isinstance(entry, dict) or not isinstance(entry.get("step"), int):
            continue
        row = {k: None if isinstance(v, float) and not math.isfinite(v) else v for k, v in entry.items()}
        if "train_runtime" in row:
            write_json(writer.path / "train_summary.json", row)
            continue
        writer.append_metrics(row)
        n += 1
    return n


def _identity(base_dir: Path, found: Sources) -> dict[str, Any]:
    """What makes two imports the same: BASE and each snapshot's folder, step and weight files."""

    def files(folder: Path) -> list[list[Any]]:
        return [
            [p.name, p.stat().st_size, p.stat().st_mtime_ns]
            for p in sorted(folder.iterdir())
            if p.suffix in (".safetensors", ".json") and p.is_file()
        ]

    return {
        "base": str(base_dir.resolve()),
        "snapshots": [
            {
                "step": s.step,
                "path": str(s.path.resolve()),
                "kind": s.kind,
                "origin": s.origin,
                "files": files(s.path),
            }
            for s in found.snapshots
        ],
    }


def _check_existing(target: Path, identity: dict[str, Any]) -> None:
    try:
        old = json.loads((target / "run.json").read_text()).get("imported", {})
    except (OSError, ValueError, AttributeError):
        old = {}
    same = {k: old.get(k) for k in ("base", "snapshots")} == identity
    if not same:
        raise SourceError(
            f"{target}: already holds another run; choose another --name or remove that folder first"
        )


def _check_name(name: str) -> str:
    """``name`` if it is a plain, visible folder name (SourceError otherwise)."""
    if not name or name in (".", "..") or "/" in name or "\\" in name or name.startswith("."):
        raise SourceError(f"--name {name!r}: expected a plain folder name (no '/', not starting with '.')")
    return name


def run_dir_of(out: str | Path, sources: Sequence[str], name: str | None = None) -> Path:
    """Where an import of ``sources`` goes: ``out/name``, by default named after the last SOURCE."""
    return Path(out) / _check_name(name or Path(sources[-1].rstrip("/")).name or "imported")
