"""The run store: round trips of every stored form, atomic writes, and bad input."""

from __future__ import annotations

import json
import os

import h5py
import numpy as np
import pytest
import torch

import spectra
from spectra.errors import DeltaFileError, RunDirError, ShapeMismatchError
from spectra.h5io import ATTRS_CHECKSUM, atomic_path, attrs_checksum
from spectra.operators import Dense, DoRA, LowRank, Scaled, VectorDelta
from spectra.writer import RunWriter

m, n, r = 10, 8, 2


@pytest.fixture
def writer(tmp_path, gen):
    w = RunWriter(tmp_path / "run")
    w.write_config({"model": "tiny", "method": "mixed"})
    w.write_base_weights(
        {
            "a.q": torch.randn(m, n, generator=gen),
            "a.k": torch.randn(m, n, generator=gen),
            "a.d": torch.randn(m, n, generator=gen),
            "a.i": torch.randn(m, n, generator=gen),
            "a.v": torch.randn(m, n, generator=gen),
            "a.norm": torch.ones(n),
        }
    )
    return w


def rnd(gen, *shape, dtype=torch.float32):
    return torch.randn(*shape, generator=gen, dtype=dtype)


def test_every_form_round_trips(writer, gen):
    run0 = spectra.load_run(writer.path)
    ops = {
        "a.q": LowRank(
            rnd(gen, m, r), rnd(gen, r, n), 2.0, mid=rnd(gen, r), B0=rnd(gen, m, r), A0=rnd(gen, r, n)
        ),
        "a.k": Dense(rnd(gen, m, n, dtype=torch.bfloat16)),
        "a.d": DoRA(run0.w0("a.d"), rnd(gen, m).abs(), rnd(gen, m, r), rnd(gen, r, n), 0.5),
        "a.i": Scaled(run0.w0("a.i"), rnd(gen, n), "column"),
        "a.norm": VectorDelta(rnd(gen, n)),
    }
    writer.write_delta(7, ops)
    run = spectra.load_run(writer.path)
    assert run.steps == [7]
    assert set(run.modules) == {"a.q", "a.k", "a.d", "a.i", "a.v", "a.norm"}
    for name, op in ops.items():
        got = run.delta(7, name)
        assert type(got) is type(op)
        if isinstance(op, VectorDelta):
            torch.testing.assert_close(got.delta, op.delta)
        else:
            torch.testing.assert_close(got.to_dense(), op.to_dense())
    assert run.delta(7, "a.k").delta.dtype == torch.bfloat16


def test_vera_shared_matrices_are_stored_once_by_reference(writer, gen):
    shared_B, shared_A = rnd(gen, 16, r), rnd(gen, r, 12)
    ops = {
        name: LowRank(shared_B[:m], shared_A[:, :n], 1.0, mid=rnd(gen, r), row=rnd(gen, m))
        for name in ("a.q", "a.v")
    }
    path = writer.write_delta(3, ops, shared={"vera_B": shared_B, "vera_A": shared_A})
    with h5py.File(path) as f:
        assert "B" not in f["modules/a.q"] and f["modules/a.q"].attrs["B_ref"] == "/shared/vera_B"
        assert f["shared/vera_B"].shape == (16, r)
    run = spectra.load_run(writer.path)
    for name, op in ops.items():
        torch.testing.assert_close(run.delta(3, name).to_dense(), op.to_dense())


def test_interrupted_write_leaves_previous_file_and_no_temporary(writer, gen, monkeypatch):
    good = {"a.q": Dense(rnd(gen, m, n))}
    path = writer.write_delta(5, good)
    before = path.read_bytes()

    class Boom(RuntimeError):
        pass

    def explode(*a, **k):
        raise Boom("killed mid-write")

    monkeypatch.setattr("spectra.writer._write_record", explode)
    with pytest.raises(Boom):
        writer.write_delta(5, good)
    with pytest.raises(Boom):
        writer.write_delta(6, good)
    assert path.read_bytes() == before
    assert sorted(os.listdir(path.parent)) == ["step_000005.h5"]


def test_atomic_path_cleans_up_on_failure(tmp_path):
    target = tmp_path / "x.json"
    with pytest.raises(ValueError), atomic_path(target) as tmp:
        tmp.write_text("partial")
        raise ValueError
    assert list(tmp_path.iterdir()) == []


