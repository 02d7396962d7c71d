"""GPTQ: quantize a MatMul weight one input row at a time, pushing each row's error onto the rows not yet done.

Frantar et al. 2023, "GPTQ: Accurate Post-Training Quantization for Generative Pre-trained
Transformers", Algorithm 1, following the reference ``fasterquant`` (IST-DASLab/gptq ``gptq.py``).
The paper's ``W`` is ``[N, K]`` and works on columns; onnxq's MatMul weight is ``[K, N]``, so here the
paper's *columns* are our *rows*. With calibration activations ``X`` (``[n, K]``) and ``H = X^T X``, GPTQ
greedily minimises the proxy output error ``tr(dW^T H dW)`` (``dW = dequant(q) - W``):

1. rows that never see input (``H[j, j] == 0``) are zeroed and their diagonal set (see below);
   ``lambda = damp * mean(diag H)`` is added to the diagonal;
2. ``U`` = the upper Cholesky factor of ``H^-1`` (``U^T U = H^-1``);
3. rows are processed in lazy batches of ``lazy_block``: row ``i`` is quantized to ``q_i``, its scaled
   error ``e = (w_i - q_i) / U[i, i]`` updates the rest of the batch at once (``w_j -= U[i, j] e``), and
   each finished batch updates all later rows with one matrix product.

Each step is the optimal (OBS) compensation for fixing row ``i``: ``U[i, j] / U[i, i]`` equals
``Hinv[i, j] / Hinv[i, i]`` of the inverse Hessian with the already-quantized rows eliminated, so the
result is the same as the paper's row-by-row Eq. 2/3 with a full inverse (``tests/test_gptq.py`` checks
this against such a direct implementation).

Block parameters. Without ``act_order``, a block's scale and zero point are chosen when the loop reaches
the block's first row, from the min/max of the block's *current* rows (already updated by the errors
of earlier blocks), as the reference does. Unlike the reference, which reads the not-yet-updated outer
copy of ``W`` when a block starts in the middle of a lazy batch, the rows are taken with every update
so far applied, so the result does not depend on ``lazy_block``.

``act_order`` processes rows by decreasing ``diag(H)`` (the most-used inputs are quantized first,
while there is the most freedom left to compensate for them). The packed formats (MatMulNBits,
blocked DequantizeLinear) need each block to be a contiguous range of rows in the *original* order,
so the parameters of every block are chosen up front from the original weights ("static groups" in the
reference). Choosing them as the loop goes would either make blocks of permuted, scattered rows (the
reference's ``g_idx``, which needs a gather at run time) or fix a block's parameters before most of its
rows have been updated. Static parameters can be used without ``act_order`` too (``static_groups``).

Numerics. Everything is float64: GPTQ is a long chain of rank-1 updates through ``H^-1`` of possibly
badly conditioned calibration Hessians (correlated features, few samples); on a CPU float64 costs
about twice float32 and keeps the result within rounding ties of the exact algorithm. Quantization
itself is ONNX-exact (float32 ``w / scale``, half-to-even, see :func:`quantize_rows`), and the error
fed back is against the float32 dequantized value the runtime computes. ``H`` is normalised to unit
mean diagonal internally (the algorithm is invariant to its scale); losses are reported in ``H``'s own
units. If the damped ``H`` is still not positive definite, the damping is retried ten times larger (up
to :data:`MAX_DAMP_RETRIES` times) and the damping used is recorded; after that
:class:`HessianError` is raised.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np

from onnxq.errors import CalibrationError
from onnxq.weightonly.grid import QuantizedWeight, WeightGrid, qparams, quantize_rows, rtn, weight_and_hessian

__all__ = ["GPTQResult", "HessianError", "gptq", "proxy_loss", "MAX_DAMP_RETRIES"]

logger = logging.getLogger(__name__)

#: How many times the damping is multiplied by 10 before giving up on a Hessian that is not positive definite.
MAX_DAMP_RETRIES = 3


class HessianError(CalibrationError):
    """The calibration Hessian ``X^T X`` cannot be used (non-finite, wrong shape, not positive definite)."""


@dataclass
class GPTQResult:
    """What :func:`gptq` produced, with the figures a report needs.

    Attributes:
        weight: the quantized weight, rows in the original order.
        loss: the sum over rows of the paper's ``(w - q)^2 / [H^-1]_qq`` (the OBS increments, in ``H``'s
            units); it equals ``tr(dW^T (H + lambda I) dW)`` for the damped ``H`` actually used.
        proxy_loss: ``tr(dW^T H dW)`` with the undamped ``H`` and the original ``W``: the summed squared
            output error on the calibration rows.
        rtn_proxy_loss: the same for round-to-nearest on the same grid (``None`` if not asked for).
        damp: the relative damping actually used (``lambda / mean(diag H)``).
        damp_retries: how many times the damping had to be raised (0 normally).
        dead_rows: rows whose input was always zero (zeroed, as in the reference).
        perm: the processing order (``None`` for the natural order).
        static_groups: whether block parameters were fixed up front from the original weights.
    """

    weight: QuantizedWeight
    loss: float
    proxy_loss: float
    rtn_proxy_loss: float | None
    damp: float
    damp_retries: int
    dead_rows: int
    perm: np.ndarray | None
    static_groups: bool

    @property
    def gain_over_rtn(self) -> float | None:
        """``rtn_proxy_loss / proxy_loss`` (how many times smaller GPTQ's output error is), if known."""
        if self.rtn_proxy_loss is None:
            return None
        return float(self.rtn_proxy_loss / self.proxy_loss) if self.proxy_loss > 0 else float("inf")


COLUMNS = 4096
"""Output columns processed at a time: GPTQ is independent per column (one shared ``H``), so a
``[576, 49152]`` lm_head needs float64 work arrays of 4096 columns, not of all of them."""


def proxy_loss(w: np.ndarray, w_hat: np.ndarray, h: np.ndarray) -> float:
    """``tr(dW^T H dW)`` for ``dW = w_hat - w`` (``[K, N]``): the summed squared output error ``||X dW||^2``."""
    return _quadratic(h, lambda c: np.asarray(w_hat[:, c], np.float64) - np.asarray(w[:, c], np.float64), np.shape(w)[1])


def output_energy(w: np.ndarray, h: np.ndarray) -> float:
    """``tr(W^T H W) = ||X W||^2``: what :func:`proxy_loss` is relative to."""
    return _quadratic(h, lambda c: np.asarray(w[:, c], np.float64), np.shape(w)[1])


def _quadratic(h: np.ndarray, columns: Callable[[slice], np.ndarray], n: int) -> float:
    """``sum_n d_n^T H d_n`` over the columns ``columns(slice)`` yields, :data:`COLUMNS` at a time."""
    h64 = np.asarray(h, np.float64)
    total = 0.0
    for c0 in range(0, n, COLUMNS):
        d = columns(slice(c0, c0 + COLUMNS))
        total += float(np.einsum("kn,kn->", d, h64 @ d))
    return total


def gptq(
    w: np.ndarray,
    h: np.ndarray,
    grid: WeightGrid,
    *,
    damp: float = 0.01,
    act_order: bool = False,
    static_groups: bool = False,
    lazy_block: int = 128,
    compare_rtn: bool = True,
    mse_range: bool = False,
) -> GPTQResult:
    """Quantize a ``[K, N]`` MatMul weight with GPTQ given ``h = X^T X`` (``[K, K]``) of its input.

    Args:
        w: the weight, ``[K, N]`` (any float dtype).
        h: ``X^T X`` summed over calibration rows (any positive scale; ``2/n X^T X`` works as well).
        grid: bits, symmetry and block size.
        damp: relative damping, ``lambda = damp * mean(diag H)`` (the reference's ``percdamp``).
        act_order: process rows by decreasing ``diag(H)``; implies static block parameters (see the
            module docstring for why).
        static_groups: choose every block's parameters up front from the original weights even
            without ``act_order``.
        lazy_block: rows per lazy batch (only speed depends on it).
        compare_rtn: also compute RTN's proxy loss for the report (one extra ``K x K x N`` product).
        mse_range: choose each block's range by shrinking its min/max (ratios 1.00 .. 0.80) to the
            smallest ``sum |w - q(w)|^2.4`` per column, as the reference quantizer's ``mse`` option does,
            instead of plain min/max.

    Returns:
        A :class:`GPTQResult`.

    Raises:
        ValueError: on shapes or arguments that make no sense.
        HessianError: if ``h`` is not finite or stays indefinite after raising the damping.
    """
    w0, h0 = weight_and_hessian(w, h, "GPTQ")
    if lazy_block < 1:
        raise ValueError(f"lazy_block must be >= 1, got {lazy_block}")
    if not damp >= 0:
        raise ValueError(f"damp must be >= 0, got {damp}")
    if not np.all(np.isfinite(h0)):
        raise HessianError("H = X^T X has NaN or Inf entries: the calibration activations are not finite")

    hn, unit, dead = _prepare_hessian(h0)
    static = static_groups or act_order
    perm: np.ndarray | None = None
    if act_order:
        perm = np.argsort(-np.diag(hn), kind="stable")
        hn = hn[np.ix_(perm, perm)]
    u, lam, retries = _damped_inverse_cholesky(hn, damp)
    q, scales, zps, obs_loss = _quantize_columns(w0, u, perm, dead, grid, static, lazy_block, mse_range)
    weight = QuantizedWeight(q=q, scales=scales, zero_points=zps, grid=grid)
    w_hat = weight.dequantize()
    loss = proxy_loss(w0, w_hat, h0)
    loss_rtn = proxy_loss(w0, rtn(w0, grid).dequantize(), h0) if compare_rtn else None
    if retries:
        logger.warning("GPTQ: H was not positive definite with damp=%g; used damp=%g (%d retries)", damp, lam, retries)
    return GPTQResult(
        weight=weight,
        loss=obs_loss * unit,
        proxy_loss=loss,
        rtn_proxy_loss=loss_rtn,
        damp=lam,
        damp_retries=retries,
        dead_rows=int(dead.sum()),
        perm=perm,
        static_groups=static,
    )


def _quantize_columns(
    w0: np.ndarray,
    u: np.ndarray,
    perm: np.ndarray | None,
    dead: np.ndarray,
    grid: WeightGrid,
    static: bool,
    lazy_block: int,
    mse_range: bool,
) -> tuple[np.ndarray, np.ndarray, np.ndarray, float]:
    """GPTQ over the columns of ``w0``, ``COLUMNS`` at a time (columns are independent: bounded float64
    work arrays). ``u`` is the upper Cholesky factor of the (permuted) inverse Hessian.

    Returns (codes ``[K, N]``, scales and zero points ``[blocks, N]``, the observed loss before rescaling).
    """
    k, n = w0.shape
    b = grid.block(k)
    nb = grid.n_blocks(k)
    block_of = (np.arange(k) if perm is None else perm) // b
    scales = np.empty((nb, n), np.float32)
    zps = np.empty((nb, n), np.uint8)
    q = np.empty((k, n), np.uint8)
    obs_loss = 0.0
    for c0 in range(0, n, COLUMNS):
        cols = slice(c0, min(c0 + COLUMNS, n))
        wk = np.array(w0[:, cols], np.float64)
        wk[dead] = 0.0
        if static:
            for blk in range(nb):
                rows = wk[blk * b : (blk + 1) * b]
                scales[blk, cols], zps[blk, cols] = block_params(rows, grid, k, mse_range)
        if perm is not None:
            wk = wk[perm]
        qc = np.empty(wk.shape, np.uint8)
        sc_c, zp_c = scales[:, cols].copy(), zps[:, cols].copy()
        obs_loss += _quantize_loop(wk, u, qc, sc_c, zp_c, block_of, grid, static, lazy_block, mse_range)
        scales[:, cols], zps[:, cols] = sc_c, zp_c
        if perm is not None:
            q[perm, cols] = qc
        else:
            q[:, cols] = qc
        del wk, qc
    return q, scales, zps, obs_loss


def _prepare_hessian(h: np.ndarray) -> tuple[np.ndarray, float, np.ndarray]:
    """``H`` scaled to unit mean live diagonal, with dead rows' diagonal set to that mean (1).

    Returns ``(H / unit, unit, dead)``. The reference sets a dead diagonal to 1 in ``H``'s own (arbitrary)
    scale; doing it after normalising makes ``mean(diag H)``, and so the damping, independent of that
    scale and of how many rows are dead."""
    diag = np.diag(h)
    dead = diag == 0
    live = diag[~dead]
    unit = float(live.mean()) if live.size else 1.0
    if not unit > 0:
        raise HessianError(f"H = X^T X has a negative mean diagonal ({unit:g}); it is not a Gram matrix")
    hn = h / unit
    hn[dead, :] = 0.0
    hn[:, dead] = 0.0
    hn[dead, dead] = 1.0
    return hn, unit, dead


def _damped_inverse_cholesky(h: np.ndarray, damp: float) -> tuple[np.ndarray, float, int]:
    """Upper ``U`` with ``U^T U = (H + lambda I)^-1``, raising ``lambda`` x10 while that is not possible.

    ``h`` has unit mean diagonal, so ``lambda`` is the relative damping. ``U`` comes from one Cholesky
    factorisation of the row-and-column reversed ``H``: if ``J H J = L L^T`` then ``U = J L^-1 J`` (upper
    triangular, and ``U^T U = J L^-T L^-1 J = H^-1``), without forming ``H^-1`` and factoring it again.
    Returns ``(U, lambda, retries)``."""
    k = h.shape[0]
    rev = np.arange(k)[::-1]
    lam = float(damp)
    for attempt in range(MAX_DAMP_RETRIES + 1):
        hd = h + lam * np.eye(k)
        try:
            lower = np.linalg.cholesky(hd[np.ix_(rev, rev)])
            u = np.linalg.inv(lower)[np.ix_(rev, rev)]
            diag = np.diag(u)
            if np.all(np.isfinite(u)) and np.all(diag > 0):
                return np.triu(u), lam, attempt
        except np.linalg.LinAlgError:
            pass
        lam = lam * 10 if lam > 0 else 1e-4
    raise HessianError(
        f"H = X^T X is not positive definite even with damping {lam / 10:g} x mean(diag H) after "
        f"{MAX_DAMP_RETRIES} retries; the calibration activations are degenerate (check them for NaN, "
        f"constant features or far too few rows), or pass a larger damp"
    )


MSE_SHRINK = np.linspace(1.0, 0.8, 21)
"""Range shrink ratios the ``mse_range`` search tries (the reference tries 1.00 .. 0.80 in 100 steps)."""


def block_params(rows: np.ndarray, grid: WeightGrid, k: int, mse_range: bool) -> tuple[np.ndarray, np.ndarray]:
    """Scale and zero point per column of one block's ``rows`` (``[rows, N]``): min/max, or with
    ``mse_range`` the shrink of the min/max whose round trip has the smallest ``sum |err|^2.4``."""
    lo, hi = rows.min(0), rows.max(0)
    if not mse_range:
        return qparams(lo, hi, grid, k)
    best_s, best_z = qparams(lo, hi, grid, k)
    best_err = np.full(lo.shape, np.inf)
    r32 = np.asarray(rows, np.float32)
    for p in MSE_SHRINK:
        sc, zp = qparams(lo * p, hi * p, grid, k)
        code = quantize_rows(r32, sc, zp, grid.qmax)
        deq = (code.astype(np.float32) - zp.astype(np.float32)) * sc
        err = np.sum(np.abs(deq - r32) ** 2.4, axis=0)
        better = err < best_err
        best_err = np.where(better, err, best_err)
        best_s = np.where(better, sc, best_s)
        best_z = np.where(better, zp, best_z)
    return best_s.astype(np.float32), best_z.astype(np.uint8)


def _quantize_loop(
    w: np.ndarray,
    u: np.ndarray,
    q: np.ndarray,
    scales: np.ndarray,
    zps: np.ndarray,
    block_of: np.ndarray,
    grid: WeightGrid,
    static: bool,
    lazy_block: int,
    mse_range: bool = False,
) -> float:
    """Algorithm 1 on ``w`` (float64 ``[K, N]``, processing order, updated in place); fills ``q``.

    ``block_of[i]`` is the (original-order) block of processed row ``i``. Without static parameters,
    ``scales`` / ``zps`` of a block are filled when its first row is reached (rows are then in natural
    order, so ``block_of[i] == i // block``). Returns the OBS loss ``sum (w - q)^2 / U[i, i]^2``."""
    k, n = w.shape
    b = grid.block(k)
    qmax = grid.qmax
    loss = 0.0
    for i1 in range(0, k, lazy_block):
        i2 = min(i1 + lazy_block, k)
        w1 = w[i1:i2].copy()
        err1 = np.empty((i2 - i1, n))
        u1 = u[i1:i2, i1:i2]
        for j in range(i2 - i1):
            i = i1 + j
            if not static and i % b == 0:
                end = min(i + b, k)
                rows = w1[j : min(end, i2) - i1]
                if end > i2:  # the block runs past this batch: apply the batch's pending updates to its tail
                    tail = w[i2:end] - u[i1:i, i2:end].T @ err1[:j]
                    rows = np.concatenate([rows, tail])
                scales[i // b], zps[i // b] = block_params(rows, grid, k, mse_range)
            blk = block_of[i]
            sc, zp = scales[blk], zps[blk]
            row = w1[j]
            code = quantize_rows(row, sc, zp, qmax)
            deq = (code.astype(np.int16) - zp.astype(np.int16)).astype(np.float32) * sc
            e = (row - deq) / u1[j, j]
            loss += float(e @ e)
            w1[j + 1 :] -= np.outer(u1[j, j + 1 :], e)
            err1[j] = e
            q[i] = code
        if i2 < k:
            w[i2:] -= u[i1:i2, i2:].T @ err1
    return loss
