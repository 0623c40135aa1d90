"""Fused per-row distillation kernel: JSD_β / KL soft loss, CE hard loss and dlogits in one launch.

One program per row (grid over rows) walks the row in ``block_v``-wide vocabulary tiles
(unmasked full tiles in a ``fori_loop`` and one masked tail tile; see ``_Tiling.sweep`` for the
order), in as few passes over HBM as the divergence allows:

* β = 0, KL(P‖Q): pass 1 stats + KL(P‖Q) online (3 exp2 per element); pass 2 writes dlogits
  (3 exp2: q, p, softmax(z_s)). 2 reads of both logits + 1 write.
* β = 1, KL(Q‖P): pass 1 stats + KL(Q‖P) online, and the same sum taken about a pivot (3 exp2);
  pass 2 writes dlogits (2 exp2: q, softmax(z_s)). 2 reads + 1 write.
* 0 < β < 1, JSD_β: pass 1 stats and the pivot (3 exp2); pass 2 the JSD terms and the gradient's
  row sum (:func:`mixture_columns`: 4 exp2, an expm1 and two log1p as multiply-adds); pass 3
  writes dlogits (:func:`log_m_over_q`: 4 exp2, expm1, log1p). 3 reads + 1 write. The expm1 and
  log1p are :mod:`pallas_kernels.fastmath`'s: libdevice's cost 8–9× an exp2 per element here.
* ignored row (label < 0): one pass writing zeros, no reads.

Consecutive passes over a row run in opposite directions (forward, backward, forward), so each
pass starts on the tiles the previous one read last, the ones most likely still in L2 (H200,
(1024, 128256) rows: −3 to −5 % at interior β; see ``bench/results/2026-11-28-h200-run2``).

"stats" is the online max / sum-exp of the tempered student s' = z_s/T, the untempered student
z_s (for the CE) and the tempered teacher t' = z_t/T: one shared max per input, one exp2 per
stream. KL(P‖Q) and KL(Q‖P) need only those normalizers, so they accumulate online in the same
pass (Σ e·(Δt' − Δs') with the same rescaling as the sums). The gradient w.r.t. s' needs a row
scalar known only after a full pass, so dlogits are always written by the last pass.

Numerics (float32 accuracy at every β, whatever the logit gap):

* The mixture never forms log Q − log M (it cancels as β → 0 or 1). With d = log P − log Q,
  r = P/Q − 1 = expm1(d), the column's JSD term is Q·g(r) ≥ 0, g(r) = β(1+r)·log1p(r) −
  (1+βr)·log1p(βr): a power series in r for |r| ≤ 1/4 (its first-order terms cancel exactly,
  so they are dropped analytically) and −(β·P·log(M/P) + (1−β)·Q·log(M/Q)) elsewhere, with
  log(M/Q) = log1p(β·r), or log(1−β + β·e^d) where 1 + β·r is small (β rounds to 1 in float32).
  Every term is ≥ 0, so the row sum does not cancel either.
* The gradient's row scalar is taken about a pivot, the student's arg-max column a (its teacher
  logit is tracked in pass 1): Q ⊙ (a_j − Σ Q a) = Q ⊙ ((a_j − a_a) − Σ_k Q_k (a_k − a_a)).
  Its error is then O(ε) of the row's largest entry, however large KL and the logit gap are
  (the plain form Q ⊙ (log Q − log P − KL) leaves ≈ ε·KL·w/T in the entry where Q ≈ 1).
* β, 1 − β (exact) and the branch come from the caller (:func:`row_hyper`): a β that rounds to 0
  or 1 in float32 (1e-40, 1 − 1e-8) keeps its mixture.
* −inf logits (masked columns, or finfo.min ones that overflow to −inf once scaled by
  log2(e)/T) are probability 0: every 0·(−inf − −inf) is guarded, the running maxima start at a
  finite floor, and the result is that of the vocabulary without those columns. A true +∞ (P > 0
  where Q = 0 at β = 0) stays +∞.

The math runs in base 2 (``exp2`` of inputs pre-scaled by log2(e)/T, one multiply per element);
logits are shifted by the running raw maximum *before* scaling, ((z − m)·c), so that the shift is
exact whatever FMA contraction the compiler applies and the online rescale factors match.
"""

