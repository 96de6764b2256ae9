"""Read an audit target into a :class:`~spectra.train.audit.subject.Subject`: the only file I/O of the audit.

A target is one of

- a **run directory** (``run.json``): spectra's own or an imported one; ΔW from its delta files against
  its W0, the request from run.json, the log from metrics.jsonl;
- a **PEFT adapter folder** (``adapter_config.json``), a **trainer checkpoint** holding one
  (``checkpoint-N/``, possibly with the full model's weights beside it), or a **folder of checkpoints**
  (the last one is audited, the first one tells what changed between them; a final adapter saved in the
  folder itself beside its checkpoints is the last one, and the checkpoints' logs are read); ΔW through
  ``spectra import``'s adapter reader against BASE (``--base``, else the adapter's
  ``base_model_name_or_path`` found locally). The request comes from ``--method``/``--targets``, else a
  trainer's configuration saved beside the checkpoint (:data:`ASKED_FILES`, here or one folder up),
  else the adapter's own configuration; the log from ``trainer_state.json``.
"""

from __future__ import annotations

import json
import math
import shlex
from collections.abc import Iterator, Sequence
from dataclasses import replace
from pathlib import Path
from typing import Any

import torch
from spectra.train.audit.subject import Asked, ModuleState, Subject, dense_of, module_state
from spectra.train.checkpoint import BaseCheckpoint
from spectra.train.importing.adapter_file import PREFIX
from spectra.train.importing.adapters import CONFIG, AdapterUpdate, read_adapter
from spectra.train.importing.errors import SourceError
from spectra.train.importing.sources import CHECKPOINT, checkpoints, final_step, kind_of, weights_folder
from spectra.train.importing.tuners import REBUILT
from spectra.train.importing.weights import ModelFiles, resolve_local
from torch import Tensor

from spectra.errors import SpectraError, first_line
from spectra.operators import DoRA, LowRank, Record, Scaled

EXPECTED = (
    "a run directory (run.json), a trainer checkpoint folder (checkpoint-N/ holding a PEFT adapter, or a "
    "folder of them) or a PEFT adapter folder (adapter_config.json)"
)
#: Files a trainer's configuration is read from, beside the checkpoint or one folder up (JSON or YAML).
ASKED_FILES = (
    "run.json", "training_args.json", "trainer_config.json", "args.json", "config.yaml", "config.yml",
    "training_args.yaml", "train_config.yaml",
)  # fmt: skip
_FULL_WEIGHTS = ("model.safetensors", "model.safetensors.index.json")


def load_subject(
    path: str | Path, base: str | None = None, method: str | None = None, targets: list[str] | None = None
) -> Subject:
    """The :class:`Subject` of ``path`` (module docstring); a folder that is none of the three kinds, or
    an adapter whose base cannot be found, is a one-line :class:`SourceError`."""
    folder = Path(path).expanduser()
    if not folder.is_dir():
        what = "no such folder" if not folder.exists() else "not a folder"
        raise SourceError(f"spectra audit {path}: {what}; expected {EXPECTED}")
    if (folder / "run.json").is_file():
        subject = _from_run(folder)
    elif kind_of(folder) == "adapter" and not checkpoints(folder):
        subject = _from_adapters(folder, [folder], base)
    elif checkpoints(folder):
        inner = [(n, weights_folder(c)) for n, c in checkpoints(folder)]
        adapters = [(n, f) for n, f in inner if f is not None and kind_of(f) == "adapter"]
        if adapters and kind_of(folder) == "adapter":  # the final adapter, saved beside its checkpoints
            step = final_step(folder, adapters[-1][0])
            adapters = (
                [*adapters, (step, folder)]
                if step is not None
                else [*adapters[:-1], (adapters[-1][0], folder)]
            )
        elif kind_of(folder) == "adapter":
            adapters = [(None, folder)]
        if not adapters:
            raise SourceError(
                f"{folder}: its checkpoints hold no PEFT adapter (full weights): import them with "
                f"`spectra import BASE {shlex.quote(str(folder))}` and audit that run"
            )
        steps = [n for n, _ in adapters if n is not None]
        subject = _from_adapters(
            folder, [f for _, f in adapters], base, steps=steps, logs_in=[c for _, c in checkpoints(folder)]
        )
    else:
        inside = [c for c in sorted(folder.iterdir()) if c.is_dir() and kind_of(c) == "adapter"]
        if kind_of(folder) == "model" and inside:
            subject = _from_adapters(folder, inside[:1], base, full=folder)
        elif kind_of(folder) == "model":
            raise SourceError(
                f"{folder}: a model folder with no PEFT adapter; audit an adapter, a checkpoint or a run "
                f"(import full weights with `spectra import BASE {shlex.quote(str(folder))}` first)"
            )
        else:
            raise SourceError(f"{folder}: nothing spectra audit reads; expected {EXPECTED}")
    if method or targets:
        subject.asked = replace(
            subject.asked,
            source=" and ".join(o for o, v in (("--method", method), ("--targets", targets)) if v),
            method=normalise_method(method, {}) if method else subject.asked.method,
            targets=list(targets) if targets else subject.asked.targets,
        )
    return subject


