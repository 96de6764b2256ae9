"""Every GPU measurement of issue 17 in one run (≤ 8 minutes on one H200), results to $OUT.

Sections, in order of importance; each runs in its own process with its own time limit, and a section
that would start past the overall deadline is skipped (and said so), so that what was measured always
comes back. Results: ``$OUT/device_check.json`` (every section's numbers, with date, device, versions),
``$OUT/device_check.md`` (the tables) and ``$OUT/device_check.log`` (everything printed), rewritten
after each section.

- ``gpu_tests``: tests/test_svd.py on CUDA (the accuracy contract for each eigensolver).
- ``eigh``: per matrix size of the 1.5B and 7B shapes, ms per matrix of a batch for cuSOLVER's syevd
  (1 and 4 streams) and the batched ``cusolverDnXsyevBatched`` (nvmath-python), the accuracy of the
  engine's σ with each (max relative error vs float64 LAPACK above 1e-6·σ₁), the winner per size, and
  what ``batched_eigh``'s own measurement ("auto") chose.
- ``engine``: benchmarks/bench_engine.py, full 1.5B shapes, all metrics, data starting in host memory,
  with the solver chosen per size ("auto"); ``engine_syevd``: the same with the 4-stream syevd alone
  (the baseline, same run); ``engine_naive``: 7 layers with the naive loop side by side (per-module
  loop: ×4 for 28 layers).
- ``stream_7b``: benchmarks/bench_stream.py, Qwen2.5-7B shapes, dense and LoRA r32 checkpoints at 7 and
  28 layers: time, peak GPU memory (target ≤ 8 GiB), peak host memory (the same at 7 and 28 layers).
- ``prefetch``: benchmarks/bench_prefetch.py, 1.5B shapes on the GPU: reading ahead on/off.
- ``shard``: benchmarks/bench_shard.py with two CUDA workers on the one GPU (the path works; no speed-up
  is expected from one GPU).
- ``esd``: benchmarks/bench_esd.py --device cuda --scale 1 (WeightWatcher, carried, on the CPU side).
- ``recording``: benchmarks/bench_recording.py --device cuda --model qwen2-0.5b-random, only with
  ``--with-recording`` and where trl is importable.

    OUT=/tmp/out bash benchmarks/device_check.sh              # on the GPU machine (installs .whl/ first)
    python benchmarks/device_check.py --dry-run               # CPU, tiny shapes: every section's path
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import os
import platform
import subprocess
import sys
import tempfile
import time
from datetime import datetime, timezone
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
BENCH = ROOT / "benchmarks"


Section = tuple[str, list[str], int, dict[str, str]]  # name, command, time limit (s), extra environment


def sections(dry: bool, device: str, with_recording: bool, work: Path) -> list[Section]:
    """Each measurement, in order: the GPU's, or (``dry``) the same commands at tiny shapes on the CPU."""
    py, two = sys.executable, f"{device},{device}"
    auto, syevd = {"SPECTRA_EIGH_SOLVER": "auto"}, {"SPECTRA_EIGH_SOLVER": "syevd"}
    bf16 = "--dtype bfloat16"  # stored W0 and ΔW: the 7B run is 2 × 13 GB on disk even so

    def bench(name: str, script: str, args: str, limit: int, env: dict[str, str] | None = None) -> Section:
        out = [] if script == "bench_esd.py" else ["--out", str(work / f"{name}.json")]  # esd: its tables
        return name, [py, str(BENCH / script), "--device", device, *args.split(), *out], limit, env or {}

    tests = [py, "-m", "pytest", "-q", "-x", str(ROOT / "tests" / "test_svd.py")]
    eigh = [py, __file__, "--section", "eigh", "--device", device]
    if dry:
        found = [
            ("gpu_tests", [*tests, "-k", "cuda"], 120, {}),
            ("eigh", [*eigh, "--dry-run"], 120, {}),
            bench("engine", "bench_engine.py", "--scale 32 --layers 2 --repeat 1 --skip-naive", 300, auto),
            bench("engine_naive", "bench_engine.py", "--scale 32 --layers 1 --repeat 1", 300),
            bench("stream_7b", "bench_stream.py", "--scale 64 --layers 1 --threads 1", 300),
            bench("prefetch", "bench_prefetch.py", "--scale 32 --layers 2 --steps 1 --budget-mib 1", 300),
            bench("shard", "bench_shard.py", f"--devices {two} --scale 32 --layers 1 --steps 2", 300),
            bench("esd", "bench_esd.py", "--scale 32 --layers 1 --threads 1", 300),
        ]
    else:
        found = [
            ("gpu_tests", tests, 90, {}),
            ("eigh", eigh, 60, {}),
            bench("engine", "bench_engine.py", "--repeat 3 --skip-naive --memory-layers 7 28", 120, auto),
            bench("stream_7b", "bench_stream.py", f"--scale 1 --layers 7 {bf16} --budget-mib 1024", 240),
            bench("engine_syevd", "bench_engine.py", "--repeat 2 --skip-naive --memory-layers", 90, syevd),
            bench("engine_naive", "bench_engine.py", "--layers 7 --repeat 1 --memory-layers", 90, auto),
            bench("prefetch", "bench_prefetch.py", f"--scale 1 --layers 14 --steps 1 {bf16} --repeat 2", 90),
            bench("shard", "bench_shard.py", f"--devices {two} --scale 8 --layers 2 --steps 4", 60),
            bench("esd", "bench_esd.py", "--scale 1 --layers 7", 90),
        ]
    if with_recording:
        found.append(bench("recording", "bench_recording.py", "--model qwen2-0.5b-random", 300))
    return found