from __future__ import annotations

import dataclasses
import functools
import math

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl
from jax.experimental.pallas import triton as plgpu

from pallas_kernels import fastmath
from pallas_kernels.config import (
    RowKernelConfig,
    default_row_kernel_config,
    ignore_triton_deprecation,
    out_shape_varying_like,
)

_LOG2E = math.log2(math.e)
_LN2 = math.log(2.0)

# Divergence branches, the kernel's ``hyper[5]``: β = 0 forward KL, 0 < β < 1 the mixture, β = 1
# reverse KL (jaxdistill.rowmath maps its static divergences onto these; this package does not
# import jaxdistill).
FORWARD_KL, MIXTURE_JSD, REVERSE_KL = range(3)
# hyper = [β, 1 − β, T, soft_weight, hard_weight, branch] (float32; see row_hyper).
HYPER_SIZE = 6
# The running maxima start here: finite, so no rescale is ever (−inf) − (−inf), and below any
# logit that is not a mask (a finfo(float32).min mask lies below it, and weighs 0 like −inf).
_MAX_FLOOR = -3.0e38
# |log P − log Q| beyond this is clamped where it feeds expm1/exp (e^80 and e^−80 stay normal
# float32); the columns where that matters weigh ≤ e^−80 of their neighbours in the sums.
_EXP_CLAMP = 80.0
# g(r) is summed as its power series for |r| ≤ _SERIES_RADIUS, through r^_SERIES_ORDER (the
# truncation is < 4e-8 relative; the closed form beyond it loses < 2e-6 to rounding).
_SERIES_RADIUS = 0.25
_SERIES_ORDER = 12


@dataclasses.dataclass(frozen=True)
class _Tiling:
    """Static tile geometry of one row: ``n_full`` unmasked tiles, then an optional masked tail.

    The tail tile starts at ``V − block_v`` (a window entirely inside the row whose lanes below
    ``n_full · block_v`` are masked off) or at 0 when the row is shorter than a tile (lanes
    ``≥ V`` masked off). Either way no lane outside ``[0, V)`` is loaded or stored.
    """

    vocab_size: int
    block_v: int

    @property
    def n_full(self) -> int:
        return self.vocab_size // self.block_v

    def sweep(self, body, carry, *, loads=(), eviction_policy=None, reverse=False):
        """Fold ``body(start, cols, mask, tiles, carry) -> carry`` over the row's tiles.

        ``tiles`` are the float32 tiles of the refs in ``loads`` at ``start`` (mask None = a
        full tile). Forward: full tiles left to right, then the tail. ``reverse``: the tail,
        then the full tiles right to left, so a pass that follows a forward pass starts on the
        tiles that pass read last (the ones most likely still in L2), and vice versa.
        """
        lanes = jnp.arange(self.block_v, dtype=jnp.int32)
        n_full = self.n_full

        def full_tile(i, c):
            tile = n_full - 1 - i if reverse else i
            start = pl.multiple_of(tile * self.block_v, self.block_v)
            tiles = tuple(self.load(ref, start, None, eviction_policy) for ref in loads)
            return body(start, start + lanes, None, tiles, c)

        def full_tiles(c):
            return lax.fori_loop(0, n_full, full_tile, c) if n_full else c

        def tail_tile(c):
            if not self.vocab_size % self.block_v:
                return c
            start = max(self.vocab_size - self.block_v, 0)
            cols = start + lanes
            mask = (cols >= n_full * self.block_v) & (cols < self.vocab_size)
            tiles = tuple(self.load(ref, start, mask, eviction_policy) for ref in loads)
            return body(start, cols, mask, tiles, c)

        return full_tiles(tail_tile(carry)) if reverse else tail_tile(full_tiles(carry))

    def load(self, ref, start, mask, eviction_policy):
        """One float32 tile of ``ref`` at ``start``; masked lanes read as 0 (finite, then masked)."""
        view = ref.at[pl.ds(start, self.block_v)]
        if mask is None:
            x = plgpu.load(view, eviction_policy=eviction_policy)
        else:
            x = plgpu.load(view, mask=mask, other=0.0, eviction_policy=eviction_policy)
        return x.astype(jnp.float32)

    def store(self, ref, start, mask, value):
        plgpu.store(ref.at[pl.ds(start, self.block_v)], value.astype(ref.dtype), mask=mask)


