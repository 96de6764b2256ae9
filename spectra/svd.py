"""The SVD engine's kernels: batched, exact where metrics need exactness, on CUDA when present.

Three ways to a spectrum, chosen by what the operator is and what the metric needs:

- :func:`factored_svd` — ΔW = L·R with L (m, ρ), R (ρ, n): QR of L and Rᵀ, SVD of the ρ×ρ core.
  O((m+n)ρ²) work, never forms the m×n matrix.
- :func:`dense_svd` — full spectrum of a dense batch. Gram matrix XᵀX in float64 and ``eigh`` give the
  right singular vectors V; singular values are then read off as column norms σ_i = ‖X v_i‖, which
  (unlike √λ_i) keeps full relative accuracy for small σ_i, because the Rayleigh quotient is stationary
  at eigenvectors: an eigenvector error δ changes ‖X v_i‖² only by O(δ²).
- :func:`randomized_topk` — top-k singular triplets by randomized subspace iteration, where only the
  top-k vectors are needed.

All functions take batched tensors (b, m, n) and return float64 results on the input's device.
"""

from __future__ import annotations

import os
from dataclasses import dataclass

import numpy as np
import torch
from torch import Tensor


@dataclass
class SVDResult:
    """Singular values S (b, p) in descending order; U (b, m, k) and V (b, n, k) for the first k of them
    (k may be smaller than p, or 0 when no vectors were asked for)."""

    S: Tensor
    U: Tensor
    V: Tensor


def default_device() -> torch.device:
    """CUDA when present, else CPU. (MPS has no float64, which the engine needs; it is not used.)"""
    return torch.device("cuda") if torch.cuda.is_available() else torch.device("cpu")


def factored_svd(L: Tensor, R: Tensor, k: int | None = None) -> SVDResult:
    """SVD of L @ R without forming it.

    L = Q₁R₁ and Rᵀ = Q₂R₂ (thin QR), so L·R = Q₁ (R₁R₂ᵀ) Q₂ᵀ; with the core's SVD R₁R₂ᵀ = Uc·S·Vcᵀ,
    U = Q₁Uc and V = Q₂Vc. Returns ρ = L.shape[-1] singular values (the rest are exactly zero) and the
    first ``k`` vectors (all ρ when k is None).
    """
    L64, R64 = L.to(torch.float64), R.to(torch.float64)
    Q1, R1 = torch.linalg.qr(L64)
    Q2, R2 = torch.linalg.qr(R64.mT)
    Uc, S, Vch = torch.linalg.svd(R1 @ R2.mT)
    k = S.shape[-1] if k is None else min(k, S.shape[-1])
    return SVDResult(S, Q1 @ Uc[..., :k], Q2 @ Vch.mT[..., :k])


EIGH_STREAMS = 4
#: How :func:`batched_eigh` diagonalises a batch on CUDA: "auto" (per matrix size, whichever of the two
#: was faster when first measured in this process), "syevd" (cuSOLVER's syevd, matrix after matrix on
#: several streams) or "batched" (cuSOLVER's ``cusolverDnXsyevBatched`` through nvmath-python, the
#: ``gpu`` extra; "syevd" where it is not installed).
EIGH_SOLVER = os.environ.get("SPECTRA_EIGH_SOLVER", "auto")
#: The solver "auto" measured fastest, by (device index, n, dtype); filled on first use of each size.
EIGH_CHOICE: dict[tuple[int, int, torch.dtype], str] = {}


