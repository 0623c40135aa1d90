"""Per-row distillation math of one chunk, in three stages shared by every implementation.

A chunk of R rows goes through:

1. **Logits stage** (implementation-specific): the student and teacher logits, each stored
   relative to the maximum of its vocabulary tile (d = z − m_tile), with per-(tile, row) softmax
   partials (:class:`pallas_kernels.TilePartials`). The Pallas kernel
   (:func:`pallas_kernels.logits_and_partials_pallas`) produces them in the logits matmul's
   epilogue; the XLA path uses :func:`chunk_logits_xla` on XLA's logits (one tile per row).
2. **Combination** (:func:`combine_partials`): the partials become row statistics — the
   maxima, the three log-normalizers and both KLs. Over a sharded vocabulary this is where the
   row scalars are all-reduced (``vocab_axis_name``); nothing else crosses devices.
3. **Row losses and dlogits** (:func:`soft_rows_and_dlogits`): β = 0 and β = 1 take their loss
   from the statistics and need one elementwise pass to write dlogits; 0 < β < 1 first reduces
   KL(P‖M) and KL(Q‖M) over the row (a second all-reduced row scalar), then writes.

With s' = z_s/T, t' = z_t/T, Q = softmax(s') (student), P = softmax(t') (teacher),
M = βP + (1−β)Q, a valid row r gets

* soft = JSD_β = β·KL(P‖M) + (1−β)·KL(Q‖M) (β = 0: KL(P‖Q), forward; β = 1: KL(Q‖P), reverse);
* hard = CE = −log softmax(z_s)[y] (untempered);
* dlogits = scale·(soft_weight/T · ∂JSD_β/∂s' + hard_weight · (softmax(z_s) − onehot(y))),

with ∂/∂s' = Q − P (β = 0), Q ⊙ (log Q − log P − KL(Q‖P)) (β = 1), and
Q ⊙ (a − Σ Q a), a = (1−β)(log Q − log M) (interior). Rows with a negative label are ignored
(zeros everywhere).

Numerics (the same forms as the Pallas row kernel, :mod:`pallas_kernels.distill_rows`, whose
per-column mixture math this module calls):

* JSD_β is summed as per-column terms Q·g(P/Q − 1) ≥ 0 (:func:`pallas_kernels.distill_rows.
  mixture_columns`), never as log Q − log M, which cancels as β → 0 or 1: float32 accuracy at
  every β, including β that rounds to 0 or 1 in float32 (``Hyper.one_minus_beta`` is exact, and
  the branch is chosen from the exact β).
* The gradient's row sum Σ Q a is taken about a pivot, the student's arg-max column (shift
  invariance: Q ⊙ (a − Σ Q a) = Q ⊙ ((a − a_pivot) − Σ Q (a − a_pivot))), so a row whose student
  is near one-hot does not subtract two numbers of the size of KL (a teacher logit gap of 3e4 at
  T = 0.05 makes KL ≈ 6e5). What remains is the float32 storage of the logits relative to their
  row maxima (stage 1): each z − max is rounded by up to ε·|z − max|, so on the XLA path the
  reverse-KL dlogits of a row carry an absolute error of at most about
  ε·(max z_t − min z_t)/T · soft_weight/T · (1 − max_j Q_j) (pinned by tests/test_numerics.py),
  which vanishes as the student becomes one-hot. The Pallas row kernel reads the raw logits and
  has no such term.
* −inf logits (masked columns, in one or both heads) are probability 0: the result equals the
  loss and gradients on the vocabulary without them; a true +∞ (P > 0 where Q = 0 at β = 0) stays
  +∞. Every 0·(non-finite) is guarded on both sides of a ``where``, so second derivatives (the
  XLA path supports them) stay finite too.
"""

from __future__ import annotations

from typing import NamedTuple

import jax
import jax.numpy as jnp
from jax import lax

from pallas_kernels import ChunkLogits, TilePartials
from pallas_kernels import distill_rows as row_kernel

