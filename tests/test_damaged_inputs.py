"""Damaged inputs (issue 13 §3): every failure of one file or module is a row naming it, the rest of the
run is analysed, nothing hangs, and no damage is read as a changed number."""

from __future__ import annotations

import json
import os
import random
import shutil
import signal
from contextlib import contextmanager

import h5py
import numpy as np
import pandas as pd
import pytest
import torch

import spectra
from spectra.deltafile import DeltaFile
from spectra.h5io import ATTRS_CHECKSUM, attrs_checksum
from spectra.operators import Dense, LowRank
from spectra.pipeline import analyze_run
from spectra.synthetic import base_weights
from spectra.writer import RunWriter

SHAPES = {"model.layers.0.self_attn.q_proj": (24, 20), "model.layers.0.mlp.up_proj": (32, 20)}
Q, UP = list(SHAPES)
FAST = {"device": "cpu", "ks": (1, 4), "wt": "none", "bf16": False}


@pytest.fixture
def run_dir(tmp_path):
    """A run with three good steps (LoRA on q_proj, dense on up_proj)."""
    w = RunWriter(tmp_path / "run")
    w.write_config({"name": "run"})
    w.write_base_weights(base_weights(SHAPES))
    g = torch.Generator().manual_seed(0)
    for step in (1, 2, 3):
        w.write_delta(
            step,
            {
                Q: LowRank(torch.randn(24, 3, generator=g), torch.randn(3, 20, generator=g), 0.01 * step),
                UP: Dense(1e-3 * step * torch.randn(32, 20, generator=g)),
            },
        )
    return w.path


def _table(path):
    return spectra.load_run(path).analyze(**FAST)


def _status(table, step, module=None):
    rows = table[(table["step"] == step) & ((table["module"] == module) if module else True)]
    return set(rows["status"])


def _edit(path, module, **attrs):
    """Set attributes of a module as a buggy writer would (checksum made consistent)."""
    with h5py.File(path, "a") as f:
        g = f["modules"][module]
        for k, v in attrs.items():
            if v is None:
                del g.attrs[k]
            else:
                g.attrs[k] = v
        g.attrs[ATTRS_CHECKSUM] = attrs_checksum(g)


@pytest.mark.parametrize("scale", [float("nan"), float("inf"), -float("inf"), 1e300, None])
def test_a_bad_or_missing_scale_is_a_named_row(run_dir, scale):
    path = run_dir / "deltas" / "step_000002.h5"
    _edit(path, Q, scale=scale)
    t = _table(run_dir)
    row = t[(t["step"] == 2) & (t["module"] == Q)].iloc[0]
    assert row["status"] == "unreadable" and "step_000002.h5" in row["error"] and "scale" in row["error"]
    assert _status(t, 2, UP) == {"ok"} and _status(t, 1) == _status(t, 3) == {"ok"}


def test_rank_zero_factors_one_d_shape_and_bad_dtype_labels(run_dir):
    w = RunWriter(run_dir)
    w.write_delta(
        4, {Q: LowRank(torch.zeros(24, 0), torch.zeros(0, 20), 1.0), UP: Dense(torch.zeros(32, 20))}
    )
    _edit(run_dir / "deltas" / "step_000002.h5", UP, shape=[32])
    with h5py.File(run_dir / "deltas" / "step_000003.h5", "a") as f:
        f["modules"][UP]["delta"].attrs["dtype"] = "int32"  # an int32 label on float data
    t = _table(run_dir)
    assert "rank 0" in t[(t["step"] == 4) & (t["module"] == Q)].iloc[0]["error"]
    assert "shape attribute [32]" in t[(t["step"] == 2) & (t["module"] == UP)].iloc[0]["error"]
    err = t[(t["step"] == 3) & (t["module"] == UP)].iloc[0]["error"]
    assert "declares dtype 'int32' but stores float32" in err
    assert _status(t, 1) == {"ok"} and _status(t, 3, Q) == {"ok"}