def _masked(mask, x, fill=0.0):
    return x if mask is None else jnp.where(mask, x, fill)


def _weighted(w, x):
    """w·x, and 0 where w = 0 even if x is not finite (a column of probability 0, or an empty sum)."""
    return jnp.where(w > 0.0, w * x, 0.0)


def branch_of(beta):
    """The run-time branch of a float β: β ≤ 0 forward KL, β ≥ 1 reverse KL, else the mixture (int32)."""
    return jnp.where(beta <= 0.0, FORWARD_KL, jnp.where(beta >= 1.0, REVERSE_KL, MIXTURE_JSD)).astype(jnp.int32)


def row_hyper(
    beta, temperature, soft_weight, hard_weight, *, one_minus_beta=None, branch=None, dtype=jnp.float32
) -> jax.Array:
    """The kernel's (6,) hyper-parameters ``[β, 1 − β, T, soft_weight, hard_weight, branch]``.

    Args:
      beta, temperature, soft_weight, hard_weight: scalars (floats or traced).
      one_minus_beta: 1 − β computed exactly by the caller; None → 1 − β in ``dtype``.
      branch: ``FORWARD_KL``, ``MIXTURE_JSD`` or ``REVERSE_KL`` (int or traced int), the caller's
        choice from the exact β; None → :func:`branch_of` β in ``dtype``, at run time.
      dtype: float32 for the kernel (the launcher casts to it); float64 for an oracle.

    Example:
      >>> row_hyper(1 - 1e-8, 2.0, 1.0, 0.5, one_minus_beta=1e-8, branch=MIXTURE_JSD)[jnp.array([0, 1, 5])]
      Array([1.e+00, 1.e-08, 1.e+00], dtype=float32)
    """
    beta = jnp.asarray(beta, dtype)
    if one_minus_beta is None:
        one_minus_beta = 1.0 - beta
    if branch is None:
        branch = branch_of(beta)
    values = (beta, one_minus_beta, temperature, soft_weight, hard_weight, branch)
    return jnp.stack([jnp.asarray(v).astype(dtype) for v in values])


def full_row_hyper(hyper):
    """A (6,) hyper as is; a (4,) ``[β, T, soft_weight, hard_weight]`` one completed by
    :func:`row_hyper` in its own dtype (1 − β and the branch from that β)."""
    if hyper.shape == (HYPER_SIZE,):
        return hyper
    return row_hyper(*(hyper[i] for i in range(4)), dtype=hyper.dtype)


# --- the mixture's per-column math (shared with the jnp contract, jaxdistill.rowmath) -----------


def jsd_series_coefficients(beta, one_minus_beta) -> tuple:
    """c_n = β(1 − β^(n−1)) / (n(n−1)), n = 2…12: g(r) = Σ (−1)^n c_n r^n (see :func:`mixture_columns`).

    Summed as β(1−β)·(1 + β + … + β^(n−2)) / (n(n−1)): positive terms only, so the coefficients
    keep their digits when β rounds to 1 (1 − β exact) or to 0, and no transcendental is needed.
    """
    coefficients, powers = [], 1.0  # powers = 1 + β + … + β^(n−2)
    for n in range(2, _SERIES_ORDER + 1):
        coefficients.append(beta * one_minus_beta * powers / (n * (n - 1)))
        powers = 1.0 + beta * powers
    return tuple(coefficients)


def _log_ratios(log_ratio):
    """(d, r, e, e_inv): d = log P − log Q (0 where both are −inf), r = expm1(d), e = e^−|d|,
    e_inv = e^|d| (|d| clamped to ``_EXP_CLAMP`` in the exponentials)."""
    d = jnp.where(jnp.isnan(log_ratio), 0.0, log_ratio)
    magnitude = jnp.minimum(jnp.abs(d), _EXP_CLAMP) * _LOG2E
    e, e_inv = jnp.exp2(-magnitude), jnp.exp2(magnitude)
    r = fastmath.expm1(jnp.minimum(d, _EXP_CLAMP), jnp.where(d < 0.0, e, e_inv))
    return d, r, e, e_inv