# Divergence selectors. A β known at trace time picks its branch statically, from its exact
# value; a traced β selects at run time (β ≤ 0 forward, β ≥ 1 reverse, else the mixture).
FORWARD_KL, MIXTURE_JSD, REVERSE_KL, TRACED_BETA = "forward_kl", "mixture_jsd", "reverse_kl", "traced"
# The row kernel's branch number (its hyper[5]) of each static divergence, and the divergences
# in that order (the branches of a run-time switch).
_KERNEL_BRANCH = {
    FORWARD_KL: row_kernel.FORWARD_KL,
    MIXTURE_JSD: row_kernel.MIXTURE_JSD,
    REVERSE_KL: row_kernel.REVERSE_KL,
}
_KINDS = tuple(sorted(_KERNEL_BRANCH, key=_KERNEL_BRANCH.get))


class Hyper(NamedTuple):
    """Float32 scalars of one call (runtime values: changing them does not recompile).

    ``one_minus_beta`` is 1 − β computed exactly from the given β (not 1 − float32(β)), and
    ``scale`` multiplies every row's gradient (1 / the valid-token count for ``"mean"``), so the
    dlogits are scaled before they are rounded to the activation dtype.
    """

    beta: jax.Array
    one_minus_beta: jax.Array
    inv_temperature: jax.Array
    soft_weight: jax.Array
    hard_weight: jax.Array
    scale: jax.Array


class RowStats(NamedTuple):
    """Row statistics of a chunk, each float32 (R,), from :func:`combine_partials`.

    Attributes:
      max_s, max_t: M_s = max z_s, M_t = max z_t (over the whole, possibly sharded, vocabulary).
      log_sum_q: log Σ exp((z_s − M_s)/T). log_sum_u: log Σ exp(z_s − M_s) (untempered).
      log_sum_p: log Σ exp((z_t − M_t)/T).
      kl_fwd: KL(P‖Q). kl_rev: KL(Q‖P).
    """

    max_s: jax.Array
    log_sum_q: jax.Array
    log_sum_u: jax.Array
    max_t: jax.Array
    log_sum_p: jax.Array
    kl_fwd: jax.Array
    kl_rev: jax.Array


def _finite_or_zero(m):
    return jnp.where(jnp.isneginf(m), 0.0, m)


def _weighted(w, x):
    """w·x with w = 0 terms giving 0 even where x is not finite (0·∞ is a masked column, not NaN).

    x is replaced before the product too, so the derivative of the unused side is not 0·NaN.
    """
    positive = w > 0.0
    return jnp.where(positive, w * jnp.where(positive, x, 0.0), 0.0)


def tile_partials(d_s, d_t, max_s, max_t, inv_t) -> TilePartials:
    """Partials of one tile per row from its relative logits (the kernel epilogue's math in jnp).

    Args:
      d_s, d_t: (R, W) z − m_tile (≤ 0, or −inf). max_s, max_t: (R,) the tile maxima m_tile.
      inv_t: scalar 1/T.

    Returns:
      :class:`TilePartials` with (1, R) entries.
    """
    e_q, e_u, e_p = jnp.exp(d_s * inv_t), jnp.exp(d_s), jnp.exp(d_t * inv_t)
    rows = (
        max_s,
        jnp.sum(e_q, axis=-1),
        jnp.sum(e_u, axis=-1),
        max_t,
        jnp.sum(e_p, axis=-1),
        jnp.sum(_weighted(e_p, d_t - d_s), axis=-1) * inv_t,
        jnp.sum(_weighted(e_q, d_s - d_t), axis=-1) * inv_t,
    )
    return TilePartials(*(x[None, :] for x in rows))


def chunk_logits_xla(student_logits, teacher_logits, inv_t) -> ChunkLogits:
    """The XLA path's logits stage: float32 logits relative to their row maxima, one tile per row.

    Args:
      student_logits, teacher_logits: (R, V) float32 z_s and z_t. inv_t: scalar 1/T.
    """
    max_s = jnp.max(student_logits, axis=-1)
    max_t = jnp.max(teacher_logits, axis=-1)
    d_s = student_logits - _finite_or_zero(max_s)[:, None]
    d_t = teacher_logits - _finite_or_zero(max_t)[:, None]
    return ChunkLogits(d_s, d_t, tile_partials(d_s, d_t, max_s, max_t, inv_t), student_logits.shape[-1])