# ------------------------------------------------------------------------------------------------ runs


def _from_run(folder: Path) -> Subject:
    from spectra import load_run

    run = load_run(folder)
    cfg = run.config
    imported = "imported" in cfg
    subject = Subject(kind="run", path=folder, steps=list(run.steps))
    # SpectraCallback in a user's own script records the run, but the user's trainer samples the rollouts
    subject.spectra_trained = not imported and cfg.get("recorded_by") != "SpectraCallback"
    subject.adapter_config = (
        cfg.get("adapter_config") if isinstance(cfg.get("adapter_config"), dict) else None
    )
    source = "run.json (the imported adapter's own configuration)" if imported else "run.json"
    subject.asked = asked_from(cfg, source)
    if subject.spectra_trained:
        subject.asked.trainer = "spectra"
    subject.found_method = cfg.get("method") if imported else None
    subject.logs = _finite_rows(run.metrics.to_dict("records")) if not run.metrics.empty else []
    subject.log_source = "metrics.jsonl" if subject.logs else None
    steps = [s for s in subject.logs if isinstance(s.get("step"), (int, float))]
    subject.global_step = int(max(r["step"] for r in steps)) if steps else None
    model_path = cfg.get("model_path")
    if isinstance(model_path, str) and Path(model_path).is_dir():
        try:
            subject.base_modules = _linear_modules(ModelFiles(model_path, "BASE"))
        except SourceError as e:
            subject.problems.append(f"base model {model_path}: {e}")
    if not subject.steps:
        subject.problems.append(f"{folder}: no delta files (deltas/step_*.h5); nothing recorded yet")
        return subject
    last, first = subject.steps[-1], subject.steps[0]
    is_adalora = subject.asked.method == "adalora"
    with run.open_delta(last) as d:
        for module in d.modules:
            try:
                op, w0 = run.read_module(d, module)
                earlier = _run_delta(run, first, module) if first != last else None
                mask = _run_masks_full(run, module) if is_adalora and isinstance(op, LowRank) else None
                subject.modules.append(module_state(module, op, w0, earlier, mask))
            except SpectraError as e:
                subject.problems.append(f"module {module}: {e}")
    return subject


def _run_delta(run: Any, step: int, module: str) -> Tensor | None:
    with run.open_delta(step) as d:
        if module not in d.modules:
            return None
        return dense_of(run.read_module(d, module)[0])


def _run_masks_full(run: Any, module: str) -> bool:
    """Whether every recorded step keeps every AdaLoRA singular value of ``module`` (λ ⊙ mask ≠ 0)."""
    for step in run.steps:
        with run.open_delta(step) as d:
            if module not in d.modules:
                continue
            op = run.read_module(d, module)[0]
        if isinstance(op, LowRank) and op.mid is not None and not bool(op.mid.ne(0).all()):
            return False
    return True


# -------------------------------------------------------------------------------- adapters, checkpoints


def _from_adapters(
    target: Path,
    folders: list[Path],
    base: str | None,
    full: Path | None = None,
    steps: list[int] | None = None,
    logs_in: Sequence[Path] = (),
) -> Subject:
    """``folders``: the adapters, in step order (``steps``: their checkpoints' steps); the last is audited.
    ``logs_in``: checkpoint folders whose trainer_state.json may hold the log too."""
    last = folders[-1]
    config = _adapter_config(last)
    base_dir = _base_dir(last, config, base)
    base_files = ModelFiles(base_dir, "BASE")
    ckpt = BaseCheckpoint(base_dir)
    update = read_adapter(last, ckpt)
    first = read_adapter(folders[0], ckpt) if len(folders) > 1 else None
    near = _nearby(target, last)
    near += [p for p in logs_in if p not in near]
    state_file, logs, global_step = _trainer_log(near)
    full = full or _full_weights_beside(last, target)
    is_checkpoint = (
        len(folders) > 1
        or bool(logs_in)
        or state_file is not None
        or full is not None
        or bool(CHECKPOINT.match(last.name))
    )
    subject = Subject(kind="checkpoint" if is_checkpoint else "adapter", path=target)
    subject.adapter_config = update.config
    subject.found_method = update.method
    subject.asked = _asked_near(near) or asked_from(update.config, f"{last / CONFIG} (the adapter's own)")
    subject.logs, subject.global_step = logs, global_step
    subject.log_source = None if state_file is None else str(state_file)
    subject.base_modules = _linear_modules(base_files)
    subject.steps = steps or []
    subject.modules = list(_adapter_states(update, first, ckpt))
    if full is not None:
        subject.frozen_changed, subject.frozen_checked = _frozen_changes(full, base_files, update)
    return subject


