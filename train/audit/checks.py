"""The audit's checks: one pure function of a :class:`~spectra.train.audit.subject.Subject` each,
returning its findings (:data:`CHECKS` lists them in the order the report runs them).

Each answers one way an adapter can train without learning what was asked: another method than the one
asked; other modules than the ones asked; adapters that are dead (α 0, B still 0, ΔW exactly 0, nothing
changed between records); no learning signal in the log (every advantage 0); AdaLoRA's rank budget never
reallocated; frozen weights that moved; an update lost when stored in bf16; rollouts sampled with adapter
dropout on; outlier modules.
"""

from __future__ import annotations

import math
import re
import statistics
from collections.abc import Callable
from typing import Any

from spectra.train.audit.findings import Finding
from spectra.train.audit.subject import FORMS, ModuleState, Subject
from spectra.train.live_checks import ZERO_STD

#: A module whose ‖ΔW‖_F/‖W0‖_F exceeds this multiple of its projection kind's median is an outlier.
OUTLIER_RATIO = 20.0
#: Fewest modules of one projection kind for a median to compare against.
OUTLIER_MIN_KIND = 3
#: Share of its changed entries lost in bf16 at or above which a module's update is mostly lost.
BF16_MOSTLY_LOST = 0.9
CLIPPED = "completions/clipped_ratio"
REWARD_STD = "reward_std"
_GRPO_LIKE = ("grpo", "rloo", "dapo", "gspo")


def _names(modules: list[ModuleState]) -> tuple[str, ...]:
    return tuple(m.name for m in modules)


def _of(part: list[Any], whole: list[Any]) -> str:
    return f"{len(part)} of {len(whole)}"


def check_method(s: Subject) -> list[Finding]:
    """The method asked against the one found: the adapter's own type and parameter names (an adapter),
    or the stored form of the records (a run): asked DoRA and no magnitude vectors is an error."""
    asked = s.asked.method
    if asked is None:
        return [
            Finding(
                "info",
                "method",
                "no method asked was found (run.json, a trainer config beside the "
                "checkpoint, or --method): the method trained is not checked against a request",
            )
        ]
    if s.found_method is not None and s.found_method == asked:
        return []
    want = FORMS.get(asked)
    if want is None:
        return [
            Finding(
                "info",
                "method",
                f"method {asked!r} ({s.asked.source}) is not one spectra knows; "
                f"found {s.found_method or 'records of forms ' + _forms(s)}",
            )
        ]
    forms = {m.form for m in s.modules}
    found = s.found_method or f"records of form {_forms(s)}"
    if s.modules and want not in forms:
        hint = ""
        if asked == "dora":
            hint = ": no DoRA magnitude vectors (lora_magnitude_vector), so plain LoRA was trained"
        elif asked == "adalora":
            hint = ": no AdaLoRA singular values (lora_E)"
        elif want == "lowrank+B0":
            hint = f": no initial factors B0, A0, so the {asked} initialisation was not applied"
        return [Finding("error", "method", f"asked {asked} ({s.asked.source}) but found {found}{hint}")]
    rs_asked, rs_found = asked == "rslora", s.found_method == "rslora"
    if s.found_method is not None and FORMS.get(s.found_method) == want and rs_asked != rs_found:
        return [
            Finding(
                "error",
                "method",
                f"asked {asked} ({s.asked.source}) but the adapter is "
                f"{s.found_method}: its scale is α/{'√r' if rs_found else 'r'}",
            )
        ]
    return []


def _forms(s: Subject) -> str:
    return "/".join(sorted({m.form for m in s.modules})) or "none"


def _matches(name: str, targets: list[str] | str) -> bool:
    """PEFT's rule: a string is a regular expression the whole name must match; a list holds names
    the module's name equals or ends with (after a dot)."""
    if isinstance(targets, str):
        return re.fullmatch(targets, name) is not None
    return any(name == t or name.endswith("." + t) for t in targets)