def combine_partials(partials: TilePartials, inv_t, *, vocab_axis_name=None) -> RowStats:
    """Row statistics from per-(tile, row) partials, all-reduced over ``vocab_axis_name`` if given.

    With δ_j = m_j − M (tile max minus row max) and w_j = exp(δ_j/T):
    S = Σ_j w_j·sum_j, and KL(P‖Q) = Σ_j w_p,j·(kl_fwd_j + sum_p,j·(δ_t,j − δ_s,j)/T) / S_p
    − log S_p + log S_q (KL(Q‖P) likewise with the roles swapped). Every term is relative to a
    maximum, so nothing overflows and the KLs do not cancel against the logits' magnitude.

    Args:
      partials: (n_tiles, R) each. inv_t: scalar 1/T.
      vocab_axis_name: mesh axis over which the vocabulary is sharded (inside ``shard_map``), or None.

    Returns:
      :class:`RowStats`.
    """
    max_s = jnp.max(partials.max_s, axis=0)
    max_t = jnp.max(partials.max_t, axis=0)
    if vocab_axis_name is not None:
        max_s, max_t = lax.pmax((max_s, max_t), vocab_axis_name)
    delta_s = partials.max_s - _finite_or_zero(max_s)  # ≤ 0, −inf for an all −inf tile
    delta_t = partials.max_t - _finite_or_zero(max_t)
    w_q, w_u, w_p = jnp.exp(delta_s * inv_t), jnp.exp(delta_s), jnp.exp(delta_t * inv_t)
    sums = (
        jnp.sum(w_q * partials.sum_q, axis=0),
        jnp.sum(w_u * partials.sum_u, axis=0),
        jnp.sum(w_p * partials.sum_p, axis=0),
        jnp.sum(_weighted(w_p, partials.kl_fwd + _weighted(partials.sum_p, (delta_t - delta_s) * inv_t)), axis=0),
        jnp.sum(_weighted(w_q, partials.kl_rev + _weighted(partials.sum_q, (delta_s - delta_t) * inv_t)), axis=0),
    )
    if vocab_axis_name is not None:
        sums = lax.psum(sums, vocab_axis_name)
    sum_q, sum_u, sum_p, fwd, rev = sums
    log_sum_q, log_sum_u, log_sum_p = jnp.log(sum_q), jnp.log(sum_u), jnp.log(sum_p)
    return RowStats(
        max_s=max_s,
        log_sum_q=log_sum_q,
        log_sum_u=log_sum_u,
        max_t=max_t,
        log_sum_p=log_sum_p,
        kl_fwd=fwd / sum_p - log_sum_p + log_sum_q,
        kl_rev=rev / sum_q - log_sum_q + log_sum_p,
    )


def _expand_tiles(per_tile, tile_width: int, vocab: int):
    """(n_tiles, R) → (R, V): each tile's value repeated over its columns."""
    n_tiles, rows = per_tile.shape
    expanded = jnp.broadcast_to(per_tile.T[:, :, None], (rows, n_tiles, tile_width))
    return expanded.reshape(rows, n_tiles * tile_width)[:, :vocab]