def test_modules_as_a_dataset_and_metadata_damage_name_the_file(run_dir):
    path = run_dir / "deltas" / "step_000002.h5"
    with h5py.File(path, "a") as f:
        del f["modules"]
        f["modules"] = np.zeros(3)
    t = _table(run_dir)
    row = t[t["step"] == 2].iloc[0]
    assert row["status"] == "unreadable" and "step_000002.h5" in row["error"] and "/modules" in row["error"]
    assert _status(t, 1) == _status(t, 3) == {"ok"}


def test_a_fifo_named_like_a_delta_file_does_not_hang(run_dir):
    os.mkfifo(run_dir / "deltas" / "step_000004.h5")
    with _deadline(60):
        t = _table(run_dir)
    row = t[t["step"] == 4].iloc[0]
    assert row["status"] == "unreadable" and "not a regular file" in row["error"]


def test_a_file_under_another_steps_name_is_refused(run_dir):
    os.symlink(run_dir / "deltas" / "step_000001.h5", run_dir / "deltas" / "step_000007.h5")
    t = _table(run_dir)
    row = t[t["step"] == 7].iloc[0]
    assert row["status"] == "unreadable" and "says it is step 1" in row["error"]


def test_two_file_names_for_one_step_are_an_error(run_dir):
    shutil.copy(run_dir / "deltas" / "step_000003.h5", run_dir / "deltas" / "step_0000003.h5")
    t = _table(run_dir)
    row = t[t["step"] == 3].iloc[0]
    assert row["status"] == "unreadable" and "2 files claim step 3" in row["error"]
    assert _status(t, 1) == _status(t, 2) == {"ok"}


def test_a_module_stored_twice_is_an_error(run_dir):
    path = run_dir / "deltas" / "step_000002.h5"
    with h5py.File(path, "a") as f:
        f.copy(f["modules"][Q], f["modules"], name="copy_of_q")  # keeps the attribute name = Q
    t = _table(run_dir)
    assert "stored twice" in t[(t["step"] == 2) & (t["module"] == Q)].iloc[0]["error"]
    assert _status(t, 2, UP) == {"ok"}


def test_non_finite_metrics_are_flagged_not_ok(run_dir):
    w = RunWriter(run_dir)
    w.write_delta(
        5,
        {
            Q: LowRank(1e160 * torch.ones(24, 1, dtype=torch.float64), torch.ones(1, 20), 1.0),
            UP: Dense(torch.zeros(32, 20)),
        },
    )
    t = _table(run_dir)
    row = t[(t["step"] == 5) & (t["module"] == Q)].iloc[0]
    assert row["status"] == "nonfinite" and "stable_rank" in row["error"]


def test_a_flipped_data_bit_is_a_corrupt_error(run_dir):
    path = run_dir / "deltas" / "step_000002.h5"
    with h5py.File(path) as f:
        offset = f["modules"][UP]["delta"].id.get_chunk_info(0).byte_offset
    data = bytearray(path.read_bytes())
    data[offset + 40] ^= 0x10
    path.write_bytes(bytes(data))
    t = _table(run_dir)
    row = t[(t["step"] == 2) & (t["module"] == UP)].iloc[0]
    assert row["status"] == "unreadable" and "corrupt" in row["error"]


def test_files_without_checksums_still_read(run_dir):
    path = run_dir / "deltas" / "step_000002.h5"
    before = _table(run_dir)
    with h5py.File(path, "a") as f:  # as written by spectra 0.1: no fletcher32, no attribute checksum
        for name in (Q, UP):
            g = f["modules"][name]
            del g.attrs[ATTRS_CHECKSUM]
            for key in list(g):
                data, attrs = g[key][()], dict(g[key].attrs)
                del g[key]
                g.create_dataset(key, data=data).attrs.update(attrs)
    after = _table(run_dir)
    pd.testing.assert_frame_equal(after, before)