def check_targets(s: Subject) -> list[Finding]:
    """Target modules asked against modules adapted: base modules the request matches that carry no
    adapter (error), and adapters on modules it does not match (warning)."""
    targets = s.asked.targets
    method = s.found_method or s.asked.method
    if targets is None or s.base_modules is None:
        why = "no target_modules asked" if targets is None else "the base model's module list is unavailable"
        return [Finding("info", "targets", f"targets not checked: {why}")]
    if targets == "all-linear" or method in ("full", "lntuning") or (method or "").startswith("peft:"):
        return []
    adapted = {m.name for m in s.modules if m.form not in ("vector", "dense")}
    matching = {n for n in s.base_modules if _matches(n, targets)}
    shown = targets if isinstance(targets, str) else ",".join(targets)
    out = []
    missing = sorted(matching - adapted)
    layered = bool((s.adapter_config or {}).get("layers_to_transform"))
    if missing and not layered:
        out.append(
            Finding(
                "error",
                "targets",
                f"{_of(missing, sorted(matching))} modules matching target_modules "
                f"{shown} ({s.asked.source}) have no adapter",
                tuple(missing),
            )
        )
    extra = sorted(adapted - matching)
    if extra:
        out.append(
            Finding(
                "warning",
                "targets",
                f"{len(extra)} adapted modules are not matched by target_modules {shown} ({s.asked.source})",
                tuple(extra),
            )
        )
    return out


_INITIAL = {
    "lowrank": "lora_B is still exactly 0, its initial value",
    "dora": "lora_B is still exactly 0, its initial value",
    "lowrank+mid": "AdaLoRA's λ (lora_E) is still exactly 0, its initial value",
    "lowrank+row": "VeRA's λ_b is still exactly 0, its initial value",
    "scaled": "IA3's l is still exactly 1, its initial value",
}


def check_dead(s: Subject) -> list[Finding]:
    """Dead adapters: scale 0 (lora_alpha 0), the factor that starts at a fixed value still there (B = 0),
    ΔW exactly 0, or an update identical at the first and last record (no gradient reached it). Under full
    fine-tuning, some tensors exactly unchanged is a warning (frozen on purpose, or changes below the
    stored precision); all of them is still an error."""
    if not s.modules:
        if s.problems:
            return []
        return [Finding("error", "dead", "no adapted module found: nothing was recorded or saved")]
    when = f" after {s.global_step} steps" if s.global_step else ""
    scale0 = [m for m in s.modules if m.scale == 0]
    out = []
    if scale0:
        out.append(
            Finding(
                "error",
                "dead",
                f"{_of(scale0, s.modules)} adapted modules have scale 0 (lora_alpha "
                "0): ΔW = s·B·A is 0 whatever B and A learn; set lora_alpha > 0",
                _names(scale0),
            )
        )
    dead = {m.name for m in scale0}
    for form, text in _INITIAL.items():
        initial = [m for m in s.modules if m.initial and m.form == form and m.name not in dead]
        if initial:
            out.append(
                Finding(
                    "error",
                    "dead",
                    f"{_of(initial, s.modules)} adapted modules: {text}{when}; no "
                    "gradient reached it (learning rate 0, adapter parameters not in the optimizer, or "
                    "no learning signal)",
                    _names(initial),
                )
            )
            dead |= set(_names(initial))
    zero = [m for m in s.modules if m.zero and m.name not in dead]
    if zero:
        # full fine-tuning: some tensors left exactly unchanged are frozen on purpose, or moved less than
        # their stored precision (a bf16 norm weight near 1 under a small learning rate): worth a look
        partial_full = "full" in (s.found_method, s.asked.method) and len(zero) < len(s.modules)
        out.append(
            Finding(
                "warning" if partial_full else "error",
                "dead",
                f"{_of(zero, s.modules)} {'tensors' if partial_full else 'adapted modules'} have ΔW exactly "
                f"0{when}"
                + (": frozen, or every change was below their stored precision" if partial_full else ""),
                _names(zero),
            )
        )
        dead |= set(_names(zero))
    still = [m for m in s.modules if m.unchanged and m.name not in dead]
    if still:
        first, last = (s.steps[0], s.steps[-1]) if len(s.steps) > 1 else ("first", "last")
        out.append(
            Finding(
                "warning",
                "dead",
                f"{_of(still, s.modules)} adapted modules have the same ΔW at "
                f"step {first} and {last}: their parameters received no gradient in between",
                _names(still),
            )
        )
    return out


