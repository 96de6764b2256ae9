"""Overhead of ΔW recording: the organism trained twice in one process, with and without the recorder.

Both runs use the same configuration and seed (the organism's default LoRA run unless told otherwise);
held-out evaluation is off in both so that only recording differs. Reported:

- ``record_s``: time inside the recorder (ΔW extraction + atomic HDF5 writes) in the recording run, and
  its share of that run's training time (the target is ≤ 3 % at the default interval);
- ``base_s``: the one-off write of ``base/`` (W0 and its reference spectra) at the start;
- the wall-clock training time of both runs (noisy on a shared machine: ±several %).

    python benchmarks/bench_recording.py [--method lora] [--max-steps 60] [--delta-every 10] [--out F]

``--model qwen2-0.5b-random`` trains a Qwen2 with the projection shapes of Qwen2.5-0.5B (hidden 896,
intermediate 4864, 24 layers, 14 heads, 2 KV heads) and random weights on the organism's task, with the
organism's 100-token tokenizer (shape, not skill: 360 M parameters instead of 494 M, the difference being
the embedding). This is the GPU check of issue 3 (steps per second and recording overhead).
"""

from __future__ import annotations

import argparse
import json
import platform
import tempfile
import time
from pathlib import Path

import torch
from spectra.train import TrainConfig
from spectra.train.trainer import prepare


def random_qwen2_05b(path: Path) -> Path:
    """A random-weight Qwen2 with Qwen2.5-0.5B's projection shapes and the organism's tokenizer."""
    from spectra.train.organism import build_organism
    from transformers import AutoTokenizer, Qwen2Config, Qwen2ForCausalLM

    tokenizer = AutoTokenizer.from_pretrained(build_organism())
    config = Qwen2Config(
        vocab_size=len(tokenizer), hidden_size=896, intermediate_size=4864, num_hidden_layers=24,
        num_attention_heads=14, num_key_value_heads=2, max_position_embeddings=512,
        tie_word_embeddings=True, bos_token_id=None, eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
    )  # fmt: skip
    torch.manual_seed(0)
    Qwen2ForCausalLM(config).save_pretrained(path)
    tokenizer.save_pretrained(path)
    return path


def one_run(out: Path, name: str, args: argparse.Namespace, record: bool) -> dict[str, float]:
    real = args.model != "organism"
    cfg = TrainConfig(
        model=args.model, method=args.method, max_steps=args.max_steps, delta_every=args.delta_every,
        eval_every=0, out=str(out), name=name, seed=args.seed, dataset="organism",
        batch_size=8 if real else None, max_completion_length=40 if real else None,
        micro_batch_size=64 if real else None, gradient_checkpointing=False if real else None,
    )  # fmt: skip
    session = prepare(cfg)
    if not record:
        session.trainer.remove_callback(session.recorder)
    t0 = time.perf_counter()
    session.train()
    wall = time.perf_counter() - t0
    summary = json.loads((session.run_dir / "train_summary.json").read_text())
    return {
        "wall_s": wall,
        "train_runtime_s": float(summary["train_runtime"]),
        "record_s": session.recorder.seconds if record else 0.0,
        "base_s": session.recorder.base_seconds if record else 0.0,
        "recorded_steps": len(session.recorder.recorded),
        "steps_per_s": float(summary["train_steps_per_second"]),
    }


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--method", default="lora")
    p.add_argument("--model", default="organism", help="organism, qwen2-0.5b-random, or a model path")
    p.add_argument("--max-steps", type=int, default=60)
    p.add_argument("--delta-every", type=int, default=10)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", type=Path, default=None, help="write the results as JSON here")
    args = p.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        if args.model == "qwen2-0.5b-random":
            args.model = str(random_qwen2_05b(Path(tmp) / "qwen2-0.5b-random"))
        without = one_run(Path(tmp), "without", args, record=False)
        with_rec = one_run(Path(tmp), "with", args, record=True)
    share = with_rec["record_s"] / with_rec["train_runtime_s"]
    wall_diff = (with_rec["train_runtime_s"] - without["train_runtime_s"]) / without["train_runtime_s"]
    result = {
        "date": time.strftime("%Y-%m-%d"),
        "device": torch.cuda.get_device_name()
        if torch.cuda.is_available()
        else platform.processor() or "cpu",
        "threads": torch.get_num_threads(),
        "config": vars(args) | {"out": str(args.out) if args.out else None},
        "with_recording": with_rec,
        "without_recording": without,
        "record_share_of_training": share,
        "training_time_difference": wall_diff,
    }
    w, wo = with_rec, without
    print(
        f"{args.method}, {args.max_steps} steps, ΔW every {args.delta_every}: {w['recorded_steps']} records "
        f"took {w['record_s']:.3f} s = {100 * share:.2f} % of {w['train_runtime_s']:.1f} s training; "
        f"{w['steps_per_s']:.2f} steps/s; base/ {w['base_s']:.2f} s once; without the recorder "
        f"{wo['train_runtime_s']:.1f} s "
        f"({100 * wall_diff:+.1f} %)"
    )
    if args.out:
        args.out.write_text(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