def test_bad_metrics_jsonl_rows_are_skipped_with_the_file_named(run_dir):
    w = RunWriter(run_dir)
    w.append_metrics({"step": 1, "reward": 0.5})
    with open(run_dir / "metrics.jsonl", "ab") as fh:
        fh.write(b'{"step": "abc", "reward": 0.1}\n')
        fh.write(b'{"step": 2, "reward": 0.2, "note": "\xff\xfe"}\n')
        fh.write(b'{"step": 3, "reward": 0.3}\n')
    with pytest.warns(UserWarning, match=r"metrics\.jsonl: skipped 2 unreadable line\(s\): \[2, 3\]"):
        a = analyze_run(run_dir, spectra.EngineConfig(**FAST), save=False)
    assert a.logs["step"].tolist() == [1, 3]


def test_leftover_temporaries_are_removed_by_the_next_writer(run_dir):
    stale = run_dir / "deltas" / ".step_000009.h5.abc123.tmp"
    stale.write_bytes(b"half a file")
    RunWriter(run_dir).write_delta(9, {UP: Dense(torch.zeros(32, 20))})
    assert not stale.exists() and (run_dir / "deltas" / "step_000009.h5").exists()


# --------------------------------------------------------------------------------------------- fuzzing


@contextmanager
def _deadline(seconds: int):
    def fail(*_):
        raise TimeoutError(f"hung for {seconds} s")

    old = signal.signal(signal.SIGALRM, fail)
    signal.alarm(seconds)
    try:
        yield
    finally:
        signal.alarm(0)
        signal.signal(signal.SIGALRM, old)


def test_random_byte_damage_never_aborts_hangs_or_changes_a_number(run_dir, tmp_path):
    """Mutation fuzzing: damage one byte of a delta file at a time. The analysis must finish, keep the
    other steps, and for the damaged step either report a problem or give exactly the original numbers
    (damage that HDF5 never reads, such as free space)."""
    reference = _table(run_dir).set_index(["step", "module"])
    original = (run_dir / "deltas" / "step_000002.h5").read_bytes()
    rng = random.Random(0)
    outcomes = {"reported": 0, "unchanged": 0}
    for _ in range(120):
        damaged = bytearray(original)
        pos = rng.randrange(len(damaged))
        damaged[pos] ^= 1 << rng.randrange(8)
        (run_dir / "deltas" / "step_000002.h5").write_bytes(bytes(damaged))
        with _deadline(60):
            t = _table(run_dir).set_index(["step", "module"])
        assert set(t.loc[[1, 3], "status"]) == {"ok"}, pos
        rows = t.loc[2]
        if (rows["status"] != "ok").any() or len(rows) != 2:
            outcomes["reported"] += 1
            continue
        outcomes["unchanged"] += 1
        pd.testing.assert_frame_equal(rows, reference.loc[2], obj=f"byte {pos}")
    assert outcomes["reported"] > 10, outcomes
    (run_dir / "deltas" / "step_000002.h5").write_bytes(original)


def test_damaged_run_json_and_pointer_are_one_line_errors(run_dir):
    (run_dir / "run.json").write_bytes(b"\xff\xfe not utf-8")
    with pytest.raises(spectra.RunDirError, match=r"run\.json: not valid JSON"):
        spectra.load_run(run_dir)
    (run_dir / "run.json").write_text(json.dumps({"schema_version": 1}))
    assert spectra.load_run(run_dir).steps == [1, 2, 3]


# ------------------------------------------------------------------ issue 22: no silent damage


def _chunked_lora_run(path):
    """A run whose LoRA factors span several chunks (so that they have a chunk index: a B-tree)."""
    shapes = {Q: (512, 512)}
    w = RunWriter(path)
    w.write_config({"name": "run"})
    w.write_base_weights(base_weights(shapes))
    g = torch.Generator().manual_seed(1)
    w.write_delta(1, {Q: LowRank(torch.randn(512, 16, generator=g), torch.randn(16, 512, generator=g), 2.0)})
    return w.path / "deltas" / "step_000001.h5"