def test_truncated_and_missing_files_are_clear_errors(writer, gen):
    path = writer.write_delta(1, {"a.q": Dense(rnd(gen, m, n))})
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 3])
    run = spectra.load_run(writer.path)
    with pytest.raises(DeltaFileError, match=r"step_000001\.h5: not a readable HDF5 file"):
        run.delta(1, "a.q")
    with pytest.raises(DeltaFileError, match="missing"):
        run.delta(2, "a.q")


def test_unknown_schema_version_is_refused(writer, gen):
    path = writer.write_delta(1, {"a.q": Dense(rnd(gen, m, n))})
    with h5py.File(path, "a") as f:
        f.attrs["schema_version"] = 99
    with pytest.raises(DeltaFileError, match="schema_version 99 is not supported"):
        spectra.load_run(writer.path).delta(1, "a.q")
    cfg = json.loads((writer.path / "run.json").read_text())
    (writer.path / "run.json").write_text(json.dumps({**cfg, "schema_version": 7}))
    with pytest.raises(RunDirError, match="schema_version 7"):
        spectra.load_run(writer.path)


def test_shape_mismatch_names_module_and_shapes(writer, gen):
    writer.write_delta(1, {"a.q": Dense(rnd(gen, n, m))})
    with pytest.raises(ShapeMismatchError, match=r"'a\.q' has ΔW of shape \(8, 10\) but W0 is \(10, 8\)"):
        spectra.load_run(writer.path).delta(1, "a.q")


def test_not_a_run_directory(tmp_path):
    with pytest.raises(RunDirError, match="not a directory"):
        spectra.load_run(tmp_path / "nope")
    with pytest.raises(RunDirError, match=r"no run\.json"):
        spectra.load_run(tmp_path)
    (tmp_path / "run.json").write_text("{not json")
    with pytest.raises(RunDirError, match="not valid JSON"):
        spectra.load_run(tmp_path)


def test_metrics_jsonl_with_a_torn_last_line(writer):
    for i in range(3):
        writer.append_metrics({"step": i, "reward": 0.1 * i})
    with open(writer.path / "metrics.jsonl", "a") as fh:
        fh.write('{"step": 3, "rew')
    with pytest.warns(UserWarning, match=r"metrics\.jsonl: skipped 1 unreadable line"):
        df = spectra.load_run(writer.path).metrics
    assert df["step"].tolist() == [0, 1, 2]
    assert df["reward"].tolist() == pytest.approx([0.0, 0.1, 0.2])
    assert spectra.load_run(writer.path).eval.empty
    # a resumed run appends after the torn line without gluing onto it
    writer.append_metrics({"step": 3, "reward": 0.3})
    writer.append_metrics({"step": 4, "reward": 0.4})
    with pytest.warns(UserWarning, match="skipped 1"):
        assert spectra.load_run(writer.path).metrics["step"].tolist() == [0, 1, 2, 3, 4]


def test_base_pointer_to_safetensors(tmp_path, gen):
    from safetensors.torch import save_file

    w = rnd(gen, m, n)
    save_file({"model.layers.0.q_proj.weight": w}, str(tmp_path / "model.safetensors"))
    writer = RunWriter(tmp_path / "run")
    writer.write_config({"model": str(tmp_path)})
    writer.write_base_pointer(
        [tmp_path / "model.safetensors"], {"model.layers.0.q_proj": "model.layers.0.q_proj.weight"}
    )
    run = spectra.load_run(writer.path)
    assert run.modules == ["model.layers.0.q_proj"]
    torch.testing.assert_close(run.w0("model.layers.0.q_proj"), w)
    (tmp_path / "model.safetensors").unlink()
    with pytest.raises(RunDirError, match="missing"):
        spectra.load_run(writer.path).w0("model.layers.0.q_proj")


def test_base_spectra_are_computed_once_and_cached(writer):
    run = spectra.load_run(writer.path)
    path = run.ensure_base_spectra(keep=4)
    mtime = path.stat().st_mtime_ns
    spec = run.base_spectrum("a.q")
    ref = torch.linalg.svdvals(run.w0("a.q").double())
    torch.testing.assert_close(spec.sigma, ref, rtol=1e-12, atol=1e-12)
    assert spec.U.shape == (m, 4) and spec.U_minor.shape == (m, 4)
    # minor vectors are stored smallest first
    w0 = run.w0("a.q").double()
    assert (spec.U_minor[:, 0].double() @ w0 @ spec.V_minor[:, 0].double()).abs().item() == pytest.approx(
        ref[-1].item(), rel=1e-5
    )
    assert run.ensure_base_spectra(keep=4) == path and path.stat().st_mtime_ns == mtime