def soft_rows_and_dlogits(
    chunk: ChunkLogits,
    stats: RowStats,
    labels,
    label_logits,
    hyper: Hyper,
    *,
    divergence: str,
    dlogits_dtype,
    with_dlogits: bool = True,
    vocab_axis_name=None,
    vocab_start=0,
    branch=None,
):
    """Per-row JSD_β and CE of a chunk and (optionally) its scaled dlogits; see the module doc.

    Args:
      chunk: the logits stage's output, (R, V) relative logits and (n_tiles, R) partials.
      stats: :func:`combine_partials` of those partials.
      labels: (R,) int32 global token ids; negative = ignored row.
      label_logits: (R,) float32 z_s[y] (any value on ignored rows).
      hyper: :class:`Hyper`.
      divergence: ``FORWARD_KL``, ``MIXTURE_JSD``, ``REVERSE_KL`` or ``TRACED_BETA``.
      dlogits_dtype: dtype of the returned dlogits (the activation dtype).
      with_dlogits: False computes the losses only (dlogits None): β ∈ {0, 1} then read no logits.
      vocab_axis_name: mesh axis of a sharded vocabulary (row sums are all-reduced over it).
      vocab_start: global id of this shard's first column (0 when not sharded).
      branch: with ``TRACED_BETA``, an optional traced int32 branch (the row kernel's
        ``FORWARD_KL``/``MIXTURE_JSD``/``REVERSE_KL``) chosen by the caller; None → from
        float32 β (β ≤ 0 forward, β ≥ 1 reverse, else the mixture).

    Returns:
      ``(soft_rows (R,) f32, hard_rows (R,) f32, dlogits (R, V) dlogits_dtype or None)``.
    """
    inv_t = hyper.inv_temperature
    beta, one_minus_beta = hyper.beta, hyper.one_minus_beta
    valid = labels >= 0
    vocab = chunk.student.shape[-1]
    hard = stats.max_s + stats.log_sum_u - label_logits

    def row_sums(*xs):
        sums = tuple(jnp.sum(x, axis=-1) for x in xs)
        return sums if vocab_axis_name is None else lax.psum(sums, vocab_axis_name)

    def relative_logits():
        """z_s − M_s and z_t − M_t of every column, relative to the maxima of the whole row."""
        off_s = _expand_tiles(chunk.partials.max_s - _finite_or_zero(stats.max_s), chunk.tile_width, vocab)
        off_t = _expand_tiles(chunk.partials.max_t - _finite_or_zero(stats.max_t), chunk.tile_width, vocab)
        return chunk.student.astype(jnp.float32) + off_s, chunk.teacher.astype(jnp.float32) + off_t

    def log_probs(z_s, z_t):
        return z_s * inv_t - stats.log_sum_q[:, None], z_t * inv_t - stats.log_sum_p[:, None]

    def pivot_teacher(z_s, z_t):
        """(R, 1) z_t − M_t at the student's arg-max column (z_s − M_s = 0; any of its ties).

        The result does not depend on the pivot (shift invariance), so it carries no gradient.
        """
        pivot = lax.stop_gradient(jnp.max(jnp.where(z_s == 0.0, z_t, -jnp.inf), axis=-1))
        if vocab_axis_name is not None:
            pivot = lax.pmax(pivot, vocab_axis_name)
        return pivot[:, None]

    def mixture(z_s, z_t, grad):
        """JSD_β rows (and ∂/∂s'): per-column terms without cancellation (module doc)."""
        log_q, log_p = log_probs(z_s, z_t)
        q, p = jnp.exp(log_q), jnp.exp(log_p)
        coefficients = row_kernel.jsd_series_coefficients(beta, one_minus_beta)
        terms, lmq = row_kernel.mixture_columns(log_p - log_q, q, p, beta, one_minus_beta, coefficients)
        if not grad:
            return row_sums(terms)[0], None
        # a = −(1−β)·log(M/Q); Σ Q a about the pivot, where log Q = −log S_q.
        pivot_log_ratio = pivot_teacher(z_s, z_t) * inv_t - (stats.log_sum_p - stats.log_sum_q)[:, None]
        lmq_pivot = row_kernel.log_m_over_q(pivot_log_ratio, beta, one_minus_beta)
        soft, pivot_mean = row_sums(terms, q * (lmq - lmq_pivot))
        return soft, -one_minus_beta * q * ((lmq - lmq_pivot) - pivot_mean[:, None])

    def soft_and_grad(kind, z_s, z_t):
        if kind == FORWARD_KL:
            log_q, log_p = log_probs(z_s, z_t)
            return stats.kl_fwd, jnp.exp(log_q) - jnp.exp(log_p)
        if kind == REVERSE_KL:  # Q ⊙ (Δ − Σ Q Δ), Δ = log(Q/P) − its value at the pivot
            q = jnp.exp(log_probs(z_s, z_t)[0])
            delta = (z_s - (z_t - pivot_teacher(z_s, z_t))) * inv_t
            (pivot_mean,) = row_sums(_weighted(q, delta))
            return stats.kl_rev, _weighted(q, delta - pivot_mean[:, None])
        return mixture(z_s, z_t, grad=True)

    def soft_only(kind):
        """The loss alone: β ∈ {0, 1} from the statistics, the mixture with one reduction pass."""
        if kind == FORWARD_KL:
            return stats.kl_fwd
        if kind == REVERSE_KL:
            return stats.kl_rev
        return mixture(*relative_logits(), grad=False)[0]

    if branch is None:
        branch = row_kernel.branch_of(beta)
    zero_rows = jnp.zeros_like(hard)

    if not with_dlogits:
        if divergence == TRACED_BETA:
            soft = lax.switch(branch, [lambda k=k: soft_only(k) for k in _KINDS])
        else:
            soft = soft_only(divergence)
        return jnp.where(valid, soft, zero_rows), jnp.where(valid, hard, zero_rows), None

    z_s, z_t = relative_logits()
    if divergence == TRACED_BETA:
        soft, soft_grad = lax.switch(branch, [lambda a, b, k=k: soft_and_grad(k, a, b) for k in _KINDS], z_s, z_t)
    else:
        soft, soft_grad = soft_and_grad(divergence, z_s, z_t)
    cols = vocab_start + jnp.arange(vocab, dtype=jnp.int32)
    hard_grad = jnp.exp(z_s - stats.log_sum_u[:, None]) - (cols[None, :] == labels[:, None]).astype(jnp.float32)
    dlogits = (hyper.scale * hyper.soft_weight * inv_t) * soft_grad + (hyper.scale * hyper.hard_weight) * hard_grad
    dlogits = jnp.where(valid[:, None], dlogits, 0.0).astype(dlogits_dtype)
    return jnp.where(valid, soft, zero_rows), jnp.where(valid, hard, zero_rows), dlogits


