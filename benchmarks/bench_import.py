"""Benchmark: `spectra import` of a base/RL model pair — peak host memory at 7B shapes, and its time
against reading both models' files once at 1.5B shapes (issue 20, point 2).

Synthetic pairs look like Hugging Face model folders: ``config.json`` (Qwen2ForCausalLM), bf16
safetensors shards with ``model.safetensors.index.json``, every tensor of a Qwen2 decoder at its true
shape (embed_tokens, per layer q/k/v with biases, o, gate/up/down, two RMSNorms; the final norm; lm_head
unless tied). W0 is seeded Gaussian (1/√n), norms near 1; W_t is W0 with an RL-like sparse update: a
random ``--changed`` share of entries (default 20 %) moved by one bf16 step, every other stored value
equal (sparsity_in_rl reports 70–95 % of weights unchanged by RL).

(a) Memory, Qwen2-7B shapes (hidden 3584, intermediate 18944, kv 512, vocab 152064, untied lm_head):
    only ``--layers`` of the 28 decoder layers are written (default 2), since streaming makes the peak a
    function of the largest tensor (embed_tokens / lm_head, 152064 × 3584 bf16 = 1.09 GB) and not of the
    count. ``import_run`` runs in a fresh process; its peak resident memory (VmHWM) is compared with
    2 × the largest tensor's stored bytes (its float32 ΔW, held whole for the writer) + ``--budget-gib``,
    a budget that does not grow with the model: default 2 GiB = the bare process (interpreter, torch,
    h5py, spectra imported: ~0.3 GiB, measured and printed) + the importer's row-block buffers (1 MiB
    stored blocks, five float32 buffers of a block: ~12 MiB) + HDF5 writing, headers and allocator slack.
(b) Time, Qwen2-1.5B shapes (hidden 1536, intermediate 8960, kv 256, vocab 151936, tied embeddings;
    all 28 layers by default, ``--time-layers``): ``import_run`` against reading both models' files once
    (safetensors ``safe_open(...).get_tensor(...).clone()`` of every tensor: get_tensor alone maps the
    file without reading it), each in a fresh process, alternated
    ``--repeat`` times in one run (the files are in the page cache for both after the first pass); the
    medians, their ratio and the target (≤ 2×).

    python benchmarks/bench_import.py                          # both, 2 of 7B's layers, 1.5B whole
    python benchmarks/bench_import.py --only time --time-layers 4 --repeat 1    # a quick look
    python benchmarks/bench_import.py --only import --profile  # where the import's time goes (cProfile)

Disk: the 7B slice is ~3.1 GB per model at 2 layers (+0.47 GB per layer) and its run ~2× one model;
the 1.5B pair is 3.1 GB per model at 28 layers and its run ~6.2 GB. Everything is written under
``--work`` (default benchmarks/out/import, gitignored) and removed at the end unless ``--keep``.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import platform
import re
import shutil
import statistics
import subprocess
import sys
import time
from dataclasses import dataclass
from datetime import date
from pathlib import Path

import torch

HERE = Path(__file__).resolve().parent


@dataclass(frozen=True)
class Qwen2Spec:
    """The dimensions of a Qwen2 decoder (head_dim 128)."""

    name: str
    hidden: int
    intermediate: int
    layers: int
    heads: int
    kv_heads: int
    vocab: int
    tied: bool

    @property
    def kv_dim(self) -> int:
        return self.kv_heads * (self.hidden // self.heads)

    def config(self, layers: int) -> dict[str, object]:
        """config.json of the model folder (``layers``: the decoder layers actually written)."""
        return {
            "architectures": ["Qwen2ForCausalLM"], "model_type": "qwen2", "hidden_act": "silu",
            "hidden_size": self.hidden, "intermediate_size": self.intermediate, "num_hidden_layers": layers,
            "num_attention_heads": self.heads, "num_key_value_heads": self.kv_heads, "vocab_size": self.vocab,
            "max_position_embeddings": 32768, "rms_norm_eps": 1e-6, "rope_theta": 1000000.0,
            "tie_word_embeddings": self.tied, "torch_dtype": "bfloat16", "use_cache": True,
        }  # fmt: skip

    def tensors(self, layers: int) -> dict[str, tuple[int, ...]]:
        """Every tensor name → shape, in the order a Hugging Face checkpoint stores them."""
        h, kv, inter = self.hidden, self.kv_dim, self.intermediate
        out: dict[str, tuple[int, ...]] = {"model.embed_tokens.weight": (self.vocab, h)}
        for i in range(layers):
            p = f"model.layers.{i}."
            out |= {
                p + "self_attn.q_proj.weight": (h, h), p + "self_attn.q_proj.bias": (h,),
                p + "self_attn.k_proj.weight": (kv, h), p + "self_attn.k_proj.bias": (kv,),
                p + "self_attn.v_proj.weight": (kv, h), p + "self_attn.v_proj.bias": (kv,),
                p + "self_attn.o_proj.weight": (h, h),
                p + "mlp.gate_proj.weight": (inter, h), p + "mlp.up_proj.weight": (inter, h),
                p + "mlp.down_proj.weight": (h, inter),
                p + "input_layernorm.weight": (h,), p + "post_attention_layernorm.weight": (h,),
            }  # fmt: skip
        out["model.norm.weight"] = (h,)
        if not self.tied:
            out["lm_head.weight"] = (self.vocab, h)
        return out


QWEN2_7B = Qwen2Spec("Qwen2-7B", 3584, 18944, 28, 28, 4, 152064, tied=False)
QWEN2_1_5B = Qwen2Spec("Qwen2-1.5B", 1536, 8960, 28, 12, 2, 151936, tied=True)
BF16_BYTES = 2


def _pair_tensor(name: str, shape: tuple[int, ...], seed: int, changed: float) -> tuple[torch.Tensor, ...]:
    """W0 and W_t of one tensor, bf16, made in row blocks (the generator's memory stays near 2 tensors).

    W0: Gaussian / √n for matrices, 1 + N(0, 0.02) for norms, N(0, 0.02) for biases. W_t: W0 with a
    ``changed`` share of entries one bf16 step further from zero (the bit pattern + 1), others equal."""
    g = torch.Generator().manual_seed(seed)
    w0 = torch.empty(shape, dtype=torch.bfloat16)
    wt = torch.empty(shape, dtype=torch.bfloat16)
    rows = shape[0]
    width = math.prod(shape[1:])
    block = max(1, (16 << 20) // max(width, 1))
    for start in range(0, rows, block):
        stop = min(rows, start + block)
        n = (stop - start) * width
        x = torch.randn(n, generator=g)
        if len(shape) == 2:
            x /= math.sqrt(shape[1])
        elif name.endswith("norm.weight"):
            x = 1 + 0.02 * x
        else:
            x *= 0.02
        b0 = x.to(torch.bfloat16)
        bits = b0.view(torch.int16)
        moved = (torch.rand(n, generator=g) < changed) & ((bits & 0x7FFF) < 0x7F7F)  # finite after + 1
        bt = torch.where(moved, bits + 1, bits).view(torch.bfloat16)
        w0.view(-1)[start * width : stop * width] = b0
        wt.view(-1)[start * width : stop * width] = bt
    return w0, wt


def _stored_bytes(spec: Qwen2Spec, layers: int) -> int:
    return sum(math.prod(s) for s in spec.tensors(layers).values()) * BF16_BYTES


def write_pair(
    root: Path, spec: Qwen2Spec, layers: int, changed: float = 0.2, seed: int = 0, shard_gib: float = 1.0
) -> tuple[Path, Path, int]:
    """root/base and root/rl: a sharded bf16 model pair of ``spec`` with ``layers`` decoder layers
    (written once: an existing complete pair is reused). Returns both folders and the largest
    tensor's stored bytes."""
    from safetensors.torch import save_file

    shapes = spec.tensors(layers)
    largest = max(math.prod(s) for s in shapes.values()) * BF16_BYTES
    base, rl = root / "base", root / "rl"
    done = root / "complete.json"
    meta = {"spec": spec.name, "layers": layers, "changed": changed, "seed": seed}
    if done.is_file() and json.loads(done.read_text()) == meta:
        return base, rl, largest
    shutil.rmtree(root, ignore_errors=True)
    base.mkdir(parents=True)
    rl.mkdir()
    limit = int(shard_gib * 2**30)
    shards: list[list[str]] = [[]]
    used = 0
    for name, shape in shapes.items():
        size = math.prod(shape) * BF16_BYTES
        if shards[-1] and used + size > limit:
            shards.append([])
            used = 0
        shards[-1].append(name)
        used += size
    files = [f"model-{i + 1:05d}-of-{len(shards):05d}.safetensors" for i in range(len(shards))]
    weight_map = {}
    for i, (names, file) in enumerate(zip(shards, files, strict=True)):
        b, t = {}, {}
        for j, name in enumerate(names):
            b[name], t[name] = _pair_tensor(name, shapes[name], seed * 1_000_003 + i * 10_007 + j, changed)
            weight_map[name] = file
        save_file(b, str(base / file), metadata={"format": "pt"})
        save_file(t, str(rl / file), metadata={"format": "pt"})
        del b, t
    index = {"metadata": {"total_size": _stored_bytes(spec, layers)}, "weight_map": weight_map}
    for folder in (base, rl):
        (folder / "model.safetensors.index.json").write_text(json.dumps(index, indent=2))
        (folder / "config.json").write_text(json.dumps(spec.config(layers), indent=2))
    done.write_text(json.dumps(meta))
    return base, rl, largest


# ------------------------------------------------------------------------------ measured in a fresh process


def _status(key: str) -> float:
    """A /proc/self/status figure in GiB (VmHWM: the peak resident memory; VmRSS: now)."""
    text = Path("/proc/self/status").read_text()
    return int(re.search(key + r":\s+(\d+)", text).group(1)) / 2**20  # kB → GiB


def _child(args: argparse.Namespace) -> None:
    """What one fresh process measures: ``bare`` (imports only), ``read`` (both models' files once) or
    ``import`` (import_run); one JSON line: seconds, peak and final RSS."""
    from spectra.train.importing.run import import_run  # the same imports in every mode

    if args.threads:
        torch.set_num_threads(args.threads)
    what, base, rl = args.child, Path(args.base), Path(args.rl)
    before = _status("VmRSS")
    t0 = time.perf_counter()
    out: dict[str, object] = {}
    if what == "read":
        from safetensors import safe_open

        nbytes = 0
        for folder in (base, rl):
            for f in sorted(folder.glob("*.safetensors")):
                with safe_open(str(f), framework="pt") as fh:
                    for key in fh.keys():
                        t = fh.get_tensor(key).clone()  # get_tensor maps the file; clone reads it
                        nbytes += t.numel() * t.element_size()
                        del t
        out["bytes"] = nbytes
    elif what == "import":
        target = Path(args.run_out)
        shutil.rmtree(target / args.name, ignore_errors=True)  # a repeated import would be a no-op
        if args.profile:
            import cProfile
            import pstats

            prof = cProfile.Profile()
            prof.enable()
        path = import_run(str(base), [str(rl)], target, args.name)
        if args.profile:
            prof.disable()
            pstats.Stats(prof, stream=sys.stderr).sort_stats("cumulative").print_stats(25)
        out["run_bytes"] = sum(p.stat().st_size for p in path.rglob("*") if p.is_file())
    out |= {
        "what": what,
        "seconds": round(time.perf_counter() - t0, 2),
        "rss_before_gib": round(before, 3),
        "peak_rss_gib": round(_status("VmHWM"), 3),
    }
    print(json.dumps(out))


def measure(what: str, base: Path, rl: Path, run_out: Path, threads: int, profile: bool = False) -> dict:
    """One fresh process doing ``what``; its JSON line (its cProfile table goes to our stderr)."""
    cmd = [sys.executable, __file__, "--child", what, "--base", str(base), "--rl", str(rl)]
    cmd += ["--run-out", str(run_out), "--name", "pair", "--threads", str(threads)]
    cmd += ["--profile"] if profile else []
    out = subprocess.run(cmd, capture_output=True, text=True)
    if out.returncode != 0:
        raise RuntimeError(f"bench_import: measuring {what} on {base.parent} failed:\n{out.stderr[-3000:]}")
    if profile:
        print(out.stderr, file=sys.stderr)
    return json.loads(out.stdout.strip().splitlines()[-1])


def memory_case(args: argparse.Namespace, work: Path) -> dict[str, object]:
    """(a): peak RSS of import_run on the 7B-shaped slice against 2 × largest tensor + budget."""
    t = time.perf_counter()
    base, rl, largest = write_pair(work / f"qwen2-7b-{args.layers}l", QWEN2_7B, args.layers, args.changed)
    written = round(time.perf_counter() - t, 1)
    bare = measure("bare", base, rl, work / "runs", args.threads)
    imp = measure("import", base, rl, work / "runs", args.threads, args.profile)
    bound = 2 * largest / 2**30 + args.budget_gib
    row = {
        "shapes": f"{QWEN2_7B.name}, {args.layers} of 28 layers (every tensor at its true shape)",
        "largest_tensor_gib": round(largest / 2**30, 3),
        "budget_gib": args.budget_gib,
        "bound_gib": round(bound, 3),
        "bare_process_peak_gib": bare["peak_rss_gib"],
        "import_peak_gib": imp["peak_rss_gib"],
        "import_seconds": imp["seconds"],
        "run_gib": round(imp["run_bytes"] / 2**30, 2),
        "pair_written_s": written,
        "within_bound": imp["peak_rss_gib"] <= bound,
    }
    shutil.rmtree(work / "runs", ignore_errors=True)
    if not args.keep:
        shutil.rmtree(base.parent, ignore_errors=True)
    return row


def _drop_page_cache(cold: bool) -> None:
    """With ``--cold``: write dirty pages out and drop the page cache (root only), so that the next
    measurement reads the models from disk, as a first import does."""
    if cold:
        os.sync()
        Path("/proc/sys/vm/drop_caches").write_text("3\n")


def time_case(args: argparse.Namespace, work: Path) -> dict[str, object]:
    """(b): import_run against reading both models' files once, alternated, fresh processes."""
    t = time.perf_counter()
    base, rl, _ = write_pair(work / f"qwen2-1.5b-{args.time_layers}l", QWEN2_1_5B, args.time_layers,
                             args.changed)  # fmt: skip
    written = round(time.perf_counter() - t, 1)
    if not args.cold:
        measure("read", base, rl, work / "runs", args.threads)  # warm the page cache for both alike
    reads, imports, peaks = [], [], []
    for _ in range(args.repeat):
        _drop_page_cache(args.cold)
        r = measure("read", base, rl, work / "runs", args.threads)
        _drop_page_cache(args.cold)
        i = measure("import", base, rl, work / "runs", args.threads, args.profile)
        reads.append(r["seconds"])
        imports.append(i["seconds"])
        peaks.append(i["peak_rss_gib"])
        print(json.dumps({"read": r, "import": i}), flush=True)
    read_s, import_s = round(statistics.median(reads), 2), round(statistics.median(imports), 2)
    row = {
        "shapes": f"{QWEN2_1_5B.name}, {args.time_layers} of 28 layers",
        "pair_gib": round(2 * _stored_bytes(QWEN2_1_5B, args.time_layers) / 2**30, 2),
        "read_both_s": reads,
        "import_s": imports,
        "read_median_s": read_s,
        "import_median_s": import_s,
        "ratio": round(import_s / read_s, 2),
        "target_ratio": 2.0,
        "within_target": import_s <= 2.0 * read_s,
        "import_peak_gib": max(peaks),
        "pair_written_s": written,
    }
    shutil.rmtree(work / "runs", ignore_errors=True)
    if not args.keep:
        shutil.rmtree(base.parent, ignore_errors=True)
    return row


def _importer_digest() -> str:
    """SHA-1 of the importer's sources (train/importing/*.py): which code a result measured."""
    import hashlib

    h = hashlib.sha1()
    for f in sorted((HERE.parent / "train" / "importing").glob("*.py")):
        h.update(f.read_bytes())
    return h.hexdigest()[:12]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument(
        "--only",
        choices=["memory", "time", "import"],
        default=None,
        help="one case (import: the time case's import alone, e.g. with --profile)",
    )
    ap.add_argument("--layers", type=int, default=2, help="decoder layers of the 7B-shaped pair written")
    ap.add_argument("--time-layers", type=int, default=28, help="decoder layers of the 1.5B-shaped pair")
    ap.add_argument("--changed", type=float, default=0.2, help="share of entries the RL update moves")
    ap.add_argument("--budget-gib", type=float, default=2.0, help="the fixed memory budget of the bound")
    ap.add_argument("--repeat", type=int, default=2, help="alternated read/import pairs of the time case")
    ap.add_argument("--threads", type=int, default=0, help="torch CPU threads in the measured processes")
    ap.add_argument("--profile", action="store_true", help="cProfile each import (to stderr)")
    ap.add_argument("--work", type=Path, default=HERE / "out" / "import", help="folder for pairs and runs")
    ap.add_argument("--keep", action="store_true", help="keep the pairs written (reused by the next run)")
    ap.add_argument("--cold", action="store_true",
                    help="(b) from disk: drop the page cache before each run (root only)")  # fmt: skip
    ap.add_argument("--out", type=Path, default=None, help="write the results as JSON here")
    ap.add_argument("--child", choices=["bare", "read", "import"], help=argparse.SUPPRESS)
    ap.add_argument("--base", help=argparse.SUPPRESS)
    ap.add_argument("--rl", help=argparse.SUPPRESS)
    ap.add_argument("--run-out", help=argparse.SUPPRESS)
    ap.add_argument("--name", default="pair", help=argparse.SUPPRESS)  # fmt: skip
    args = ap.parse_args()
    if args.child:
        return _child(args)

    args.work.mkdir(parents=True, exist_ok=True)
    results: dict[str, object] = {
        "date": date.today().isoformat(),
        "machine": f"CPU ({platform.machine()}, {platform.processor() or 'unknown'})",
        "cpu_count": os.cpu_count(),
        "torch": torch.__version__,
        "load_average_before": os.getloadavg(),
        "changed_share": args.changed,
        "importer_sha1": _importer_digest(),
    }
    if args.only in (None, "memory"):
        results["memory"] = memory_case(args, args.work)
        print(json.dumps(results["memory"]), flush=True)
    if args.only in (None, "time"):
        results["time"] = time_case(args, args.work)
        print(json.dumps(results["time"]), flush=True)
    if args.only == "import":
        base, rl, _ = write_pair(args.work / f"qwen2-1.5b-{args.time_layers}l", QWEN2_1_5B, args.time_layers,
                                 args.changed)  # fmt: skip
        results["import"] = measure("import", base, rl, args.work / "runs", args.threads, args.profile)
        shutil.rmtree(args.work / "runs", ignore_errors=True)
    results["load_average_after"] = os.getloadavg()

    print(f"\nmachine: {results['machine']}, {results['cpu_count']} cores, load "
          f"{results['load_average_before']} → {results['load_average_after']}")  # fmt: skip
    if "memory" in results:
        m = results["memory"]
        print(f"(a) {m['shapes']}: import peak RSS {m['import_peak_gib']} GiB (bare process "
              f"{m['bare_process_peak_gib']} GiB) vs bound 2 × {m['largest_tensor_gib']} + "
              f"{m['budget_gib']} = {m['bound_gib']} GiB → "
              f"{'within' if m['within_bound'] else 'OVER'}")  # fmt: skip
    if "time" in results:
        r = results["time"]
        print(f"(b) {r['shapes']} ({r['pair_gib']} GiB pair): import {r['import_median_s']} s vs reading "
              f"both models' files {r['read_median_s']} s (medians of {args.repeat}) → ratio {r['ratio']} "
              f"(target ≤ 2: {'met' if r['within_target'] else 'MISSED'})")  # fmt: skip
    if "import" in results:
        print(f"import alone: {results['import']}")
    if args.out:
        args.out.write_text(json.dumps(results, indent=2) + "\n")


if __name__ == "__main__":
    main()