def batched_eigh(G: Tensor, streams: int = EIGH_STREAMS, solver: str | None = None) -> tuple[Tensor, Tensor]:
    """``torch.linalg.eigh`` of every matrix of a batch G (b, p, p): eigenvalues ascending, eigenvectors.

    On CUDA, PyTorch's batched ``eigh`` calls cuSOLVER's ``syevd`` matrix after matrix above p = 32, and
    ``syevd`` leaves most of the GPU idle at the sizes of weight matrices (its tridiagonal reduction is a
    long chain of small kernels). Two ways around it (``solver``, default :data:`EIGH_SOLVER`): up to
    ``streams`` host threads, each with its own CUDA stream, take matrices in turn ("syevd"), or one
    call of cuSOLVER's batched solver for the whole batch ("batched", :func:`xsyev_batched`). "auto"
    times both once per size on a few of the batch's matrices and keeps the faster (:data:`EIGH_CHOICE`).
    Same results to rounding; on the CPU, for p ≤ 32 or a single matrix, this is plain ``eigh``.
    """
    solver = solver or EIGH_SOLVER
    if solver not in ("auto", "syevd", "batched"):
        raise ValueError(f"eigensolver {solver!r} (SPECTRA_EIGH_SOLVER): expected auto, syevd or batched")
    if G.ndim != 3 or G.device.type != "cuda" or G.shape[0] == 1 or G.shape[-1] <= 32:
        return torch.linalg.eigh(G)
    if solver == "auto":
        solver = _measured_choice(G, streams)
    if solver == "batched" and xsyev_batched_available():
        try:
            return xsyev_batched(G)
        except Exception:  # not converged, or the library refused: the proven path, from now on
            EIGH_CHOICE[_choice_key(G)] = "syevd"
    return _eigh_on_streams(G, streams)


def _eigh_on_streams(G: Tensor, streams: int) -> tuple[Tensor, Tensor]:
    """``eigh`` of each matrix of a CUDA batch, ``streams`` matrices at a time on their own streams."""
    if streams <= 1:
        return torch.linalg.eigh(G)
    from concurrent.futures import ThreadPoolExecutor

    b = G.shape[0]
    L = torch.empty(G.shape[:-1], dtype=G.dtype, device=G.device)
    V = torch.empty_like(G)
    # The first one on this thread: PyTorch loads its CUDA solver lazily, once per process, and two
    # threads racing to do it fail ("lazy wrapper should be called at most once").
    torch.linalg.eigh(G[0], out=(L[0], V[0]))
    main = torch.cuda.current_stream(G.device)
    side = [torch.cuda.Stream(G.device) for _ in range(min(streams, b - 1))]

    inference = torch.is_inference_mode_enabled()  # threads do not inherit the caller's modes
    grad = torch.is_grad_enabled()

    def work(j: int) -> None:
        stream = side[j]
        stream.wait_stream(main)  # G, L and V were made on the main stream
        with (
            torch.inference_mode(inference), torch.set_grad_enabled(grad),
            torch.cuda.device(G.device), torch.cuda.stream(stream),
        ):  # fmt: skip
            for i in range(1 + j, b, len(side)):
                torch.linalg.eigh(G[i], out=(L[i], V[i]))

    try:
        with ThreadPoolExecutor(len(side)) as pool:
            list(pool.map(work, range(len(side))))
    finally:  # also on error: nothing frees L and V while a side stream may still write them
        for stream in side:
            main.wait_stream(stream)
    return L, V


def xsyev_batched_available() -> bool:
    """Whether nvmath-python's cuSOLVER bindings can be imported (the ``gpu`` extra)."""
    global _NVMATH_OK
    if _NVMATH_OK is None:
        try:
            import nvmath.bindings.cusolverDn  # noqa: F401

            _NVMATH_OK = True
        except Exception:  # not installed, or built for another CUDA: the syevd path
            _NVMATH_OK = False
    return _NVMATH_OK


_NVMATH_OK: bool | None = None
_HANDLES: dict[int, tuple[int, int]] = {}  # device index → (cuSOLVER handle, params), made once


