"""Each ΔW operator against its method's formula, and the factored products against dense ones."""

from __future__ import annotations

import pytest
import torch

from spectra.operators import Dense, DoRA, LowRank, Scaled, VectorDelta, stack

m, n, r = 12, 9, 3


def rnd(gen, *shape):
    return torch.randn(*shape, generator=gen, dtype=torch.float64)


def test_lora_is_scaled_product(gen):
    B, A = rnd(gen, m, r), rnd(gen, r, n)
    op = LowRank(B, A, scale=64 / 32)
    torch.testing.assert_close(op.to_dense(), 2.0 * B @ A)
    assert op.shape == (m, n)


def test_pissa_difference_is_a_rank_2r_factored_operator(gen):
    B, A, B0, A0 = rnd(gen, m, r), rnd(gen, r, n), rnd(gen, m, r), rnd(gen, r, n)
    op = LowRank(B, A, 0.5, B0=B0, A0=A0)
    L, R = op.factors()
    assert L.shape == (m, 2 * r) and R.shape == (2 * r, n)
    torch.testing.assert_close(op.to_dense(), 0.5 * (B @ A - B0 @ A0))
    assert op.rank_bound == 2 * r


def test_adalora_and_vera_vectors(gen):
    B, A, lam, mask = (
        rnd(gen, m, r),
        rnd(gen, r, n),
        rnd(gen, r),
        torch.tensor([1.0, 0.0, 1.0], dtype=torch.float64),
    )
    ada = LowRank(B, A, 2.0 / 3, mid=lam * mask)
    torch.testing.assert_close(ada.to_dense(), B @ torch.diag(lam * mask) @ A * 2.0 / 3)
    lb, ld = rnd(gen, m), rnd(gen, r)
    vera = LowRank(B, A, mid=ld, row=lb)
    torch.testing.assert_close(vera.to_dense(), torch.diag(lb) @ B @ torch.diag(ld) @ A)


def test_dora_rebuilds_magnitude_times_direction(gen):
    w0, B, A = rnd(gen, m, n), rnd(gen, m, r), rnd(gen, r, n)
    mag = rnd(gen, m).abs() + 0.5
    op = DoRA(w0, mag, B, A, scale=2.0)
    direct = w0 + 2.0 * B @ A
    w_new = mag[:, None] * direct / direct.norm(dim=1, keepdim=True)
    torch.testing.assert_close(op.to_dense(), w_new - w0)
    # with m equal to W0's row norms and B = 0, DoRA starts at ΔW = 0
    zero = DoRA(w0, w0.norm(dim=1), torch.zeros(m, r, dtype=torch.float64), A, 2.0)
    assert zero.to_dense().abs().max().item() < 1e-12
    assert op.needs_w0 and op.factors() is None


def test_ia3_rows_and_columns(gen):
    w0 = rnd(gen, m, n)
    l_out, l_in = rnd(gen, m), rnd(gen, n)
    torch.testing.assert_close(Scaled(w0, l_out, "row").to_dense(), w0 * (l_out[:, None] - 1))
    torch.testing.assert_close(Scaled(w0, l_in, "column").to_dense(), w0 * (l_in[None, :] - 1))
    with pytest.raises(ValueError, match="axis"):
        Scaled(w0, l_in, "diagonal")  # type: ignore[arg-type]


def test_projections_and_frobenius_agree_between_factored_and_dense(gen):
    op = LowRank(rnd(gen, 2, m, r), rnd(gen, 2, r, n), 1.5, B0=rnd(gen, 2, m, r), A0=rnd(gen, 2, r, n))
    dense = Dense(op.to_dense())
    U, V = rnd(gen, 2, m, 4), rnd(gen, 2, n, 4)
    torch.testing.assert_close(op.left_project(U), dense.left_project(U))
    torch.testing.assert_close(op.right_project(V), dense.right_project(V))
    torch.testing.assert_close(op.frobenius_sq(), dense.frobenius_sq())


def test_mismatched_factors_are_refused(gen):
    with pytest.raises(ValueError, match="same r"):
        LowRank(rnd(gen, m, r), rnd(gen, r + 1, n))
    with pytest.raises(ValueError, match="B0 and A0"):
        LowRank(rnd(gen, m, r), rnd(gen, r, n), B0=rnd(gen, m, r))


def test_stack_keeps_factored_form_and_falls_back_to_dense(gen):
    ops = [LowRank(rnd(gen, m, r), rnd(gen, r, n), 2.0) for _ in range(3)]
    st = stack(ops)
    assert isinstance(st, LowRank) and st.shape == (3, m, n)
    torch.testing.assert_close(st.to_dense(), torch.stack([o.to_dense() for o in ops]))
    mixed = stack([ops[0], Dense(rnd(gen, m, n))])
    assert isinstance(mixed, Dense) and mixed.shape == (2, m, n)


def test_finiteness_and_device_moves(gen):
    op = LowRank(rnd(gen, m, r), rnd(gen, r, n))
    assert op.is_finite()
    bad = rnd(gen, m, n)
    bad[0, 0] = float("nan")
    assert not Dense(bad).is_finite()
    assert not VectorDelta(torch.tensor([1.0, float("inf")])).is_finite()
    f32 = op.to("cpu", torch.float32)
    assert f32.B.dtype == torch.float32 and f32.scale == op.scale