# ------------------------------------------------------------------------------------------- eigh table


def eigh_table(device: str, dry: bool) -> dict[str, object]:
    """Per size: ms per matrix of a batch by each solver, accuracy of the engine's σ with it, winner."""
    import torch

    import spectra.svd as svd

    cuda = device.startswith("cuda")
    sizes = [(96, 64, 4), (48, 40, 4)] if dry else [(8960, 1536, 28), (1536, 256, 28), (18944, 3584, 8),
                                                     (3584, 512, 28)]  # fmt: skip
    out: dict[str, object] = {"batched_available": svd.xsyev_batched_available(), "sizes": {}}
    for m, n, b in sizes:
        g = torch.Generator().manual_seed(m + n)
        s = torch.logspace(0, -7, n, dtype=torch.float64)  # a spectrum with a tail the contract covers
        Q1 = torch.linalg.qr(torch.randn(m, n, generator=g, dtype=torch.float64)).Q
        Q2 = torch.linalg.qr(torch.randn(n, n, generator=g, dtype=torch.float64)).Q
        X = ((Q1 * s) @ Q2.T).expand(b, m, n).contiguous().to(device)
        G = X.mT @ X
        ref = torch.linalg.svdvals(X[0].cpu())
        keep = ref > 1e-6 * ref[0]
        row: dict[str, object] = {"m": m, "n": n, "batch": b}
        solvers = {"syevd_1_stream": ("syevd", 1), "syevd_4_streams": ("syevd", 4)}
        if out["batched_available"]:
            solvers["batched"] = ("batched", 4)
        for label, (solver, streams) in solvers.items():
            try:
                run = (lambda G=G, st=streams: svd._eigh_on_streams(G, st)) if solver == "syevd" else (
                    lambda G=G: svd.xsyev_batched(G))  # fmt: skip
                if not cuda:
                    run = lambda G=G: torch.linalg.eigh(G)  # noqa: E731 (the CPU has one path)
                run()
                times = []
                for _ in range(1 if dry else 3):
                    if cuda:
                        torch.cuda.synchronize()
                    t = time.perf_counter()
                    run()
                    if cuda:
                        torch.cuda.synchronize()
                    times.append(time.perf_counter() - t)
                svd.EIGH_SOLVER = solver
                got = svd.dense_svd(X[:2], streams=streams).S[0].cpu()
                err = ((got - ref).abs() / ref)[keep].max().item()
                ms = round(min(times) * 1e3 / b, 3)
                row[label] = {"ms_per_matrix": ms, "max_rel_err": float(f"{err:.2e}")}
            except Exception as e:  # recorded, not fatal: the table says which solver failed
                row[label] = {"error": f"{type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}"}
        timed = {
            k: v["ms_per_matrix"] for k, v in row.items() if isinstance(v, dict) and "ms_per_matrix" in v
        }
        row["fastest"] = min(timed, key=timed.get) if timed else None
        if cuda:
            svd.EIGH_SOLVER = "auto"
            svd.EIGH_CHOICE.clear()
            svd.batched_eigh(G)
            row["auto_chose"] = next(iter(svd.EIGH_CHOICE.values()), "syevd")
        out["sizes"][f"{m}x{n}"] = row  # type: ignore[index]
        print(json.dumps(row), flush=True)
        del X, G
    return out


