"""Mutation fuzzing of a delta file (issue 22 §1): no damaged byte is ever read as a valid update.

One small real delta file (LoRA factors spanning several chunks, a dense ΔW, a bf16 LoRA with VeRA-style
shared references, DoRA, IA3 and a vector) is damaged one byte at a time, in memory, and read back
through the run's read path (``RunStore.open_delta``, ``missing_modules``, ``DeltaFile.read``). Every
region of the file is swept (superblock, object headers, B-tree nodes, local and global heaps, symbol
tables, chunk data, the rest), then random single-bit flips anywhere. Each read must give exactly the
stored numbers, or a named spectra error (a row of the analysis): never other numbers, never another
kind of exception, never a hang.

HDF5 itself is not proof against every flip: a damaged variable-length type made it crash the process
(spectra now refuses attribute types it never writes before reading them: ``h5io.check_attrs``), and
a damaged length of a variable-length string attribute makes it allocate up to that length (GBs, for
a second or two) before failing; that read is named like the others.
"""

from __future__ import annotations

import faulthandler
import random
import re
import sys
import time
from collections import Counter

import h5py
import numpy as np
import pytest
import torch

import spectra
from spectra.codecs import Stored
from spectra.errors import SpectraError
from spectra.operators import Dense, LowRank, VectorDelta
from spectra.writer import RunWriter

SEED = 22
PER_REGION = 200  # flips per region type (every byte of a smaller region)
RANDOM_FLIPS = 400  # single-bit flips anywhere in the file
SLOW_FLIP_S = 60.0  # one damaged file read for longer than this is a hang (a few take seconds: see below)


def _modules(g: torch.Generator) -> tuple[dict, dict, dict]:
    """The updates of the file (every stored kind), their base weights, and VeRA's shared matrices."""
    shared = {"vera_A": torch.randn(8, 80, generator=g), "vera_B": torch.randn(72, 8, generator=g)}
    w0 = {
        "model.layers.0.self_attn.q_proj": torch.randn(512, 512, generator=g),
        "model.layers.0.mlp.up_proj": torch.randn(128, 96, generator=g),
        "model.layers.0.input_layernorm": torch.randn(64, generator=g),
        "model.layers.1.self_attn.q_proj": torch.randn(64, 64, generator=g),
        "model.layers.1.self_attn.v_proj": torch.randn(64, 80, generator=g),
        "model.layers.1.mlp.down_proj": torch.randn(48, 40, generator=g),
        "model.layers.1.mlp.up_proj": torch.randn(40, 48, generator=g),
    }
    bf16 = torch.bfloat16
    mods = {
        "model.layers.0.self_attn.q_proj": LowRank(
            torch.randn(512, 16, generator=g), torch.randn(16, 512, generator=g), 2.0
        ),  # several chunks per factor: a chunk B-tree
        "model.layers.0.mlp.up_proj": Dense(torch.randn(128, 96, generator=g)),
        "model.layers.0.input_layernorm": VectorDelta(torch.randn(64, generator=g)),
        "model.layers.1.self_attn.q_proj": LowRank(
            torch.randn(64, 8, generator=g).to(bf16), torch.randn(8, 64, generator=g).to(bf16), 0.5,
            mid=torch.rand(8, generator=g).to(bf16),
        ),
        "model.layers.1.self_attn.v_proj": LowRank(
            shared["vera_B"][:64, :8], shared["vera_A"][:8, :80], 1.0,
            mid=torch.rand(8, generator=g), row=torch.rand(64, generator=g),
        ),  # VeRA: references to /shared
        "model.layers.1.mlp.down_proj": Stored(
            "dora", (48, 40),
            {"B": torch.randn(48, 4, generator=g), "A": torch.randn(4, 40, generator=g),
             "magnitude": torch.rand(48, generator=g) + 0.5},
            {"scale": 4.0},
        ),
        "model.layers.1.mlp.up_proj": Stored(
            "scaled", (40, 48), {"l": torch.rand(48, generator=g) + 0.5}, {"axis": "column"}
        ),
    }
    return mods, w0, shared


@pytest.fixture(scope="module")
def pristine(tmp_path_factory):
    """A run directory with one delta file, the file's bytes, and each module's update as read."""
    path = tmp_path_factory.mktemp("fuzz") / "run"
    mods, w0, shared = _modules(torch.Generator().manual_seed(SEED))
    w = RunWriter(path)
    w.write_config({"name": "fuzz"})
    w.write_base_weights(w0)
    delta = w.write_delta(1, mods, shared)
    run = spectra.load_run(path)
    reference = _read(run)
    assert isinstance(reference, dict) and set(reference) == set(mods)
    return run, delta, delta.read_bytes(), reference


def _read(run) -> dict[str, Stored | str] | str:
    """Every module of step 1 as its stored form, or the error met (a string naming it)."""
    try:
        dfile = run.open_delta(1)
    except SpectraError as e:
        return str(e)
    out: dict[str, Stored | str] = {}
    with dfile:
        for module, why in run.missing_modules(1, dfile):
            out[module or "?"] = why
        for module in dfile.modules:
            try:
                out[module] = dfile.read(module)
            except SpectraError as e:
                out[module] = str(e)
    return out