def _values(logs: list[dict[str, Any]], key: str) -> list[float]:
    return [
        float(r[key]) for r in logs if isinstance(r.get(key), (int, float)) and not isinstance(r[key], bool)
    ]


def check_learning_signal(s: Subject) -> list[Finding]:
    """No learning signal: rewards identical within every group at every logged step (TRL's
    ``frac_reward_zero_std`` = 1, or ``reward_std`` = 0), so every advantage is 0; with what to change."""
    if not s.logs:
        return [
            Finding(
                "info",
                "learning_signal",
                "no training log (metrics.jsonl or trainer_state.json): learning signal not checked",
            )
        ]
    zero_std, std = _values(s.logs, ZERO_STD), _values(s.logs, REWARD_STD)
    clipped, rewards = _values(s.logs, CLIPPED), _values(s.logs, "reward")
    all_clipped = bool(clipped) and all(c >= 1 for c in clipped)
    if zero_std and all(v >= 1 for v in zero_std):
        seen = f"{ZERO_STD} = 1 at all {len(zero_std)} logged steps"
    elif not zero_std and std and all(v == 0 for v in std):
        seen = f"{REWARD_STD} = 0 at all {len(std)} logged steps"
    else:
        if all_clipped:
            return [
                Finding(
                    "warning",
                    "learning_signal",
                    f"{CLIPPED} = 1 at all {len(clipped)} logged steps: "
                    "every completion was cut at max_completion_length; raise it",
                )
            ]
        return []
    mean_clipped = sum(clipped) / len(clipped) if clipped else 0.0
    if all_clipped:
        fix = f"every completion was cut at max_completion_length ({CLIPPED} = 1): raise it"
    elif rewards and max(rewards) == 0 and mean_clipped >= 0.5:
        fix = (
            f"every reward is 0 and {mean_clipped:.0%} of the completions were cut at max_completion_length "
            f"({CLIPPED}): raise it first; else the task is too hard for the model"
        )
    elif rewards and max(rewards) == 0:
        fix = "every reward is 0: the task is too hard for the model (or its answers are not parsed)"
    elif rewards and min(rewards) == max(rewards):
        fix = f"every reward is {rewards[0]:g}: the task is too easy (or too hard) for the model"
    else:
        fix = "make the task fit the model (too hard or too easy), or sample more or hotter rollouts"
    return [
        Finding(
            "error",
            "learning_signal",
            f"no learning signal: {seen} ({s.log_source}); every group's "
            f"rewards were identical, so every advantage is 0; {fix}",
        )
    ]


def check_adalora(s: Subject) -> list[Finding]:
    """AdaLoRA's rank budget never reallocated: every module keeps every triplet (rank_pattern absent or
    all True; λ ≠ 0 at full initial rank at every record): ``update_and_allocate`` never ran."""
    if "adalora" not in (s.found_method, s.asked.method):
        return []
    ada = [m for m in s.modules if m.mask_full is not None]
    full = [m for m in ada if m.mask_full]
    if not ada or len(full) < len(ada):
        return []
    cfg = s.adapter_config or {}
    tinit = cfg.get("tinit")
    if isinstance(tinit, int) and s.global_step is not None and s.global_step <= tinit:
        return [
            Finding(
                "warning",
                "adalora",
                f"AdaLoRA ranks never reallocated, but training stopped at step "
                f"{s.global_step}, before tinit = {tinit}",
                _names(full),
            )
        ]
    return [
        Finding(
            "error",
            "adalora",
            f"AdaLoRA's rank budget was never reallocated: {_of(full, ada)} modules "
            "keep every initial triplet (rank_pattern absent or all kept); update_and_allocate was never "
            "called (TRL does not call it: call model.base_model.update_and_allocate(global_step) after "
            "each optimizer step, as spectra's trainer does)",
            _names(full),
        )
    ]


def check_frozen(s: Subject) -> list[Finding]:
    """Frozen weights that changed: tensors of the full weights saved beside the adapter, outside it,
    that differ from BASE (compared exactly, in the dtype the checkpoint stores)."""
    if not s.frozen_changed:
        return []
    worst = max(d for _, d in s.frozen_changed)
    return [
        Finding(
            "error",
            "frozen",
            f"{len(s.frozen_changed)} of {s.frozen_checked} frozen tensors outside "
            f"the adapter differ from the base model (max |difference| {worst:.3g}): something besides "
            "the adapter was trained or the base was modified",
            tuple(n for n, _ in s.frozen_changed),
        )
    ]