def _adapter_config(folder: Path) -> dict[str, Any]:
    try:
        config = json.loads((folder / CONFIG).read_text())
    except (OSError, ValueError) as e:
        raise SourceError(f"{folder / CONFIG}: not readable JSON ({first_line(e)})") from None
    if not isinstance(config, dict):
        raise SourceError(f"{folder / CONFIG}: expected a JSON object (a PEFT adapter config)")
    return config


def _base_dir(folder: Path, config: dict[str, Any], base: str | None) -> Path:
    """BASE: ``--base``, else the adapter's ``base_model_name_or_path`` found locally."""
    if base:
        return resolve_local(base, "--base")
    said = config.get("base_model_name_or_path")
    if not isinstance(said, str) or not said:
        raise SourceError(
            f"{folder / CONFIG}: names no base model (base_model_name_or_path); pass --base PATH"
        )
    try:
        return resolve_local(said, "base model")
    except SourceError:
        raise SourceError(
            f"{folder / CONFIG}: its base model {said!r} is neither a local folder nor in the local hub "
            "cache; pass --base PATH"
        ) from None


def _adapter_states(
    update: AdapterUpdate, first: AdapterUpdate | None, ckpt: BaseCheckpoint
) -> Iterator[ModuleState]:
    masks = _adalora_masks(update.config) if update.method == "adalora" else {}
    for name, op in update.delta.modules.items():
        module, param = update.base_tensors[name]
        w0 = ckpt.get(module, param)
        op = _with_w0(op, w0)
        earlier = None
        if first is not None and name in first.delta.modules:
            earlier = dense_of(_with_w0(first.delta.modules[name], w0))
        mask = None
        if update.method == "adalora" and isinstance(op, LowRank):
            mask = masks.get(name, True) if masks is not None else True
        yield module_state(name, op, w0, earlier, mask)


def _with_w0(op: Record, w0: Tensor) -> Record:
    """The adapter reader's DoRA/IA3 records carry a shape-only W0: give them the real one."""
    if isinstance(op, (DoRA, Scaled)) and op.w0.is_meta:
        return replace(op, w0=w0)
    return op


def _adalora_masks(config: dict[str, Any]) -> dict[str, bool] | None:
    """module → whether AdaLoRA's saved mask keeps every triplet; None when no mask was saved at all
    (``rank_pattern`` absent or null: the allocator never ran)."""
    pattern = config.get("rank_pattern")
    if not isinstance(pattern, dict) or not pattern:
        return None
    out = {}
    for key, mask in pattern.items():
        module = key.removeprefix(PREFIX).split(".lora_E")[0]
        out[module] = isinstance(mask, list) and all(bool(b) for b in mask)
    return out


def _nearby(target: Path, folder: Path) -> list[Path]:
    """The folders a trainer's files are looked for in: the adapter's, its checkpoint's, the target and
    the folder above it (nearest first, no duplicates)."""
    out: list[Path] = []
    for p in (folder, folder.parent, target, target.parent):
        if p not in out and p.is_dir():
            out.append(p)
    return out


def _asked_near(folders: list[Path]) -> Asked | None:
    for folder in folders:
        for name in ASKED_FILES:
            path = folder / name
            if path.is_file():
                try:
                    data = _read_config_file(path)
                except SourceError:  # someone else's file that happens to bear the name: not a request
                    continue
                asked = asked_from(data, str(path))
                if asked.method or asked.targets:
                    return asked
    return None


def _read_config_file(path: Path) -> dict[str, Any]:
    try:
        text = path.read_text()
        if path.suffix in (".yaml", ".yml"):
            import yaml

            data = yaml.safe_load(text)
        else:
            data = json.loads(text)
    except (OSError, ValueError, UnicodeDecodeError) as e:
        raise SourceError(f"{path}: not readable {path.suffix[1:].upper()} ({first_line(e)})") from None
    except Exception as e:  # yaml's own errors
        raise SourceError(f"{path}: not readable YAML ({first_line(e)})") from None
    if not isinstance(data, dict):
        raise SourceError(f"{path}: expected a mapping of options at its top level")
    return data


def _trainer_log(folders: list[Path]) -> tuple[Path | None, list[dict[str, Any]], int | None]:
    """The longest ``log_history`` of a trainer_state.json in ``folders``, and its ``global_step``."""
    best: tuple[Path | None, list[dict[str, Any]], int | None] = (None, [], None)
    for folder in folders:
        path = folder / "trainer_state.json"
        if not path.is_file():
            continue
        try:
            state = json.loads(path.read_text())
            history = [r for r in state.get("log_history", []) if isinstance(r, dict)]
        except (OSError, ValueError, AttributeError) as e:
            raise SourceError(f"{path}: not a readable trainer state ({first_line(e)})") from None
        if best[0] is None or len(history) > len(best[1]):
            step = state.get("global_step")
            best = (path, _finite_rows(history), step if isinstance(step, int) else None)
    return best