def _same(a: Stored, b: Stored) -> bool:
    if (a.kind, a.shape, set(a.tensors)) != (b.kind, b.shape, set(b.tensors)):
        return False
    same = [x.dtype == b.tensors[k].dtype and torch.equal(x, b.tensors[k]) for k, x in a.tensors.items()]
    tensors = all(same)
    return tensors and {k: str(v) for k, v in a.attrs.items()} == {k: str(v) for k, v in b.attrs.items()}


def _regions(path, data: bytes) -> np.ndarray:
    """A label per byte of the file: which HDF5 structure holds it."""
    labels = np.full(len(data), "other", dtype=object)
    starts: list[tuple[int, str, int | None]] = [(0, "superblock", 96)]
    chunks: list[tuple[int, int]] = []
    with h5py.File(path, "r") as f:
        objects = [f]
        f.visititems(lambda _, obj: objects.append(obj))
        for obj in objects:
            info = h5py.h5o.get_info(obj.id)
            starts.append((info.addr, "object header", info.hdr.space.total))
            if isinstance(obj, h5py.Dataset) and obj.chunks:
                obj.id.chunk_iter(lambda c: chunks.append((c.byte_offset, c.size)))
    for signature, label in ((b"TREE", "B-tree node"), (b"HEAP", "local heap"), (b"SNOD", "symbol table"),
                             (b"GCOL", "global heap")):  # fmt: skip
        starts += [(m.start(), label, None) for m in re.finditer(signature, data)]
    starts += [(offset, "chunk data", size) for offset, size in chunks]
    starts.sort()
    for i, (offset, label, size) in enumerate(starts):
        end = offset + size if size is not None else (starts[i + 1][0] if i + 1 < len(starts) else len(data))
        labels[offset:end] = label
    for offset, size in chunks:  # data wins over a signature that happens to appear in it
        labels[offset : offset + size] = "chunk data"
    return labels


def _flips(labels: np.ndarray, rng: random.Random) -> list[tuple[int, int, str]]:
    """(position, xor mask, region): a sweep of every region type, then random single-bit flips."""
    flips = []
    for region in sorted(set(labels)):
        where = np.flatnonzero(labels == region)
        if len(where) > PER_REGION:  # evenly spread over the region
            where = where[np.linspace(0, len(where) - 1, PER_REGION).astype(int)]
        picked = where
        flips += [(int(p), rng.randrange(1, 256), region) for p in picked]
    for _ in range(RANDOM_FLIPS):
        p = rng.randrange(len(labels))
        flips.append((p, 1 << rng.randrange(8), str(labels[p])))
    return flips


def test_no_damaged_byte_reads_as_a_valid_update(pristine, capsys):
    run, path, original, reference = pristine
    labels = _regions(path, original)
    flips = _flips(labels, random.Random(SEED))
    counts: Counter[str] = Counter()
    by_region: Counter[tuple[str, str]] = Counter()
    silent, crashes = [], []
    slowest = 0.0
    faulthandler.dump_traceback_later(600, exit=True, file=sys.__stderr__)  # a hang in HDF5 ends it loudly
    try:
        for pos, mask, region in flips:
            damaged = bytearray(original)
            damaged[pos] ^= mask
            path.write_bytes(bytes(damaged))
            t0 = time.perf_counter()
            try:
                got = _read(spectra.load_run(run.path))
            except Exception as e:  # anything but a named error per module or file
                crashes.append((pos, region, f"{type(e).__name__}: {e}"))
                continue
            slowest = max(slowest, time.perf_counter() - t0)
            if isinstance(got, str):
                outcome = "named"
            else:
                read = {m: rec for m, rec in got.items() if isinstance(rec, Stored)}
                wrong = [m for m, rec in read.items() if m not in reference or not _same(rec, reference[m])]
                renamed = any(isinstance(v, str) and m not in reference for m, v in got.items())
                # a module neither read nor named: silent, unless a group with a damaged name (an error
                # naming another module) stands in for it
                lost = set(reference) - set(got) if not renamed else set()
                if wrong or lost:
                    silent.append((pos, region, mask, wrong, sorted(lost)))
                    outcome = "silent"
                else:
                    outcome = "named" if any(isinstance(v, str) for v in got.values()) else "exact"
            counts[outcome] += 1
            by_region[(region, outcome)] += 1
    finally:
        faulthandler.cancel_dump_traceback_later()
        path.write_bytes(original)
    counts["flips"] = len(flips)
    with capsys.disabled():
        print(f"\nfuzz: {dict(counts)}, slowest read {slowest:.3f} s")
        for region in sorted({r for r, _ in by_region}):
            outcomes = [f"{o} {n}" for (r, o), n in sorted(by_region.items()) if r == region]
            print(f"  {region}: {', '.join(outcomes)}")
    assert not crashes, crashes[:5]
    assert not silent, silent[:5]
    assert slowest < SLOW_FLIP_S
    assert counts["exact"] + counts["named"] == len(flips)
    regions = {r for r, _ in by_region}
    assert {"superblock", "object header", "B-tree node", "local heap", "chunk data"} <= regions, regions
    assert by_region[("B-tree node", "named")] > 0 and by_region[("chunk data", "named")] > 0