def log_m_over_q(log_ratio, beta, one_minus_beta):
    """log(M/Q) = log(1 + β(P/Q − 1)) per column, from log_ratio = log P − log Q (natural units).

    log1p(β·expm1(d)), with 1 + β·expm1(d) taken as 1−β + β·e^d where β·expm1(d) < −1/2 (d < 0
    and β > 1/2: there 1 + β·r would cancel, e.g. to 0 when β rounds to 1). Finite wherever
    1 − β > 0, also for d = ±inf (one side masked), and 0 for two masked sides.
    """
    _, r, e, _ = _log_ratios(log_ratio)
    return fastmath.log1p(beta * r, one_minus_beta + beta * e)


def mixture_columns(log_ratio, q, p, beta, one_minus_beta, coefficients):
    """Per-column JSD_β terms and log(M/Q), without cancellation at any β (natural units).

    The term of a column is β·P·log(P/M) + (1−β)·Q·log(Q/M) = Q·g(r) ≥ 0 with r = P/Q − 1 and
    g(r) = β(1+r)·log1p(r) − (1+βr)·log1p(βr): the series Σ (−1)^n c_n r^n for |r| ≤ 1/4
    (``coefficients`` from :func:`jsd_series_coefficients`), else −(β·P·log(M/P) +
    (1−β)·Q·log(M/Q)) with log(M/Q) from :func:`log_m_over_q` and likewise log(M/P) =
    log1p((1−β)·(Q/P − 1)), with 1 + (1−β)·(Q/P − 1) taken as β + (1−β)·e^−d near 0.

    Args:
      log_ratio: log P − log Q (−inf − −inf, two masked sides, is a 0 term).
      q, p: Q and P of the same columns.
      beta, one_minus_beta: scalars, 0 < β < 1 with 1 − β exact.
      coefficients: :func:`jsd_series_coefficients` of them.

    Returns:
      ``(jsd_terms, log_m_over_q)``, both finite for finite inputs and for masked columns.
    """
    d, r, e, e_inv = _log_ratios(log_ratio)
    negative = d < 0.0
    # 1 + x is near 0 for at most one side of a column: M/Q = 1−β + β·e^d only matters where
    # d < 0, M/P = β + (1−β)·e^−d only where d > 0. One direct sum serves both.
    direct = jnp.where(negative, one_minus_beta + beta * e, beta + one_minus_beta * e)
    lmq = fastmath.log1p(beta * r, direct)
    # Q/P − 1 = e^−d − 1 = −r·e^−d (no division: e^−d is e_inv for d < 0, e otherwise).
    lmp = fastmath.log1p(one_minus_beta * (-r * jnp.where(negative, e_inv, e)), direct)
    small = jnp.abs(r) <= _SERIES_RADIUS
    rs = jnp.where(small, r, 0.0)
    series = coefficients[-1]
    for c in coefficients[-2::-1]:
        series = c - rs * series
    closed = -(beta * p * lmp + one_minus_beta * q * lmq)
    return jnp.where(small, q * (rs * rs) * series, closed), lmq