def _finite_rows(rows: list[dict[Any, Any]]) -> list[dict[str, Any]]:
    return [
        {str(k): v for k, v in r.items() if not (isinstance(v, float) and not math.isfinite(v))} for r in rows
    ]


def _full_weights_beside(folder: Path, target: Path) -> Path | None:
    """A full model's safetensors saved beside the adapter (in its folder or its checkpoint's)."""
    for p in (folder, folder.parent if folder != target else folder):
        if any((p / name).is_file() for name in _FULL_WEIGHTS) or any(p.glob("model-*.safetensors")):
            return p
    return None


def _frozen_changes(
    full: Path, base: ModelFiles, update: AdapterUpdate
) -> tuple[list[tuple[str, float]], int]:
    """Tensors of the full weights that are not the adapter's and differ from BASE, compared exactly in
    the dtype the checkpoint stores (max |difference|); and how many tensors were compared."""
    files = ModelFiles(full, "checkpoint")
    adapted = {f"{module}.{param}" for module, param in update.base_tensors.values()}
    changed, checked = [], 0
    for name, entry in files.entries.items():
        if entry.file.name == "adapter_model.safetensors" or not entry.floating:
            continue
        plain = name.removeprefix(PREFIX).replace(".base_layer.", ".")
        target = plain if plain in base else (f"model.{plain}" if f"model.{plain}" in base else None)
        if target is None or target in adapted or target.removeprefix("model.") in adapted:
            continue
        new, old = files.get(name), base.get(target)
        checked += 1
        if new.shape != old.shape:
            changed.append((target, math.inf))
            continue
        old = old.to(new.dtype)
        if not torch.equal(new, old):
            changed.append((target, float((new.double() - old.double()).abs().max())))
    return changed, checked


def _linear_modules(files: ModelFiles) -> list[str]:
    """The base model's modules with a 2-D weight (the ones an adapter can target)."""
    return [
        name.removesuffix(".weight")
        for name, e in files.entries.items()
        if name.endswith(".weight") and len(e.shape) == 2 and e.floating
    ]


# -------------------------------------------------------------------------------------- the request


def _flat(data: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    out: dict[str, Any] = {}
    for key, value in data.items():
        name = f"{prefix}{key}"
        if isinstance(value, dict):
            out.update(_flat(value, name + "."))
        else:
            out[name] = value
    return out


def _pick(flat: dict[str, Any], *names: str) -> Any:
    """The value of the shallowest key whose last component (or dotted tail) is one of ``names``."""
    for key in sorted(flat, key=lambda k: k.count(".")):
        if any(key == n or key.endswith("." + n) for n in names) and flat[key] is not None:
            return flat[key]
    return None


def normalise_method(value: Any, flat: dict[str, Any]) -> str | None:
    """A method as spectra names it (:data:`~spectra.train.audit.subject.FORMS`) from a configuration's
    method or PEFT type, its ``use_dora``/``use_rslora`` and ``init_lora_weights``."""
    if not isinstance(value, str) or not value.strip():
        return None
    v = value.strip().lower().replace("-", "").replace("_", "")
    v = {"fullft": "full", "fullfinetuning": "full", "fft": "full", "layernorm": "lntuning"}.get(v, v)
    if v == "lora":
        init = _pick(flat, "init_lora_weights")
        init = init.lower() if isinstance(init, str) else ""
        if _pick(flat, "use_dora") is True:
            return "dora"
        if init in REBUILT:
            return init
        if _pick(flat, "use_rslora") is True:
            return "rslora"
    return v


def asked_from(config: dict[str, Any], source: str) -> Asked:
    """What a configuration (run.json, a trainer's args, an adapter config) asks for."""
    flat = _flat(config)
    method = normalise_method(_pick(flat, "method", "peft_type", "peft_method", "peft.type"), flat)
    targets = _pick(flat, "target_modules", "lora_target_modules")
    if isinstance(targets, (list, tuple)):
        targets = [str(t) for t in targets]
    elif not isinstance(targets, str):
        targets = None
    dropout = _pick(flat, "lora_dropout", "dropout")
    trainer = _pick(flat, "trainer", "trainer_type", "trainer_class", "algorithm")
    return Asked(
        source=source if (method or targets) else None,
        method=method,
        targets=targets,
        dropout=float(dropout)
        if isinstance(dropout, (int, float)) and not isinstance(dropout, bool)
        else None,
        trainer=str(trainer) if trainer is not None else None,
    )