def test_a_damaged_chunk_index_is_an_error_not_zeros(tmp_path):
    """Issue 22 §1: a flipped byte in the B-tree node indexing a factor's chunks made HDF5 return the
    fill value (zeros) for the chunks it could no longer find, with no error. Every flip of that node's
    bytes must read as the stored numbers or as a named error; at least one of them is the hazard
    (HDF5 alone reads other numbers without a word)."""
    path = _chunked_lora_run(tmp_path / "run")
    original = path.read_bytes()
    with DeltaFile(path) as d:
        stored = d.read(Q)
    with h5py.File(path) as f:
        ds = f["modules"][Q]["A"]
        assert ds.id.get_num_chunks() > 1
        first = ds.id.get_chunk_info(0).byte_offset
    node = original.rfind(b"TREE", 0, first)  # the chunk B-tree node: it holds the chunk's address
    assert node >= 0 and original.find(first.to_bytes(8, "little"), node) < first
    hazards = named = 0
    for pos in range(node + 24, node + 24 + 5 * 40):  # the keys and child addresses of its entries
        damaged = bytearray(original)
        damaged[pos] ^= 0x04
        path.write_bytes(bytes(damaged))
        try:
            with h5py.File(path) as f:  # HDF5 alone (no checksum of the whole array)
                raw = torch.from_numpy(f["modules"][Q]["A"][()])
            hazards += not torch.equal(raw, stored.tensors["A"])
        except Exception:
            pass
        try:
            with DeltaFile(path) as d:
                rec = d.read(Q)
        except spectra.DeltaFileError as e:
            named += 1
            assert "step_000001.h5" in str(e) and Q in str(e)
            continue
        assert all(torch.equal(rec.tensors[k], stored.tensors[k]) for k in stored.tensors), pos
    assert hazards > 0 and named >= hazards, (hazards, named)


def test_a_missing_chunk_in_a_file_without_crc32_is_an_error(tmp_path):
    """Files written before the crc32 attribute: a chunk the index has lost is still an error."""
    path = _chunked_lora_run(tmp_path / "run")
    with h5py.File(path, "a") as f:
        g = f["modules"][Q]
        data, attrs = g["A"][()], dict(g["A"].attrs)
        del g["A"]
        ds = g.create_dataset("A", shape=data.shape, dtype=data.dtype, chunks=(8, 256), fletcher32=True)
        ds[:8] = data[:8]  # the other chunks never written: HDF5 reads them as zeros
        ds.attrs.update({k: v for k, v in attrs.items() if k != "crc32"})
    with h5py.File(path) as f:
        assert (f["modules"][Q]["A"][8:] == 0).all()  # what HDF5 alone gives
    with pytest.raises(spectra.DeltaFileError, match=r"chunk index lists 2 chunk\(s\) of the 4"):
        with DeltaFile(path) as d:
            d.read(Q)


def test_a_module_missing_from_one_step_is_a_row_and_info_says_so(run_dir):
    from spectra.cli.main import app
    from typer.testing import CliRunner

    with h5py.File(run_dir / "deltas" / "step_000002.h5", "a") as f:
        del f["modules"][UP]
    t = _table(run_dir)
    row = t[(t["step"] == 2) & (t["module"] == UP)]
    assert len(row) == 1 and row.iloc[0]["status"] == "missing"
    assert "step_000002.h5" in row.iloc[0]["error"] and UP in row.iloc[0]["error"]
    assert _status(t, 2, Q) == {"ok"} and _status(t, 1) == _status(t, 3) == {"ok"}
    out = CliRunner().invoke(app, ["info", str(run_dir)])
    assert out.exit_code == 0, out.output
    assert "incomplete steps: [2]" in out.output and UP in out.output and "modules: 2" in out.output


def test_a_lost_module_of_a_single_step_is_named_from_the_files_count(tmp_path):
    w = RunWriter(tmp_path / "run")
    w.write_config({"name": "run"})
    w.write_base_weights(base_weights(SHAPES))
    w.write_delta(1, {Q: LowRank(torch.ones(24, 2), torch.ones(2, 20), 1.0), UP: Dense(torch.ones(32, 20))})
    with h5py.File(w.path / "deltas" / "step_000001.h5", "a") as f:
        del f["modules"][Q]
    gaps = spectra.load_run(w.path).incomplete_steps()
    assert list(gaps) == [1] and [m for m, _ in gaps[1]] == [Q]
    w.write_base_weights({**base_weights(SHAPES), "extra": torch.ones(4, 4)})  # base names 3: cannot say
    (gap,) = spectra.load_run(w.path).incomplete_steps()[1]
    assert gap[0] is None and "written with 2 module(s) but holds 1" in gap[1]