def _divergence_row(kind, tiling, hyper, label, s_ref, t_ref, soft_ref, hard_ref, g_ref):
    """Losses and dlogits of one valid row for one divergence kind (statically specialized)."""
    beta, one_minus_beta, inv_t, soft_weight, hard_weight = hyper
    c = _LOG2E * inv_t  # tempered base-2 scale: log2 softmax(z/T) = (z − m)·c − log2 S
    pivoted = kind != FORWARD_KL  # the gradient's row sum is taken about the student's arg-max

    def stats(start, cols, mask, tiles, carry):
        ms, mt, t_pivot, sum_q, sum_u, sum_p, kl_acc, pivot_acc = carry
        s, t = tiles
        s_live = _masked(mask, s, -jnp.inf)
        tile_max_s = jnp.max(s_live)
        ms_new = jnp.maximum(ms, tile_max_s)
        mt_new = jnp.maximum(mt, jnp.max(_masked(mask, t, -jnp.inf)))
        ds = s - ms_new
        dq, du, dp = ds * c, ds * _LOG2E, (t - mt_new) * c  # shifted base-2 logits (≤ 0 or −inf)
        eq = _masked(mask, jnp.exp2(dq))
        eu = _masked(mask, jnp.exp2(du))
        ep = _masked(mask, jnp.exp2(dp))
        shift_q, shift_p = (ms - ms_new) * c, (mt - mt_new) * c  # ≤ 0: old terms move by these
        alpha_q, alpha_u, alpha_p = jnp.exp2(shift_q), jnp.exp2((ms - ms_new) * _LOG2E), jnp.exp2(shift_p)
        # The sums are per-lane (block_v,) accumulators, reduced once after the sweep: the only
        # cross-warp reductions inside the loop are the maxima. Every product whose weight can be
        # 0 next to a non-finite factor (a masked column, an empty sum) is guarded.
        if kind == FORWARD_KL:  # Σ e_p·(dp − dq); old terms gain shift_p − shift_q
            kl_acc = _weighted(alpha_p, kl_acc + _weighted(sum_p, shift_p - shift_q)) + _weighted(ep, dp - dq)
        elif kind == REVERSE_KL:  # Σ e_q·(dq − dp)
            kl_acc = _weighted(alpha_q, kl_acc + _weighted(sum_q, shift_q - shift_p)) + _weighted(eq, dq - dp)
        if pivoted:  # the teacher logit at the running student arg-max (any of its ties)
            t_at_max = jnp.max(jnp.where(s_live == tile_max_s, t, -jnp.inf))
            t_pivot_new = jnp.where(tile_max_s > ms, t_at_max, t_pivot)
            if kind == REVERSE_KL:  # Σ e_q·(dq − (t − t_pivot)·c): the log ratio about the pivot's
                moved = shift_q + (t_pivot_new - t_pivot) * c
                pivot_acc = _weighted(alpha_q, pivot_acc + _weighted(sum_q, moved))
                pivot_acc = pivot_acc + _weighted(eq, dq - (t - t_pivot_new) * c)
            t_pivot = t_pivot_new
        sum_q = sum_q * alpha_q + eq
        sum_u = sum_u * alpha_u + eu
        sum_p = sum_p * alpha_p + ep
        return ms_new, mt_new, t_pivot, sum_q, sum_u, sum_p, kl_acc, pivot_acc

    lanes = jnp.zeros((tiling.block_v,), jnp.float32)
    floor = jnp.float32(_MAX_FLOOR)
    init = (floor, floor, jnp.float32(0.0), lanes, lanes, lanes, lanes, lanes)
    ms, mt, t_pivot, *lane_sums = tiling.sweep(stats, init, loads=(s_ref, t_ref), eviction_policy="evict_last")
    sum_q, sum_u, sum_p, kl_acc, pivot_acc = (jnp.sum(x) for x in lane_sums)
    log2_sum_q = jnp.log(sum_q) * _LOG2E
    log2_sum_p = jnp.log(sum_p) * _LOG2E
    log2_sum_u = jnp.log(sum_u) * _LOG2E
    hard_ref[...] = (ms - s_ref[label].astype(jnp.float32)) + jnp.log(sum_u)

    def log2_probs(s, t):
        """log2 Q and log2 P of a tile (tempered)."""
        return (s - ms) * c - log2_sum_q, (t - mt) * c - log2_sum_p

    if kind == FORWARD_KL:
        soft = _LN2 * (kl_acc / sum_p - log2_sum_p + log2_sum_q)  # KL(P‖Q)
    elif kind == REVERSE_KL:
        soft = _LN2 * (kl_acc / sum_q - log2_sum_q + log2_sum_p)  # KL(Q‖P)
        pivot_mean = pivot_acc / sum_q  # Σ Q·Δ, Δ = log2(Q/P) − its value at the pivot (bits)
    else:
        coefficients = jsd_series_coefficients(beta, one_minus_beta)
        # log(M/Q) at the pivot, where log2 Q = −log2 S_q.
        pivot_log_ratio = ((t_pivot - mt) * c - log2_sum_p + log2_sum_q) * _LN2
        lmq_pivot = log_m_over_q(pivot_log_ratio, beta, one_minus_beta)

        def mixture_sums(start, cols, mask, tiles, carry):
            jsd_acc, pivot_acc = carry
            lq, lp = log2_probs(*tiles)
            q, p = jnp.exp2(lq), jnp.exp2(lp)
            terms, lmq = mixture_columns((lp - lq) * _LN2, q, p, beta, one_minus_beta, coefficients)
            return jsd_acc + _masked(mask, terms), pivot_acc + _masked(mask, q * (lmq - lmq_pivot))

        sums = tiling.sweep(
            mixture_sums, (lanes, lanes), loads=(s_ref, t_ref), eviction_policy="evict_last", reverse=True
        )
        soft, pivot_mean = (jnp.sum(x) for x in sums)  # JSD_β; Σ Q·(log M/Q − its pivot value)
    soft_ref[...] = soft

    def soft_grad(lq, lp, s, t):
        """∂JSD_β/∂s' of a tile (natural units)."""
        q = jnp.exp2(lq)
        if kind == FORWARD_KL:
            return q - jnp.exp2(lp)
        if kind == REVERSE_KL:  # Q ⊙ (Δ − Σ Q Δ)
            return _LN2 * _weighted(q, (s - ms) * c - (t - t_pivot) * c - pivot_mean)
        # Q ⊙ (a − Σ Q a) with a = −(1−β)·log(M/Q), about the pivot
        lmq = log_m_over_q((lp - lq) * _LN2, beta, one_minus_beta)
        return -one_minus_beta * q * ((lmq - lmq_pivot) - pivot_mean)

    soft_scale = soft_weight * inv_t

    def write(start, cols, mask, tiles, carry):
        s, t = tiles
        lq, lp = log2_probs(s, t)
        softmax_z = jnp.exp2((s - ms) * _LOG2E - log2_sum_u)
        hard_grad = softmax_z - (cols == label).astype(jnp.float32)
        tiling.store(g_ref, start, mask, soft_scale * soft_grad(lq, lp, s, t) + hard_weight * hard_grad)
        return carry

    # Alternate directions: the last pass runs against the one before it (see _Tiling.sweep).
    tiling.sweep(write, (), loads=(s_ref, t_ref), eviction_policy="evict_first", reverse=kind != MIXTURE_JSD)


