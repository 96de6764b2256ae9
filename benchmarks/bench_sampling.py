"""Cost of seeded sampling (``spectra.train.eval.sampling.SeededSampling``) against transformers'
own sampling.

spectra draws each completion from its own random stream so that `spectra eval` gives the same samples
whatever ``--limit`` and ``--batch-size`` are. This measures what that costs, side by side in one run:

- **per token** (``B`` rows × ``V`` vocabulary, float32 logits): temperature and top-p warpers, then
  *seeded*: Gumbel noise from one generator per row + argmax, or *global*: softmax + ``torch.multinomial``
  on one generator (what ``generate(do_sample=True)`` does);
- **end to end** on the organism: ``sample_completions`` against ``model.generate(do_sample=True)`` with
  the same prompts, batch, temperature and token budget.

    python benchmarks/bench_sampling.py [--rows 64 256] [--vocab 151936] [--device cpu] [--repeat 5]
"""

from __future__ import annotations

import argparse
import platform
import time

import torch
from spectra.train.eval.sampling import Sampling, SeededSampling, row_seed, sample_completions
from transformers import LogitsProcessorList, TemperatureLogitsWarper, TopPLogitsWarper


def per_token(rows: int, vocab: int, device: torch.device, repeat: int) -> tuple[float, float]:
    """Seconds per token: (seeded, global) on the same logits."""
    logits = torch.randn(rows, vocab, device=device) * 3
    warp = LogitsProcessorList([TemperatureLogitsWarper(0.6), TopPLogitsWarper(0.95)])
    seeded = SeededSampling([row_seed(0, i, 0) for i in range(rows)], device)
    gen = torch.Generator(device=device).manual_seed(0)

    def seeded_step() -> torch.Tensor:
        return seeded(None, warp(None, logits.clone())).argmax(-1)

    def global_step() -> torch.Tensor:
        return torch.multinomial(torch.softmax(warp(None, logits.clone()), -1), 1, generator=gen)

    return _time(seeded_step, device, repeat), _time(global_step, device, repeat)


def end_to_end(device: torch.device, problems: int, n: int, repeat: int) -> tuple[float, float]:
    """Seconds to sample n completions of ``problems`` organism problems: (spectra, generate)."""
    from spectra.train.checkpoint import load_pretrained
    from spectra.train.eval.benchmarks import encode_prompt, get_benchmark, load_problems
    from spectra.train.organism import build_organism

    folder = build_organism()
    tok, model = load_pretrained(folder, torch.float32, str(folder))
    model.to(device).eval()
    bench = get_benchmark("organism")
    ids = [encode_prompt(bench, r["problem"], tok) for r in load_problems(bench, problems)]
    sampling = Sampling(n=n, max_tokens=bench.max_tokens, temperature=1.0, seed=0)

    def spectra_run() -> object:
        return sample_completions(model, tok, ids, sampling)

    def generate_run() -> object:
        enc = tok.pad(
            {"input_ids": [x for x in ids for _ in range(n)]}, padding=True, padding_side="left",
            return_tensors="pt",
        ).to(device)  # fmt: skip
        with torch.no_grad():
            return model.generate(
                **enc, do_sample=True, temperature=1.0, top_p=1.0, top_k=0,
                max_new_tokens=bench.max_tokens, pad_token_id=tok.pad_token_id,
            )  # fmt: skip

    return _time(spectra_run, device, repeat), _time(generate_run, device, repeat)


def _time(fn, device: torch.device, repeat: int) -> float:
    fn()  # warm-up
    times = []
    for _ in range(repeat):
        if device.type == "cuda":
            torch.cuda.synchronize()
        t0 = time.perf_counter()
        fn()
        if device.type == "cuda":
            torch.cuda.synchronize()
        times.append(time.perf_counter() - t0)
    return sorted(times)[len(times) // 2]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--rows", type=int, nargs="+", default=[64, 256])
    ap.add_argument("--vocab", type=int, default=151_936)  # Qwen2.5's
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--repeat", type=int, default=5)
    ap.add_argument("--problems", type=int, default=64)
    ap.add_argument("--n", type=int, default=4)
    args = ap.parse_args()
    device = torch.device(args.device)
    print(f"{platform.processor() or platform.machine()}, torch {torch.__version__}, {device}")
    print("| rows × vocab | seeded (ms/token) | global multinomial (ms/token) | ratio |\n|---|---|---|---|")
    for rows in args.rows:
        s, g = per_token(rows, args.vocab, device, args.repeat)
        print(f"| {rows} × {args.vocab} | {s * 1e3:.1f} | {g * 1e3:.1f} | {s / g:.2f} |")
    s, g = end_to_end(device, args.problems, args.n, args.repeat)
    print(f"\norganism, {args.problems} problems × n={args.n}: sample_completions {s:.2f} s, "
          f"generate(do_sample=True) {g:.2f} s, ratio {s / g:.2f}")  # fmt: skip


if __name__ == "__main__":
    main()