def check_bf16(s: Subject) -> list[Finding]:
    """Updates lost to storage precision: the share of a module's changed entries where bf16(W0 + ΔW) =
    bf16(W0) (the registry's ``bf16_sparsity`` over the entries ΔW changes: an entry the update leaves
    alone is not lost); 1 for every moved module means a bf16 model changes nothing."""
    moved = [m for m in s.modules if not m.zero and m.bf16_lost is not None and m.form != "vector"]
    if not moved:
        return []
    lost = [m for m in moved if m.bf16_lost >= 1.0]
    if len(lost) == len(moved):
        return [
            Finding(
                "error",
                "bf16",
                f"all {len(moved)} updated modules vanish when the model is stored in "
                "bf16 (bf16_sparsity = 1): it trained, but a bf16 merge changes nothing; train longer or "
                "with a larger learning rate, or merge and save in float32",
                _names(lost),
            )
        ]
    mostly = [m for m in moved if m.bf16_lost >= BF16_MOSTLY_LOST]
    if mostly:
        med = statistics.median(m.bf16_lost for m in mostly)
        return [
            Finding(
                "warning",
                "bf16",
                f"{_of(mostly, moved)} updated modules lose ≥ {BF16_MOSTLY_LOST:.0%} "
                f"of their changed entries when stored in bf16 (median share lost {med:.3f})",
                _names(mostly),
            )
        ]
    return []


def check_dropout(s: Subject) -> list[Finding]:
    """Rollouts sampled with adapter dropout on: dropout > 0 and a GRPO-like trainer (its log or its
    configuration says so) that is not spectra's (spectra turns dropout off for generation)."""
    if s.spectra_trained:
        return []
    cfg = s.adapter_config or {}
    dropout = cfg.get("lora_dropout", s.asked.dropout)
    if not isinstance(dropout, (int, float)) or dropout <= 0:
        return []
    trainer = (s.asked.trainer or "").lower()
    keys = {k for r in s.logs for k in r}
    grpo = (
        ZERO_STD in keys
        or any(k.startswith("completions/") for k in keys)
        or any(g in trainer for g in _GRPO_LIKE)
    )
    if not grpo:
        return []
    return [
        Finding(
            "warning",
            "dropout",
            f"adapter dropout {dropout:g} under a GRPO-like trainer that is not "
            "spectra's: rollouts were likely sampled with dropout on, so the policy that sampled is not "
            "the one trained (sample from merged weights, e.g. vLLM, or set lora_dropout 0)",
        )
    ]


def check_outliers(s: Subject) -> list[Finding]:
    """Modules whose relative update ‖ΔW‖_F/‖W0‖_F is more than :data:`OUTLIER_RATIO` × the median of
    their projection kind (kinds with at least :data:`OUTLIER_MIN_KIND` modules)."""
    kinds: dict[str, list[ModuleState]] = {}
    for m in s.modules:
        if m.form != "vector" and math.isfinite(m.relative):
            kinds.setdefault(m.kind, []).append(m)
    out = []
    for kind, group in kinds.items():
        if len(group) < OUTLIER_MIN_KIND:
            continue
        median = statistics.median(m.relative for m in group)
        if median <= 0:
            continue
        for m in group:
            if m.relative > OUTLIER_RATIO * median:
                out.append(
                    Finding(
                        "warning",
                        "outlier",
                        f"relative update {m.relative:.3g} is "
                        f"{m.relative / median:.0f}× the median {median:.3g} of the {len(group)} "
                        f"{kind} modules",
                        (m.name,),
                    )
                )
    return out


def check_problems(s: Subject) -> list[Finding]:
    """What could not be read (a damaged delta file, a module that does not fit W0), said once each."""
    return [Finding("warning", "unreadable", p) for p in s.problems]


CHECKS: tuple[Callable[[Subject], list[Finding]], ...] = (
    check_problems, check_method, check_targets, check_dead, check_learning_signal, check_adalora,
    check_frozen, check_bf16, check_dropout, check_outliers,
)  # fmt: skip