def _filled_row(tiling, soft_ref, hard_ref, g_ref, fill):
    """Losses and dlogits all equal to ``fill``, without reading the logits."""
    soft_ref[...] = jnp.float32(fill)
    hard_ref[...] = jnp.float32(fill)

    def write(start, cols, mask, tiles, carry):
        tiling.store(g_ref, start, mask, jnp.full((tiling.block_v,), fill, jnp.float32))
        return carry

    tiling.sweep(write, ())


def _ignored_row(tiling, soft_ref, hard_ref, g_ref):
    """An ignored row: zero losses and zero dlogits."""
    _filled_row(tiling, soft_ref, hard_ref, g_ref, 0.0)


def _nan_row(tiling, soft_ref, hard_ref, g_ref):
    """A row whose runtime branch is not the one compiled: NaN losses and dlogits."""
    _filled_row(tiling, soft_ref, hard_ref, g_ref, float("nan"))


def _distill_row_kernel(hyper_ref, label_ref, s_ref, t_ref, soft_ref, hard_ref, g_ref, *, tiling, branch):
    # The branch (and ignored rows) select among four statically specialized row programs with
    # an in-kernel switch on the loaded scalars: it is uniform per program (no divergence), keeps
    # one compiled kernel for every β (β is a runtime value), and, unlike a launcher-level
    # lax.switch over three kernels, needs no device-to-host read of the branch index. Each
    # program then pays only for its own passes and accumulators, and ignored rows (the padding
    # of a ragged last chunk) skip all reads.
    hyper = (hyper_ref[0], hyper_ref[1], 1.0 / hyper_ref[2], hyper_ref[3], hyper_ref[4])
    branch_index = hyper_ref[5]
    label = label_ref[...]
    safe_label = jnp.minimum(label, tiling.vocab_size - 1)  # never read outside the row
    refs = (s_ref, t_ref, soft_ref, hard_ref, g_ref)
    forward_kl, mixture_jsd, reverse_kl = (
        functools.partial(_divergence_row, kind, tiling, hyper, safe_label, *refs)
        for kind in (FORWARD_KL, MIXTURE_JSD, REVERSE_KL)
    )
    ignored = functools.partial(_ignored_row, tiling, soft_ref, hard_ref, g_ref)
    if branch is not None:
        # One program compiled: the kernel's registers are that program's alone (the mixture's
        # would otherwise set them for every β). A runtime branch that differs gives NaN rows.
        program = (forward_kl, mixture_jsd, reverse_kl)[branch]
        nan_row = functools.partial(_nan_row, tiling, soft_ref, hard_ref, g_ref)

        def divergence():
            lax.cond(branch_index == float(branch), program, nan_row)

    else:
        # Nested boolean conds, not lax.switch: switch clamps its index, and that clamp lowers to
        # an `arith.maxsi` whose operand types XLA's Triton rejects ("requires the same type for
        # all operands and results", seen on the H200 with jax 0.11.2).
        def divergence():
            lax.cond(
                branch_index == float(FORWARD_KL),
                forward_kl,
                lambda: lax.cond(branch_index == float(REVERSE_KL), reverse_kl, mixture_jsd),
            )

    lax.cond(label < 0, ignored, divergence)