def kernel_branch(divergence: str) -> int | None:
    """The row kernel's compiled branch for a divergence: a static one's, or None (all three,
    chosen at run time) for ``TRACED_BETA`` (:func:`pallas_kernels.distill_rows_pallas`)."""
    return None if divergence == TRACED_BETA else _KERNEL_BRANCH[divergence]


def kernel_hyper(hyper: Hyper, divergence: str) -> jax.Array:
    """The Pallas row kernel's (6,) hyper-parameters for one call (:func:`pallas_kernels.distill_rows.row_hyper`).

    ``[β, 1 − β, T, scale·soft_weight, scale·hard_weight, branch]``: the exact 1 − β of ``hyper``
    and, for a static ``divergence``, its branch (β known at trace time decides it exactly); for
    ``TRACED_BETA`` the branch follows float32 β at run time.
    """
    return row_kernel.row_hyper(
        hyper.beta,
        1.0 / hyper.inv_temperature,
        hyper.scale * hyper.soft_weight,
        hyper.scale * hyper.hard_weight,
        one_minus_beta=hyper.one_minus_beta,
        branch=kernel_branch(divergence),
    )


def distill_rows(student_logits, teacher_logits, labels, hyper, *, dlogits_dtype):
    """Whole-row contract of the Pallas row kernel (:func:`pallas_kernels.distill_rows_pallas`).

    The three stages on one chunk of float32 logits, with ``hyper`` the kernel's: (6,)
    ``[beta, 1 − beta, temperature, soft_weight, hard_weight, branch]`` (from
    :func:`kernel_hyper` or :func:`pallas_kernels.distill_rows.row_hyper`), or (4,)
    ``[beta, temperature, soft_weight, hard_weight]`` (1 − β and the branch from float32 β).
    Scale 1.

    Args:
      student_logits, teacher_logits: (R, V) float32. labels: (R,) int32, negative = ignored; a
        label ≥ V gives a NaN hard loss (its dlogits use column V − 1 as the label).
      dlogits_dtype: dtype of the returned dlogits.

    Returns:
      ``(soft_rows (R,) f32, hard_rows (R,) f32, dlogits (R, V) dlogits_dtype)``.
    """
    beta, one_minus_beta, temperature, soft_weight, hard_weight, branch = (
        row_kernel.full_row_hyper(hyper)[i] for i in range(row_kernel.HYPER_SIZE)
    )
    inv_t = 1.0 / temperature
    chunk = chunk_logits_xla(student_logits, teacher_logits, inv_t)
    stats = combine_partials(chunk.partials, inv_t)
    safe = jnp.clip(labels, 0, student_logits.shape[-1] - 1)
    label_logits = jnp.take_along_axis(student_logits, safe[:, None], axis=-1)[:, 0]
    label_logits = jnp.where(labels >= student_logits.shape[-1], jnp.nan, label_logits)  # flagged, never read
    one = jnp.ones((), student_logits.dtype)
    return soft_rows_and_dlogits(
        chunk,
        stats,
        labels,
        label_logits,
        Hyper(beta, one_minus_beta, inv_t, soft_weight, hard_weight, one),
        divergence=TRACED_BETA,
        dlogits_dtype=dlogits_dtype,
        branch=branch.astype(jnp.int32),
    )


# --- a top-k teacher: the student's full row against k cached teacher log-probs -----------------


