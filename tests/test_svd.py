"""The SVD engine's kernels against float64 LAPACK references."""

from __future__ import annotations

import pytest
import torch

from spectra.svd import batched_eigh, dense_svd, dense_svdvals_reference, factored_svd, randomized_topk
from spectra.synthetic import with_spectrum


def hard_spectra(p: int) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(3)
    return {
        "log-decay to 1e-8": torch.logspace(0, -8, p, dtype=torch.float64),
        "tight cluster at 1e-6": torch.cat(
            [
                torch.ones(5, dtype=torch.float64),
                1e-6 * (1 + 1e-3 * torch.rand(p - 5, generator=g, dtype=torch.float64)),
            ]
        ),
        "repeated values": torch.cat([torch.full((p // 2,), 2.0), torch.full((p - p // 2,), 1e-3)]).double(),
        "rank deficient": torch.cat([torch.linspace(3, 1, p // 3), torch.zeros(p - p // 3)]).double(),
    }


@pytest.mark.parametrize("shape", [(90, 60), (60, 90), (64, 64)])
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
def test_dense_svd_meets_the_accuracy_contract(shape, dtype):
    """Singular values above 1e-6·σ₁ within 1e-6 relative of a float64 reference."""
    m, n = shape
    g = torch.Generator().manual_seed(0)
    for name, s in hard_spectra(min(m, n)).items():
        X = with_spectrum(s, m, n, generator=g)[0].to(dtype)
        ref = dense_svdvals_reference(X)
        got = dense_svd(X.unsqueeze(0)).S[0]
        keep = ref > 1e-6 * ref[0]
        rel = ((got - ref).abs() / ref)[keep].max().item()
        assert rel < 1e-6, f"{name} {shape} {dtype}: max relative error {rel:.2e}"


def test_dense_svd_vectors_reconstruct_the_top_part(gen):
    X = torch.randn(3, 50, 30, generator=gen, dtype=torch.float64)
    r = dense_svd(X, k=30)
    torch.testing.assert_close(r.U @ torch.diag_embed(r.S) @ r.V.mT, X, rtol=1e-10, atol=1e-10)
    torch.testing.assert_close(
        r.U.mT @ r.U, torch.eye(30, dtype=torch.float64).expand(3, 30, 30), atol=1e-10, rtol=0
    )
    wide = dense_svd(X.mT, k=4)  # transposed path: U and V swap
    torch.testing.assert_close(
        (wide.U.mT @ X.mT @ wide.V).diagonal(dim1=-2, dim2=-1), r.S[:, :4], rtol=1e-10, atol=1e-12
    )


def test_dense_svd_accepts_unbatched_input(gen):
    X = torch.randn(20, 10, generator=gen, dtype=torch.float64)
    torch.testing.assert_close(dense_svd(X).S, torch.linalg.svdvals(X), rtol=1e-12, atol=1e-12)


def test_factored_svd_equals_dense_and_never_needs_the_product(gen):
    b, m, n, r = 4, 200, 150, 6
    L = torch.randn(b, m, r, generator=gen, dtype=torch.float64)
    R = torch.randn(b, r, n, generator=gen, dtype=torch.float64)
    res = factored_svd(L, R)
    assert res.S.shape == (b, r)
    torch.testing.assert_close(res.S, torch.linalg.svdvals(L @ R)[:, :r], rtol=1e-10, atol=1e-12)
    torch.testing.assert_close(res.U @ torch.diag_embed(res.S) @ res.V.mT, L @ R, rtol=1e-9, atol=1e-10)


def test_factored_svd_of_rank_deficient_factors(gen):
    L = torch.randn(40, 2, generator=gen, dtype=torch.float64)
    L = torch.cat([L, L[:, :1] * 3], dim=1)  # 3 columns, rank 2
    R = torch.randn(3, 30, generator=gen, dtype=torch.float64)
    s = factored_svd(L, R).S
    torch.testing.assert_close(s, torch.linalg.svdvals(L @ R)[:3], rtol=1e-9, atol=1e-10)
    assert s[-1].item() < 1e-10 * s[0].item()


def test_randomized_topk_finds_the_top_subspace(gen):
    s = torch.cat([torch.tensor([50.0, 40.0, 30.0, 20.0, 10.0]), torch.linspace(1.0, 0.1, 95)]).double()
    X, U, _V = with_spectrum(s, 120, 100, generator=gen)
    r = randomized_topk(X.unsqueeze(0), k=5)
    torch.testing.assert_close(r.S[0], s[:5], rtol=1e-8, atol=0)
    cos = (U[:, :5].T @ r.U[0]).abs().diagonal()
    assert cos.min().item() > 1 - 1e-8


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
@pytest.mark.parametrize("streams", [1, 3, 8])
def test_batched_eigh_on_streams_matches_one_by_one(streams):
    g = torch.Generator().manual_seed(streams)
    X = torch.randn(7, 96, 64, generator=g, dtype=torch.float64).cuda()
    G = X.mT @ X
    L, V = batched_eigh(G, streams=streams)
    L_ref = torch.stack([torch.linalg.eigh(G[i].cpu()).eigenvalues for i in range(7)])
    torch.testing.assert_close(L.cpu(), L_ref, rtol=1e-10, atol=1e-10)
    # eigenvectors up to sign: G V = V diag(L), V orthonormal
    torch.testing.assert_close(G @ V, V * L.unsqueeze(-2), rtol=1e-9, atol=1e-9)
    torch.testing.assert_close(V.mT @ V, torch.eye(64, dtype=torch.float64, device="cuda").expand(7, -1, -1))


def test_batched_eigh_on_cpu_is_plain_eigh():
    X = torch.randn(3, 20, 12, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    G = X.mT @ X
    L, V = batched_eigh(G, streams=4)
    torch.testing.assert_close(L, torch.linalg.eigh(G).eigenvalues)
    torch.testing.assert_close(G @ V, V * L.unsqueeze(-2))


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
@pytest.mark.parametrize("solver", ["syevd", "batched", "auto"])
def test_cuda_eigensolvers_meet_the_accuracy_contract(solver, monkeypatch):
    """dense_svd on CUDA with each way of diagonalising a batch (the batched cuSOLVER solver needs
    nvmath-python, the `gpu` extra): σ above 1e-6·σ₁ within 1e-6 relative of float64 LAPACK."""
    import spectra.svd as svd

    if solver == "batched" and not svd.xsyev_batched_available():
        pytest.skip("nvmath-python is not installed (the gpu extra)")
    monkeypatch.setattr(svd, "EIGH_SOLVER", solver)
    monkeypatch.setattr(svd, "EIGH_CHOICE", {})
    g = torch.Generator().manual_seed(5)
    m, n = 90, 60
    spectra = hard_spectra(n)
    X = torch.stack([with_spectrum(s, m, n, generator=g)[0] for s in spectra.values()])
    got = dense_svd(X.cuda()).S.cpu()
    for i, name in enumerate(spectra):
        ref = dense_svdvals_reference(X[i])
        keep = ref > 1e-6 * ref[0]
        rel = ((got[i] - ref).abs() / ref)[keep].max().item()
        assert rel < 1e-6, f"{solver} {name}: max relative error {rel:.2e}"
    if solver == "batched":  # and the eigenpairs themselves
        G = (X.mT @ X).cuda()
        L, V = svd.xsyev_batched(G)
        torch.testing.assert_close(G @ V, V * L.unsqueeze(-2), rtol=1e-9, atol=1e-9)
    if solver == "auto":
        assert set(svd.EIGH_CHOICE.values()) <= {"syevd", "batched"} and svd.EIGH_CHOICE
