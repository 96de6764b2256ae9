"""Peak memory and speed of ``spectra probe maturity``: streamed tensor by tensor against loading the whole
model first.

Writes a Qwen2-class checkpoint (``qwen2_shapes`` divided by ``--scale``, bf16, an embedding of ``--vocab``
rows, split over ``--shards`` safetensors files with an index, as hub models are) and measures, each in a
fresh process (Linux: the peak resident memory VmHWM, reset after the imports, minus the resident memory
then):

- **streamed**: ``probe_maturity`` (file by file, tensor by tensor, batches of same-shape matrices within
  ``--budget-mb`` of float64 work), then the same σ and fits;
- **whole**: every tensor loaded first (``safetensors.torch.load_file`` of each file: the model in memory,
  as ``from_pretrained`` holds it), then the same σ and fits in the same batches.

Prints both peaks, the size of the checkpoint and of the largest batch, seconds and matrices per second,
and checks that both give the same α.

    python benchmarks/bench_maturity.py                 # 1/2 of Qwen2-1.5B shapes, 8 layers
    python benchmarks/bench_maturity.py --scale 2 --budget-mb 512 --device cuda
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

from spectra.synthetic import qwen2_shapes

WORKER = r"""
import json, re, resource, sys, time
from pathlib import Path
import torch
from safetensors.torch import load_file
from spectra.metrics import esd
from spectra.probes import maturity as mat
from spectra.svd import dense_svd

mode, model, out, budget, device = sys.argv[1:6]
def status(key):  # KiB
    return int(re.search(key + r":\s+(\d+)", Path("/proc/self/status").read_text()).group(1))

Path("/proc/self/clear_refs").write_text("5")  # reset the peak (VmHWM) to the current resident memory
base, cpu0 = status("VmRSS"), sum(resource.getrusage(resource.RUSAGE_SELF)[:2])  # after the imports
t0 = time.perf_counter()
if mode == "streamed":
    res = mat.probe_maturity([model], out, budget_mb=int(budget), device=device, force=True, report=False)
    alpha = dict(zip(res.table["module"], res.table["alpha"]))
    meta = json.loads(next(Path(out, "cache").glob("*.json")).read_text())
    batch = meta["peak_batch_bytes"]
else:
    tensors = {}
    for f in mat.weight_files(Path(model)):
        tensors.update(load_file(f))
    groups = {}
    for name, W in tensors.items():
        if W.ndim == 2 and mat.parse_module_name(name)[0] is not None:
            groups.setdefault(tuple(W.shape), []).append(name)
    alpha, batch = {}, 0
    for shape, names in groups.items():
        per = max(1, int(budget) * 2**20 // mat.work_bytes(shape))  # the same batches as streamed
        for i in range(0, len(names), per):
            chunk = names[i : i + per]
            X = torch.stack([tensors[n].to(device, torch.float64) for n in chunk])
            batch = max(batch, len(chunk) * mat.work_bytes(shape))
            stats, _ = esd.esd_fit(dense_svd(X).S, shape)
            alpha.update({n.removesuffix(".weight"): a for n, a in zip(chunk, stats["alpha"].tolist())})
            del X
seconds = time.perf_counter() - t0
cpu = sum(resource.getrusage(resource.RUSAGE_SELF)[:2]) - cpu0
print(json.dumps({"peak_mb": (status("VmHWM") - base) / 1024, "seconds": seconds, "cpu_s": cpu,
                  "batch_mb": batch / 2**20, "alpha": {k: None if v != v else v for k, v in alpha.items()}}))
"""


def write_checkpoint(folder: Path, scale: int, layers: int, vocab: int, shards: int) -> tuple[int, int]:
    """A bf16 Qwen2-class checkpoint over ``shards`` files with an index; returns (bytes, matrices)."""
    from safetensors.torch import save_file

    shapes = qwen2_shapes(1536 // scale, 8960 // scale, max(1, 256 // scale), layers)
    hidden = 1536 // scale
    gen = torch.Generator().manual_seed(0)
    names = ["model.embed_tokens.weight", *(f"{m}.weight" for m in shapes)]
    dims = {"model.embed_tokens.weight": (vocab, hidden), **{f"{m}.weight": s for m, s in shapes.items()}}
    per = -(-len(names) // shards)
    weight_map, total = {}, 0
    folder.mkdir(parents=True, exist_ok=True)
    for k in range(shards):
        part = names[k * per : (k + 1) * per]
        fname = f"model-{k + 1:05d}-of-{shards:05d}.safetensors"
        tensors = {n: (torch.randn(dims[n], generator=gen) * 0.02).bfloat16() for n in part}
        for n, t in tensors.items():  # a little structure: a few strong directions per matrix
            u, v = torch.randn(t.shape[0], 4, generator=gen), torch.randn(4, t.shape[1], generator=gen)
            tensors[n] = (t.float() + 0.01 * u @ v / t.shape[1] ** 0.5).bfloat16()
        save_file(tensors, folder / fname)
        weight_map |= {n: fname for n in part}
        total += sum(t.numel() * 2 for t in tensors.values())
    (folder / "model.safetensors.index.json").write_text(json.dumps({"weight_map": weight_map}))
    return total, len(shapes)


def measure(mode: str, model: Path, out: Path, budget_mb: int, device: str) -> dict:
    cmd = [sys.executable, "-c", WORKER, mode, str(model), str(out), str(budget_mb), device]
    res = subprocess.run(cmd, capture_output=True, text=True, check=False)
    if res.returncode:
        raise SystemExit(f"{mode} failed:\n{res.stderr[-3000:]}")
    return json.loads(res.stdout.strip().splitlines()[-1])


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--scale", type=int, default=2, help="divide Qwen2-1.5B's dimensions by this")
    ap.add_argument("--layers", type=int, default=8)
    ap.add_argument("--vocab", type=int, default=32000)
    ap.add_argument("--shards", type=int, default=4)
    ap.add_argument("--budget-mb", type=int, default=128, help="the streamed probe's float64 work per batch")
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    args = ap.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        t0 = time.perf_counter()
        size, count = write_checkpoint(Path(tmp) / "model", args.scale, args.layers, args.vocab, args.shards)
        print(
            f"checkpoint: {count} layer matrices (+ embedding), {size / 2**20:.0f} MiB bf16 in "
            f"{args.shards} files, written in {time.perf_counter() - t0:.1f} s; device {args.device}"
        )
        results = {
            m: measure(m, Path(tmp) / "model", Path(tmp) / m, args.budget_mb, args.device)
            for m in ("streamed", "whole")
        }
    for mode, r in results.items():
        print(
            f"{mode:>9}: peak +{r['peak_mb']:.0f} MiB over imports (largest batch {r['batch_mb']:.0f} MiB "
            f"of float64 work), {r['seconds']:.1f} s ({r['cpu_s']:.1f} s of CPU), "
            f"{count / r['seconds']:.1f} matrices/s"
        )
    a, b = results["streamed"]["alpha"], results["whole"]["alpha"]
    same = [k for k in a if a[k] is not None and b.get(k) is not None]
    worst = max((abs(a[k] - b[k]) for k in same), default=0.0)
    print(f"α: {len(same)} matrices fitted by both, largest |Δα| {worst:.2e}")


if __name__ == "__main__":
    main()