class TailStatistics(NamedTuple):
    """Row sums over the *tail*, the columns that are not among a row's top-k ids; (R,) float32.

    Attributes:
      max: M_tail = max of z over the tail (−inf when the tail is empty).
      sum_q: Σ_tail exp((z − M_tail)/T). sum_u: Σ_tail exp(z − M_tail) (untempered, for the CE).
    """

    max: jax.Array
    sum_q: jax.Array
    sum_u: jax.Array


class TailCoefficients(NamedTuple):
    """Row scalars of the tail's dlogits, (R,) float32 each (:func:`tail_dlogits_xla`).

    A tail column v gets soft·exp((z_v − max_tail)/T − log_sum_tail) + hard·(exp(z_v − max_s −
    log_sum_u) − [v = y]): the first exponential is Q_v / Q_tail ≤ 1, the second softmax(z_s)_v.
    ``soft`` = scale·soft_weight/T·g̃_tail (the tail bucket's gradient, 0 for "renormalize") and
    ``hard`` = scale·hard_weight are the row's coefficients, not the weights. Ignored rows have
    soft = hard = 0. Every value is finite.
    """

    max_tail: jax.Array
    log_sum_tail: jax.Array
    soft: jax.Array
    max_s: jax.Array
    log_sum_u: jax.Array
    hard: jax.Array


def tail_statistics_xla(z_tail, inv_t) -> TailStatistics:
    """:class:`TailStatistics` of (R, V) float32 logits whose top-k columns are −inf, in jnp.

    As in the Pallas kernel (:func:`pallas_kernels.tail_statistics_pallas`), a logit below the
    kernels' floor (−3e38: a ``finfo(float32).min`` mask) weighs 0 like −inf, and a row of them
    has an empty tail (maximum −inf, sums 0).
    """
    z_tail = jnp.where(z_tail > row_kernel._MAX_FLOOR, z_tail, -jnp.inf)
    max_tail = jnp.max(z_tail, axis=-1)
    d = z_tail - _finite_or_zero(max_tail)[:, None]
    return TailStatistics(max_tail, jnp.sum(jnp.exp(d * inv_t), axis=-1), jnp.sum(jnp.exp(d), axis=-1))


def tail_dlogits_xla(z_tail, labels, inv_t, coefficients: TailCoefficients, dlogits_dtype):
    """(R, V) dlogits of the tail columns (:class:`TailCoefficients`).

    The −inf top-k columns get 0, except the label's column when the label is one of the ids
    (−hard there): the caller's scatter of the id columns overwrites them all.

    Args:
      z_tail: (R, V) float32 logits, −inf at each row's top-k ids. labels: (R,) int32, negative =
        ignored. inv_t: scalar 1/T. dlogits_dtype: the output dtype.
    """
    c = coefficients
    q_over_tail = jnp.exp((z_tail - c.max_tail[:, None]) * inv_t - c.log_sum_tail[:, None])
    softmax_u = jnp.exp(z_tail - c.max_s[:, None] - c.log_sum_u[:, None])
    onehot = (jnp.arange(z_tail.shape[-1], dtype=jnp.int32)[None, :] == labels[:, None]).astype(jnp.float32)
    return (c.soft[:, None] * q_over_tail + c.hard[:, None] * (softmax_u - onehot)).astype(dlogits_dtype)


class TailPasses(NamedTuple):
    """The two passes of :func:`topk_rows_and_dlogits` over a full (R, V) row.

    ``statistics(z_tail, inv_t) -> TailStatistics`` and ``dlogits(z_tail, labels, inv_t,
    coefficients, dlogits_dtype) -> (R, V)``: jnp (:data:`TAIL_PASSES_XLA`) or the Pallas kernels
    of :mod:`pallas_kernels.tail_rows`.
    """

    statistics: object
    dlogits: object


TAIL_PASSES_XLA = TailPasses(tail_statistics_xla, tail_dlogits_xla)
TOPK_TAILS = ("bucket", "renormalize")


def teacher_tail_resolution(k: int) -> float:
    """δ_k = (k + 1)·2⁻²³: the float32 resolution of 1 − Σ P for k cached log-probs.

    Assumes log-probs computed relative to the row maximum, as :func:`jaxdistill.teacher_topk`
    does (z − max − log Σ exp(z − max)): each P_i = exp(log P_i) then carries a relative rounding
    of about 2⁻²⁴ (plus that of exp), and the sum of k terms k roundings of its own, so a
    computed tail at or below δ_k is indistinguishable from 0. Log-probs formed as z − log-sum-exp
    with large logits carry more (2⁻²⁴·|z| each).
    """
    return (k + 1) * 2.0**-23