def xsyev_batched(G: Tensor) -> tuple[Tensor, Tensor]:
    """Eigenvalues (ascending) and eigenvectors of a CUDA batch of symmetric float32/float64 matrices by
    cuSOLVER's ``cusolverDnXsyevBatched`` (nvmath-python's binding), on the current stream.

    cuSOLVER reads column-major matrices: a symmetric G reads the same either way, and the eigenvector
    matrix it writes over its copy A comes back transposed, V = Aᵀ. Batches are cut so that n²·batch
    stays below 2³¹ (the routine's limit). Raises RuntimeError if any matrix did not converge."""
    from nvmath import CudaDataType
    from nvmath.bindings import cublas, cusolver
    from nvmath.bindings import cusolverDn as dn

    kind = {torch.float64: CudaDataType.CUDA_R_64F, torch.float32: CudaDataType.CUDA_R_32F}[G.dtype]
    b, n = G.shape[0], G.shape[-1]
    index = G.device.index if G.device.index is not None else torch.cuda.current_device()
    if index not in _HANDLES:
        with torch.cuda.device(index):
            _HANDLES[index] = (dn.create(), dn.create_params())
    handle, params = _HANDLES[index]
    stream = torch.cuda.current_stream(G.device)
    dn.set_stream(handle, stream.cuda_stream)
    A = G.contiguous().clone()  # overwritten with the eigenvectors
    W = torch.empty(b, n, dtype=G.dtype, device=G.device)
    info = torch.zeros(b, dtype=torch.int32, device=G.device)
    jobz, uplo = cusolver.EigMode.VECTOR, cublas.FillMode.LOWER
    per_call = max(1, (2**31 - 1) // (n * n))
    for s in range(0, b, per_call):
        k = min(per_call, b - s)
        a, w = A[s : s + k].data_ptr(), W[s : s + k].data_ptr()
        device_bytes, host_bytes = dn.xsyev_batched_buffer_size(
            handle, params, jobz, uplo, n, kind, a, n, kind, w, kind, k
        )
        work = torch.empty(max(device_bytes, 1), dtype=torch.uint8, device=G.device)
        host = np.empty(max(host_bytes, 1), dtype=np.uint8)
        dn.xsyev_batched(
            handle, params, jobz, uplo, n, kind, a, n, kind, w, kind,
            work.data_ptr(), device_bytes, host.ctypes.data, host_bytes, info[s:].data_ptr(), k,
        )  # fmt: skip
        if host_bytes:
            stream.synchronize()  # the host workspace must outlive the call
    if bool(info.ne(0).any()):
        bad = info[info.ne(0)][0].item()
        raise RuntimeError(f"cusolverDnXsyevBatched: info = {bad} for a batch of {n}×{n} matrices")
    return W, A.mT


def _measured_choice(G: Tensor, streams: int, sample: int = 8) -> str:
    """The faster solver for matrices of G's size (timed once per size on up to ``sample`` of them,
    each solver run once before it is timed), from :data:`EIGH_CHOICE` after the first time."""
    key = _choice_key(G)
    if key not in EIGH_CHOICE:
        if not xsyev_batched_available():
            EIGH_CHOICE[key] = "syevd"
        else:
            part = G[:sample]
            EIGH_CHOICE[key] = min(("syevd", "batched"), key=lambda s: _seconds(s, part, streams))
    return EIGH_CHOICE[key]


def _choice_key(G: Tensor) -> tuple[int, int, torch.dtype]:
    index = G.device.index if G.device.index is not None else torch.cuda.current_device()
    return index, G.shape[-1], G.dtype


def _seconds(solver: str, G: Tensor, streams: int) -> float:
    """Wall time of ``solver`` on the batch G, after one untimed call; inf if it fails."""
    import time

    run = xsyev_batched if solver == "batched" else lambda G: _eigh_on_streams(G, streams)
    try:
        for _ in range(2):
            torch.cuda.synchronize(G.device)
            start = time.perf_counter()
            run(G)
            torch.cuda.synchronize(G.device)
        return time.perf_counter() - start
    except Exception:
        return float("inf")


def dense_svd(X: Tensor, k: int = 0, tail: float = 1e-3, streams: int = EIGH_STREAMS) -> SVDResult:
    """Full spectrum of a dense batch X (b, m, n), and its first ``k`` singular vector pairs.

    Work in float64 on X's device: G = XᵀX (on the smaller side), G = V Λ Vᵀ by ``eigh``, then
    σ_i = ‖X v_i‖ and u_i = X v_i / σ_i. Where a matrix has singular values below ``tail``·σ₁, the tail
    is refined once more: the Gram matrix of X·V_tail (norm ≈ (tail·σ₁)² instead of σ₁²) is
    diagonalised again, so that close clusters of small singular values are resolved. Singular values
    above 1e-6·σ₁ agree with a float64 LAPACK SVD to better than 1e-6 relative (tested). On CUDA the
    eigendecompositions of a batch run on ``streams`` streams at once (:func:`batched_eigh`).
    """
    if X.ndim == 2:
        r = dense_svd(X.unsqueeze(0), k, tail, streams)
        return SVDResult(r.S[0], r.U[0], r.V[0])
    X64 = X.to(torch.float64).reshape(-1, *X.shape[-2:])
    transposed = X64.shape[-2] < X64.shape[-1]
    if transposed:
        X64 = X64.mT
    _, V = batched_eigh(X64.mT @ X64, streams)
    V = V.flip(-1)  # descending in λ
    Y = X64 @ V  # columns X v_i
    S = torch.linalg.vector_norm(Y, dim=-2)
    for i in _items_with_tail(S, tail):
        t = int((S[i] < tail * S[i].max()).sum())
        W = torch.linalg.eigh(Y[i, :, -t:].mT @ Y[i, :, -t:]).eigenvectors
        V[i, :, -t:] = V[i, :, -t:] @ W
        Y[i, :, -t:] = Y[i, :, -t:] @ W
        S[i, -t:] = torch.linalg.vector_norm(Y[i, :, -t:], dim=-2)
    S, order = torch.sort(S, dim=-1, descending=True)
    k = min(k, S.shape[-1])
    top = order[..., :k].unsqueeze(-2)
    Vk = torch.gather(V, -1, top.expand(*V.shape[:-1], k))
    Yk = torch.gather(Y, -1, top.expand(*Y.shape[:-1], k))
    Uk = Yk / S[..., :k].clamp_min(torch.finfo(torch.float64).tiny).unsqueeze(-2)
    _complete_null_columns(Uk, S[..., :k])
    batch = X.shape[:-2]
    S, Uk, Vk = S.reshape(*batch, -1), Uk.reshape(*batch, *Uk.shape[-2:]), Vk.reshape(*batch, *Vk.shape[-2:])
    return SVDResult(S, Vk, Uk) if transposed else SVDResult(S, Uk, Vk)


def _complete_null_columns(U: Tensor, S: Tensor, rtol: float = 1e-10) -> None:
    """In place: columns u_i = X v_i / σ_i with σ_i ≤ rtol·σ₁ are rounding noise; replace them by an
    orthonormal completion of the columns before them (any such basis is a valid set of singular
    vectors for a zero singular value, and it keeps the minor subspace orthogonal to the range)."""
    bad = S <= rtol * S[..., :1]
    gen = torch.Generator(device=U.device).manual_seed(0)
    for i in bad.any(dim=-1).nonzero().flatten().tolist():
        good = int((~bad[i]).sum())
        G = U[i, :, :good]
        R = torch.randn(U.shape[-2], U.shape[-1] - good, generator=gen, device=U.device, dtype=U.dtype)
        for _ in range(2):  # project twice: classical Gram–Schmidt needs the second pass
            R = R - G @ (G.mT @ R)
        U[i, :, good:] = torch.linalg.qr(R).Q


def _items_with_tail(S: Tensor, tail: float) -> list[int]:
    """Batch items (of S, shape (b, p)) with a singular value below ``tail``·σ₁."""
    has_tail = (S < tail * S.amax(dim=-1, keepdim=True)).any(dim=-1) & (S.amax(dim=-1) > 0)
    return has_tail.reshape(-1).nonzero().flatten().tolist()


def dense_svdvals_reference(X: Tensor) -> Tensor:
    """Float64 LAPACK/cuSOLVER singular values (the reference the engine is tested against)."""
    return torch.linalg.svdvals(X.to(torch.float64))


def randomized_topk(
    X: Tensor, k: int, oversample: int = 10, n_iter: int = 6, seed: int = 0, start: Tensor | None = None
) -> SVDResult:
    """Top-k singular triplets of X (b, m, n) by randomized subspace iteration (Halko et al. 2011).

    Y = X Ω with Ω of k + ``oversample`` columns (Gaussian, or ``start`` (…, n, p) when given), then
    ``n_iter`` rounds of Q ← qr(X Xᵀ Q), then the SVD of the small matrix QᵀX (float64). The error
    of the top-k subspace shrinks like (σ_{p+1}/σ_k)^(2·n_iter) times the starting error: a warm
    start from W0's top right singular vectors makes W_t = W0 + ΔW converge from an error of the size
    of the angles being measured, instead of from a random subspace.
    """
    m, n = X.shape[-2:]
    if start is not None:
        omega = start.to(X.dtype)
    else:
        p = min(k + oversample, m, n)
        gen = torch.Generator(device=X.device).manual_seed(seed)
        # one Ω for every batch item: results do not depend on an item's position in the batch
        omega = torch.randn(n, p, generator=gen, device=X.device, dtype=X.dtype)
    Q, _ = torch.linalg.qr(X @ omega)
    for _ in range(n_iter):
        Z, _ = torch.linalg.qr(X.mT @ Q)
        Q, _ = torch.linalg.qr(X @ Z)
    Ub, S, Vh = torch.linalg.svd((Q.mT @ X).to(torch.float64), full_matrices=False)
    U = Q.to(torch.float64) @ Ub
    return SVDResult(S[..., :k], U[..., :k], Vh.mT[..., :k])


def converged_topk(
    X: Tensor,
    k: int,
    start: Tensor | None = None,
    tol: float = 1e-9,
    max_iter: int | None = None,
    oversample: int = 10,
    seed: int = 0,
) -> SVDResult:
    """Top-k singular triplets of X (b, m, n), iterated to convergence (same accuracy as :func:`dense_svd`).

    Subspace iteration V ← orth(XᵀX V) on k + ``oversample`` columns (warm-started from ``start``, e.g.
    W0's top right singular vectors when X = W0 + ΔW), with the Ritz vectors of span(X V) read off after
    each round. The top-k right Ritz subspace moves by d_i = sin of the largest principal angle between
    rounds i−1 and i; with the observed rate ρ = d_i / d_{i−1} the remaining error is about d_i·ρ/(1 − ρ),
    and an item stops when that is below ``tol`` (radians). On a flat spectrum (σ_k ≈ σ_{k+p}) the rate
    approaches 1: an item not converged after ``max_iter`` rounds (default: about the cost of the dense
    path, min(m, n) / 2p rounds, at least 8) gets the exact dense SVD instead, so the result never
    depends on how well the iteration went. Float64 throughout.
    """
    X = X.to(torch.float64)
    m, n = X.shape[-2:]
    p = min(k + oversample, m, n)
    max_iter = max(8, min(m, n) // (2 * p)) if max_iter is None else max_iter
    if start is not None and start.shape[-1] >= min(k, p):
        V = start[..., :p].to(X)
    else:
        gen = torch.Generator(device=X.device).manual_seed(seed)
        V = torch.randn(n, p, generator=gen, device=X.device, dtype=X.dtype).expand(*X.shape[:-2], n, p)
    V = torch.linalg.qr(V).Q
    batch = X.shape[:-2]
    prev: Tensor | None = None
    last_d = torch.full(batch, torch.nan, dtype=X.dtype, device=X.device)
    done = torch.zeros(batch, dtype=torch.bool, device=X.device)
    for _ in range(max_iter):
        Q = torch.linalg.qr(X @ V).Q
        Ub, S, Vh = torch.linalg.svd(Q.mT @ X, full_matrices=False)
        V_k = Vh.mT[..., :k]
        if prev is not None:
            d = torch.linalg.matrix_norm(V_k - prev @ (prev.mT @ V_k), ord=2)
            rate = d / last_d  # inf / inf on the first comparison: no rate yet, not converged
            est = torch.where(rate < 1, d * rate / (1 - rate).clamp_min(1e-300), torch.inf)
            done = done | (est <= tol) | (d == 0)
            last_d = d
        prev = V_k
        if bool(done.all()):
            break
        V = Vh.mT  # the next round starts from the Ritz vectors (one power step: V ← orth(Xᵀ Q))
    U = Q @ Ub
    result = SVDResult(S[..., :k], U[..., :k], Vh.mT[..., :k])
    for i in (~done).reshape(-1).nonzero().flatten().tolist():  # not converged: the exact path
        idx = torch.unravel_index(torch.tensor(i), batch) if batch else ()
        exact = dense_svd(X[idx], k=k)
        result.S[idx], result.U[idx], result.V[idx] = exact.S[:k], exact.U, exact.V
    return result