# ---------------------------------------------------------------------------------------------- driver


def environment(device: str) -> dict[str, object]:
    import torch

    info: dict[str, object] = {
        "date": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "python": platform.python_version(),
        "torch": torch.__version__,
        "cuda": torch.version.cuda,
        "device": torch.cuda.get_device_name() if device.startswith("cuda") else f"CPU {platform.machine()}",
        "cpu_count": os.cpu_count(),
        "load_average": [round(x, 2) for x in os.getloadavg()],
    }
    for name in ("nvmath", "cupy", "weightwatcher", "trl", "peft", "transformers"):
        spec = importlib.util.find_spec(name)
        info[name] = _version(name) if spec else None
    return info


def _version(name: str) -> str:
    from importlib.metadata import PackageNotFoundError, version

    for dist in (name, f"{name}-python", "cupy-cuda13x", "cupy-cuda12x"):
        try:
            return version(dist)
        except PackageNotFoundError:
            continue
    return "installed"


def _last_json(text: str) -> object | None:
    """The last JSON document a benchmark printed (one line, or an indented block at the end)."""
    lines = text.strip().splitlines()
    for i in range(len(lines) - 1, -1, -1):
        if lines[i].startswith("{"):
            try:
                return json.loads("\n".join(lines[i:]))
            except ValueError:
                try:
                    return json.loads(lines[i])
                except ValueError:
                    continue
    return None


def _result(path: Path, text: str) -> object | None:
    """What a section measured: the JSON file it wrote, else the last JSON it printed."""
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError):
        return _last_json(text)