def teacher_tail_mass(teacher_logprobs, student_tail):
    """(R,) P_tail = 1 − Σ_i P_i of cached (R, k) log-probs, with rounding-level tails resolved.

    A tail above δ_k (:func:`teacher_tail_resolution`) is real mass and kept. One at or below δ_k
    is within rounding of 0 (1 − Σ P can even come out negative), so its value is free within
    [0, δ_k]: it is taken as min(δ_k, Q_tail), the student's own tail capped at the resolution
    (``student_tail``, without gradient). Every divergence then stays finite and its tail term at
    most δ_k-sized: a reverse-KL bucket against an exact 0 would be +∞, and δ_k against a tail
    the student has masked to nothing would be a huge δ_k·log(δ_k/Q_tail). An empty student tail
    (k = V, or every tail column masked by −inf biases) makes it 0: the loss of the truncated
    vocabulary.
    """
    total = jax.nn.logsumexp(teacher_logprobs, axis=-1)  # log Σ P
    raw = -jnp.expm1(total)  # 1 − Σ P (1 for a row of −inf log-probs)
    delta = teacher_tail_resolution(teacher_logprobs.shape[-1])
    return jnp.where(raw > delta, raw, jnp.minimum(delta, student_tail))


def topk_rows_and_dlogits(
    student_logits,
    ids,
    logprobs,
    labels,
    hyper: Hyper,
    *,
    divergence: str,
    tail: str,
    dlogits_dtype,
    with_dlogits: bool = True,
    passes: TailPasses = TAIL_PASSES_XLA,
):
    """Per-row JSD_β against a top-k teacher, the CE, and the scaled dense dlogits of one chunk.

    With s' = z_s/T, Q = softmax(s') over the full vocabulary and P_i = exp(logprobs_i) the
    teacher's probabilities of its ids (made at the distillation temperature):

    * ``tail="bucket"``: JSD_β between the (k+1)-bucket distributions (P_ids, 1 − Σ P_ids) and
      (Q_ids, Q_tail), Q_tail = Σ_{v ∉ ids} Q_v summed directly over the tail columns (a second
      pass over them with the ids at −inf), never as 1 − Σ Q_ids; P's tail is
      :func:`teacher_tail_mass` (1 − Σ P_ids, where it is more than the float32 rounding of the
      cached log-probs, else min(δ_k, Q_tail)).
    * ``tail="renormalize"``: JSD_β between P_ids / Σ P_ids and Q_ids / Σ Q_ids.

    The divergence of the k+1 (or k) bucket log-probabilities is the dense row math itself
    (:func:`soft_rows_and_dlogits` on a (R, k+1) "vocabulary" at T = 1), so the β convention,
    the endpoints, the β-accuracy and the −inf handling are the dense loss's. Its gradient g̃_b
    with respect to the bucket logits carries to the vocabulary by the chain rule: an id column
    gets g̃_id, a tail column v gets (Q_v / Q_tail)·g̃_tail (``"renormalize"``: 0). The CE and its
    gradient softmax(z_s) − onehot(y) are over the full row, as in the dense loss.

    Work per row: one gather of the k id logits, one pass over the row for
    :class:`TailStatistics`, the (k+1)-wide bucket math, one pass writing the dense dlogits, and
    a scatter of the k id columns into them.

    Args:
      student_logits: (R, V) float32 z_s. ids: (R, k) int32 in [0, V), distinct within each
        valid row. logprobs: (R, k) float32 log P of those ids (−inf allowed: probability 0).
      labels: (R,) int32 in [0, V), negative = ignored row (zeros everywhere).
      hyper: :class:`Hyper`. divergence: as for :func:`soft_rows_and_dlogits`.
      tail: ``"bucket"`` or ``"renormalize"``. dlogits_dtype: the dlogits' dtype.
      with_dlogits: False computes the losses only (no write pass).
      passes: the two full-row passes (:class:`TailPasses`).

    Returns:
      ``(soft_rows (R,) f32, hard_rows (R,) f32, dlogits (R, V) dlogits_dtype or None)``.
    """
    if tail not in TOPK_TAILS:
        raise ValueError(f"`tail` must be one of {TOPK_TAILS}, got {tail!r}")
    inv_t = hyper.inv_temperature
    valid = labels >= 0
    row = jnp.arange(student_logits.shape[0], dtype=jnp.int32)[:, None]
    z_ids = jnp.take_along_axis(student_logits, ids, axis=-1)  # (R, k)
    label_logits = jnp.take_along_axis(student_logits, jnp.maximum(labels, 0)[:, None], axis=-1)[:, 0]
    z_tail = student_logits.at[row, ids].set(-jnp.inf, mode="promise_in_bounds")
    tail_stats = passes.statistics(z_tail, inv_t)

    max_s = jnp.maximum(tail_stats.max, jnp.max(z_ids, axis=-1))
    max_s0, max_tail0 = _finite_or_zero(max_s), _finite_or_zero(tail_stats.max)
    # An empty tail (sum 0) adds 0, even where exp(0 − max_s) overflows (a row maximum below −88).
    sum_u = _weighted(tail_stats.sum_u, jnp.exp(max_tail0 - max_s0)) + jnp.sum(
        jnp.exp(z_ids - max_s0[:, None]), axis=-1
    )
    log_sum_u = jnp.log(sum_u)
    hard = max_s + log_sum_u - label_logits

    # Bucket logits, tempered and relative to the row maximum (softmax-normalized by the row math).
    student_buckets = (z_ids - max_s0[:, None]) * inv_t
    teacher_buckets = logprobs.astype(jnp.float32)
    has_tail = tail_stats.sum_q > 0.0
    log_sum_tail = jnp.log(jnp.where(has_tail, tail_stats.sum_q, 1.0))
    k = ids.shape[-1]
    tail_bucket = tail == "bucket"
    if tail_bucket:
        log_q_tail = jnp.where(has_tail, (max_tail0 - max_s0) * inv_t + log_sum_tail, -jnp.inf)
        student_buckets = jnp.concatenate([student_buckets, log_q_tail[:, None]], axis=-1)
        q_tail = jnp.exp(log_q_tail - jax.nn.logsumexp(student_buckets, axis=-1))  # Q_tail, normalized
        log_p_tail = jnp.log(teacher_tail_mass(teacher_buckets, lax.stop_gradient(q_tail)))
        teacher_buckets = jnp.concatenate([teacher_buckets, log_p_tail[:, None]], axis=-1)
    one = jnp.ones((), jnp.float32)
    bucket_hyper = Hyper(hyper.beta, hyper.one_minus_beta, one, one, jnp.zeros((), jnp.float32), one)
    chunk = chunk_logits_xla(student_buckets, teacher_buckets, one)
    bucket_labels = jnp.where(valid, 0, -1)
    soft, _, bucket_grad = soft_rows_and_dlogits(
        chunk,
        combine_partials(chunk.partials, one),
        bucket_labels,
        jnp.zeros_like(hard),
        bucket_hyper,
        divergence=divergence,
        dlogits_dtype=jnp.float32,
        with_dlogits=with_dlogits,
    )
    zero_rows = jnp.zeros_like(hard)
    hard = jnp.where(valid, hard, zero_rows)
    if not with_dlogits:
        return soft, hard, None

    soft_scale = jnp.where(valid, hyper.scale * hyper.soft_weight * inv_t, 0.0)
    hard_scale = jnp.where(valid, hyper.scale * hyper.hard_weight, 0.0)
    tail_soft = soft_scale * bucket_grad[:, k] if tail_bucket else zero_rows
    coefficients = TailCoefficients(
        max_tail=max_tail0,
        log_sum_tail=log_sum_tail,
        soft=jnp.where(has_tail, tail_soft, 0.0),
        max_s=max_s0,
        log_sum_u=jnp.where(valid, log_sum_u, 0.0),
        hard=hard_scale,
    )
    dense = passes.dlogits(z_tail, labels, inv_t, coefficients, dlogits_dtype)
    softmax_ids = jnp.exp(z_ids - max_s0[:, None] - coefficients.log_sum_u[:, None])
    onehot_ids = (ids == labels[:, None]).astype(jnp.float32)
    id_values = soft_scale[:, None] * bucket_grad[:, :k] + hard_scale[:, None] * (softmax_ids - onehot_ids)
    id_values = jnp.where(valid[:, None], id_values, 0.0).astype(dlogits_dtype)
    return soft, hard, dense.at[row, ids].set(id_values, mode="promise_in_bounds")