def _check_inputs(student_logits, teacher_logits, labels, hyper):
    if student_logits.ndim != 2 or student_logits.shape != teacher_logits.shape:
        raise ValueError(
            "student_logits and teacher_logits must both be (R, V), got "
            f"{student_logits.shape} and {teacher_logits.shape}"
        )
    if student_logits.dtype != jnp.float32 or teacher_logits.dtype != jnp.float32:
        raise ValueError(f"logits must be float32, got {student_logits.dtype} and {teacher_logits.dtype}")
    if labels.shape != student_logits.shape[:1] or not jnp.issubdtype(labels.dtype, jnp.integer):
        raise ValueError(f"labels must be ({student_logits.shape[0]},) integers, got {labels.shape} {labels.dtype}")
    if hyper.shape not in ((4,), (HYPER_SIZE,)) or not jnp.issubdtype(hyper.dtype, jnp.floating):
        raise ValueError(
            f"hyper must be a (4,) float array [beta, T, soft_w, hard_w] or a ({HYPER_SIZE},) one from "
            f"row_hyper, got {hyper.shape} {hyper.dtype}"
        )


@functools.partial(jax.jit, static_argnames=("dlogits_dtype", "config", "interpret", "branch"))
def distill_rows_pallas(
    student_logits: jax.Array,
    teacher_logits: jax.Array,
    labels: jax.Array,
    hyper: jax.Array,
    *,
    dlogits_dtype,
    config: RowKernelConfig | None = None,
    interpret: bool | None = None,
    branch: int | None = None,
) -> tuple[jax.Array, jax.Array, jax.Array]:
    """Per-row JSD_β and CE losses of a chunk with dlogits, as one Pallas (Triton) kernel.

    Same contract as ``jaxdistill.rowmath.distill_rows``: with s' = z_s/T, t' = z_t/T,
    Q = softmax(s') (student), P = softmax(t') (teacher) and M = βP + (1−β)Q, row r gets

    * ``soft_rows[r]`` = JSD_β = β·KL(P‖M) + (1−β)·KL(Q‖M) (β = 0: KL(P‖Q); β = 1: KL(Q‖P));
    * ``hard_rows[r]`` = −log softmax(z_s)[y] (untempered);
    * ``dlogits[r]`` = soft_weight/T · ∂JSD_β/∂s' + hard_weight · (softmax(z_s) − onehot(y)).

    Rows with a negative label are ignored: zeros in all three outputs. β, T and the weights
    are runtime values (changing them does not recompile). Accurate to float32 at every β and
    logit gap, and −inf logits (masks) count as probability 0: see the module docstring.

    Inside ``shard_map`` with ``check_vma=True`` the outputs vary over the mesh axes that any
    input varies over.

    When ``dlogits_dtype`` is float32 the dlogits overwrite the student logits buffer
    (``input_output_aliases``): free when the logits die at this call (as inside a chunked
    loss), a copy inserted by XLA otherwise.

    Args:
      student_logits: (R, V) float32 student logits z_s.
      teacher_logits: (R, V) float32 teacher logits z_t.
      labels: (R,) integer; in [0, V) for valid rows, negative for ignored rows. A label ≥ V
        gives a NaN ``hard_rows`` entry (the row's dlogits then use column V − 1 as the label).
      hyper: (6,) float32 from :func:`row_hyper`, ``[β, 1 − β, T, soft_weight, hard_weight,
        branch]`` with 1 − β exact and the branch chosen from the exact β, or (4,) float32
        ``[β, T, soft_weight, hard_weight]`` (1 − β and the branch then from float32 β);
        β ∈ [0, 1], T > 0.
      dlogits_dtype: dtype of the returned gradient (the activation dtype).
      config: tiling / launch config; None → :func:`default_row_kernel_config`.
      interpret: run in Pallas interpret mode; None → ``jax.default_backend() != "gpu"``.
      branch: None compiles the three divergence programs and picks one per call from the
        hyper-parameters' branch. ``FORWARD_KL``, ``MIXTURE_JSD`` or ``REVERSE_KL`` compiles that
        one alone, for callers that know it at trace time (a concrete β): the kernel then needs
        only that program's registers. A call whose hyper-parameters select another branch
        then gets NaN in every valid row (nothing silently wrong).

    Returns:
      ``(soft_rows (R,) float32, hard_rows (R,) float32, dlogits (R, V) dlogits_dtype)``.

    Raises:
      ValueError: wrong shapes or dtypes, or an unknown ``branch``.

    Example:
      >>> z_s = jax.random.normal(jax.random.key(0), (4, 1000))
      >>> z_t = jax.random.normal(jax.random.key(1), (4, 1000))
      >>> hyper = jnp.array([0.5, 2.0, 1.0, 0.5], jnp.float32)
      >>> soft, hard, dz = distill_rows_pallas(z_s, z_t, jnp.array([1, 2, -100, 3]), hyper,
      ...                                      dlogits_dtype=jnp.bfloat16)
      >>> soft.shape, hard.shape, dz.shape, dz.dtype
      ((4,), (4,), (4, 1000), dtype(bfloat16))
    """
    _check_inputs(student_logits, teacher_logits, labels, hyper)
    if branch not in (None, FORWARD_KL, MIXTURE_JSD, REVERSE_KL):
        raise ValueError(f"branch must be None, FORWARD_KL, MIXTURE_JSD or REVERSE_KL, got {branch!r}")
    rows, vocab = student_logits.shape
    dlogits_dtype = jnp.dtype(dlogits_dtype)
    if config is None:
        config = default_row_kernel_config(vocab, dlogits_dtype)
    if interpret is None:
        interpret = jax.default_backend() != "gpu"
    if rows == 0:
        empty = jnp.zeros((0,), jnp.float32)
        return empty, empty, jnp.zeros((0, vocab), dlogits_dtype)
    ignore_triton_deprecation()
    hyper = full_row_hyper(hyper).astype(jnp.float32)
    labels = labels.astype(jnp.int32)
    out = out_shape_varying_like(hyper, labels, student_logits, teacher_logits)
    row_scalar = pl.BlockSpec((None,), lambda i: (i,))
    row = pl.BlockSpec((None, vocab), lambda i: (i, 0))
    kernel = functools.partial(_distill_row_kernel, tiling=_Tiling(vocab, config.block_v), branch=branch)
    soft_rows, hard_rows, dlogits = pl.pallas_call(
        kernel,
        grid=(rows,),
        in_specs=[pl.BlockSpec((HYPER_SIZE,), lambda i: (0,)), row_scalar, row, row],
        out_specs=[row_scalar, row_scalar, row],
        out_shape=[out((rows,), jnp.float32), out((rows,), jnp.float32), out((rows, vocab), dlogits_dtype)],
        # Operand 2 (student logits) → output 2 (dlogits): each program reads a tile before it
        # overwrites that same tile, and never touches another row.
        input_output_aliases={2: 2} if dlogits_dtype == student_logits.dtype else {},
        compiler_params=plgpu.CompilerParams(num_warps=config.num_warps, num_stages=config.num_stages),
        interpret=interpret,
        name="distill_rows",
    )(hyper, labels, student_logits, teacher_logits)
    # The kernel clamps labels into the row (it never reads outside it); flag the ones it clamped.
    return soft_rows, jnp.where(labels >= vocab, jnp.nan, hard_rows), dlogits