def markdown(results: dict[str, object]) -> str:
    env = results["environment"]
    lines = [f"# issue 17 device check — {env['date']}", "", f"{env['device']}, torch {env['torch']} "  # type: ignore[index]
             f"(CUDA {env['cuda']}), nvmath {env['nvmath']}, cupy {env['cupy']}", ""]  # type: ignore[index]  # fmt: skip
    for name, sec in results["sections"].items():  # type: ignore[union-attr]
        lines.append(f"## {name}: {sec['status']} ({sec.get('seconds', 0)} s)")
        lines.append("")
        data = sec.get("result")
        if name == "eigh" and isinstance(data, dict):
            lines += [
                "| size | batch | syevd 1 stream ms | syevd 4 streams ms | batched ms | fastest | auto | "
                "max rel err (4 streams / batched) |",
                "|---|---|---|---|---|---|---|---|",
            ]
            for size, row in data.get("sizes", {}).items():
                def ms(k: str, row=row) -> str:
                    v = row.get(k, {})
                    return str(v.get("ms_per_matrix", v.get("error", "—")))

                pair = ("syevd_4_streams", "batched")
                errs = "/".join(str(row.get(k, {}).get("max_rel_err", "—")) for k in pair)
                cells = [size, row["batch"], ms("syevd_1_stream"), ms("syevd_4_streams"), ms("batched")]
                cells += [row.get("fastest"), row.get("auto_chose", "—"), errs]
                lines.append("| " + " | ".join(str(c) for c in cells) + " |")
        elif data is not None:
            lines += ["```json", json.dumps(data, indent=1)[:4000], "```"]
        else:
            lines += ["```", sec.get("tail", "")[-1500:], "```"]
        lines.append("")
    return "\n".join(lines)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--dry-run", action="store_true", help="tiny shapes on the CPU: check every path")
    ap.add_argument("--device", default=None, help="default: cuda (cpu with --dry-run)")
    ap.add_argument("--out", type=Path, default=None, help="default: $OUT, else a temporary folder")
    ap.add_argument("--budget", type=float, default=450, help="seconds for all sections together")
    ap.add_argument("--only", default=None, help="comma-separated section names")
    ap.add_argument("--with-recording", action="store_true", help="also bench_recording (needs trl)")
    ap.add_argument("--section", default=None, help=argparse.SUPPRESS)
    args = ap.parse_args()
    device = args.device or ("cpu" if args.dry_run else "cuda")
    if args.section == "eigh":
        print(json.dumps(eigh_table(device, args.dry_run)))
        return

    out = args.out or Path(os.environ.get("OUT") or tempfile.mkdtemp(prefix="device-check-"))
    out.mkdir(parents=True, exist_ok=True)
    print(f"results in {out}", flush=True)
    log = open(out / "device_check.log", "w")
    results: dict[str, object] = {"environment": environment(device), "sections": {}}
    chosen = set(args.only.split(",")) if args.only else None
    want_recording = args.with_recording and importlib.util.find_spec("trl") is not None
    if args.with_recording and not want_recording:
        results["sections"]["recording"] = {"status": "skipped: trl is not installed"}  # type: ignore[index]
    deadline = time.monotonic() + args.budget
    env_base = {**os.environ, "PYTHONUNBUFFERED": "1"}
    paths = (str(ROOT), str(BENCH), env_base.get("PYTHONPATH"))
    env_base["PYTHONPATH"] = os.pathsep.join(p for p in paths if p)
    work = Path(tempfile.mkdtemp(prefix="device-check-work-"))
    for name, cmd, limit, extra in sections(args.dry_run, device, want_recording, work):
        if chosen is not None and name not in chosen:
            continue
        left = deadline - time.monotonic()
        if left < min(limit, 30):
            results["sections"][name] = {"status": f"skipped: {left:.0f} s left of the budget"}  # type: ignore[index]
            continue
        log.write(f"\n===== {name}: {' '.join(cmd)}\n")
        log.flush()
        t = time.monotonic()
        try:
            proc = subprocess.run(cmd, cwd=ROOT, env={**env_base, **extra}, capture_output=True, text=True,
                                  timeout=min(limit, left))  # fmt: skip
            text = proc.stdout + proc.stderr
            status = "ok" if proc.returncode == 0 else f"failed ({proc.returncode})"
        except subprocess.TimeoutExpired as e:
            text = (e.stdout or b"").decode() if isinstance(e.stdout, bytes) else (e.stdout or "")
            status = f"timed out after {min(limit, left):.0f} s"
        log.write(text)
        log.flush()
        sec = {"status": status, "seconds": round(time.monotonic() - t, 1), "command": " ".join(cmd[1:]),
               "result": _result(work / f"{name}.json", text), "tail": text[-3000:]}  # fmt: skip
        results["sections"][name] = sec  # type: ignore[index]
        print(f"{name}: {status} in {sec['seconds']} s", flush=True)
        (out / "device_check.json").write_text(json.dumps(results, indent=2) + "\n")
        (out / "device_check.md").write_text(markdown(results) + "\n")
    (out / "device_check.json").write_text(json.dumps(results, indent=2) + "\n")
    (out / "device_check.md").write_text(markdown(results) + "\n")
    log.close()


if __name__ == "__main__":
    main()