def test_base_spectra_follow_a_rewritten_base(writer, gen):
    run = spectra.load_run(writer.path)
    before = run.base_spectrum("a.q").sigma
    tripled = {name: 3 * run.w0(name) for name in run.modules}
    writer.write_base_weights(tripled)  # W0 rewritten (a new run in the same folder, a repaired file)
    again = spectra.load_run(writer.path)
    torch.testing.assert_close(again.base_spectrum("a.q").sigma, 3 * before, rtol=1e-6, atol=0)


def test_file_is_readable_with_plain_h5py_as_documented(writer, gen):
    """docs/format.md: a reader without spectra rebuilds ΔW = scale·B·A from the datasets."""
    B, A = rnd(gen, m, r), rnd(gen, r, n)
    path = writer.write_delta(4, {"a.q": LowRank(B, A, 3.0)})
    with h5py.File(path) as f:
        assert (
            f.attrs["format"] == "spectra-delta" and f.attrs["schema_version"] == 1 and f.attrs["step"] == 4
        )
        g = f["modules"]["a.q"]
        assert g.attrs["kind"] == "lowrank" and list(g.attrs["shape"]) == [m, n]
        dw = g.attrs["scale"] * np.asarray(g["B"]) @ np.asarray(g["A"])
        assert g["B"].attrs["dtype"] == "float32"
    np.testing.assert_allclose(dw, (3.0 * B @ A).numpy(), rtol=1e-5)


def test_written_files_get_the_usual_permissions(writer, gen):
    path = writer.write_delta(1, {"a.q": Dense(rnd(gen, m, n))})
    mask = os.umask(0)
    os.umask(mask)
    assert path.stat().st_mode & 0o777 == 0o666 & ~mask
    assert (writer.path / "run.json").stat().st_mode & 0o777 == 0o666 & ~mask


def _consistent_attrs(g):
    """After an edit: the group's attribute checksum as a (buggy) writer would have written it."""
    g.attrs[ATTRS_CHECKSUM] = attrs_checksum(g)


def test_inconsistent_datasets_are_a_clear_error(writer, gen):
    path = writer.write_delta(1, {"a.q": LowRank(rnd(gen, m, r), rnd(gen, r, n), mid=rnd(gen, r))})
    with h5py.File(path, "a") as f:
        del f["modules/a.q/mid"]
        f["modules/a.q"].create_dataset("mid", data=np.ones(r + 1, np.float32))
    with pytest.raises(DeltaFileError, match=r"'a\.q' is damaged: LowRank: mid has shape \(3,\)"):
        spectra.load_run(writer.path).delta(1, "a.q")
    path = writer.write_delta(2, {"a.q": LowRank(rnd(gen, m + 1, r), rnd(gen, r, n))})
    with h5py.File(path, "a") as f:
        f["modules/a.q"].attrs["shape"] = [m, n]
        _consistent_attrs(f["modules/a.q"])
    with pytest.raises(DeltaFileError, match=r"declares shape \(10, 8\) but its datasets make \(11, 8\)"):
        spectra.load_run(writer.path).delta(2, "a.q")
    path = writer.write_delta(3, {"a.q": Dense(rnd(gen, m, n))})
    with h5py.File(path, "a") as f:
        del f["modules/a.q"].attrs["shape"]
        _consistent_attrs(f["modules/a.q"])
    with pytest.raises(DeltaFileError, match="lacks a readable shape"):
        spectra.load_run(writer.path).delta(3, "a.q")


def test_malformed_run_files_are_one_line_errors(writer, tmp_path):
    (writer.path / "run.json").write_text("[1, 2]")
    with pytest.raises(RunDirError, match="expected a JSON object"):
        spectra.load_run(writer.path)
    (writer.path / "run.json").write_text(json.dumps({"schema_version": "1"}))
    with pytest.raises(RunDirError, match="schema_version '1' is not supported"):
        spectra.load_run(writer.path)
    other = RunWriter(tmp_path / "ptr")
    other.write_config({})
    (other.path / "base").mkdir()
    (other.path / "base" / "pointer.json").write_text(json.dumps({"files": []}))
    with pytest.raises(RunDirError, match=r"pointer\.json: expected"):
        _ = spectra.load_run(other.path).modules