def test_a_factor_of_a_non_floating_type_is_a_named_error(run_dir):
    from spectra.h5io import write_tensor

    path = run_dir / "deltas" / "step_000002.h5"
    with h5py.File(path, "a") as f:  # a B factor stored (and labelled) as bool: a valid-looking dataset
        g = f["modules"][Q]
        B = g["B"][()]
        del g["B"]
        write_tensor(g, "B", torch.from_numpy(B) > 0)
    t = _table(run_dir)
    row = t[(t["step"] == 2) & (t["module"] == Q)].iloc[0]
    assert row["status"] == "unreadable" and "dataset 'B' has dtype bool" in row["error"]
    assert "step_000002.h5" in row["error"] and _status(t, 2, UP) == {"ok"}
    with pytest.raises(TypeError, match="module 'x': dataset 'delta' has dtype int64"):
        RunWriter(run_dir).write_delta(9, {"x": Dense(torch.ones(3, 3, dtype=torch.int64))})


def test_an_unreadable_reward_log_is_said_and_gives_no_rewards(run_dir):
    rows = "".join(json.dumps({"step": s, "reward": 0.5}) + "\n" for s in range(1, 4))
    (run_dir / "metrics.jsonl").write_bytes(rows.encode("utf-16"))  # not UTF-8
    with pytest.warns(UserWarning, match=r"metrics\.jsonl: skipped \d+ unreadable"):
        a = analyze_run(run_dir, spectra.EngineConfig(**FAST), save=False)
    line = [p for p in a.problems if "metrics.jsonl" in p]
    assert len(line) == 1 and "could not be read" in line[0] and "no reward" in line[0]
    assert line[0] in a.summary["problems"]
    assert spectra.load_run(run_dir).rewards is None


def test_deltas_as_a_file_is_said_as_such(run_dir):
    shutil.rmtree(run_dir / "deltas")
    (run_dir / "deltas").write_text("not a folder")
    with pytest.raises(spectra.RunDirError, match=r"deltas: not a folder"):
        analyze_run(run_dir, spectra.EngineConfig(**FAST), save=False)


@pytest.mark.parametrize("content", [b"this is junk\n{\"a\": 1\n", bytes(random.Random(0).randbytes(4000))])
def test_a_junk_dataset_file_is_exactly_one_line(tmp_path, capfd, content):
    from spectra.train.config import TrainConfigError
    from spectra.train.data import load_rows

    path = tmp_path / ("junk.jsonl" if content.startswith(b"this") else "junk.parquet")
    path.write_bytes(content)
    capfd.readouterr()
    with pytest.raises(TrainConfigError) as err:
        load_rows(str(path))
    captured = capfd.readouterr()
    assert captured.out == "" and captured.err == "", captured  # nothing from the datasets library
    message = str(err.value)
    assert "\n" not in message and message.startswith(f"--dataset {path}: could not be read")


def test_rewards_of_malformed_completions_are_zero_and_unparsable():
    from spectra.train.rewards import REWARD_COUNTS, accuracy_reward, format_reward

    before = dict(REWARD_COUNTS)
    malformed = [5, None, b"\\boxed{3}", [1, 2], {"role": "assistant", "content": 7}, "no box"]
    assert accuracy_reward(malformed, answer=["3"] * 6) == [0.0] * 6
    assert format_reward(malformed) == [0.0] * 6
    assert REWARD_COUNTS["completions"] - before["completions"] == 6
    assert REWARD_COUNTS["unparsable"] - before["unparsable"] == 6
    assert REWARD_COUNTS["malformed"] - before["malformed"] == 4
