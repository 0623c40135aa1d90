"""Distillation from an offline teacher: cached top-k log-probs instead of a teacher head.

Running the teacher once over the corpus and keeping its k most likely next tokens per position
makes every later training step cost the student's three matmuls only.

* :func:`teacher_topk` makes the cache: the ids and log-probs of the k largest entries of
  softmax(z_t/T), chunked over the rows like the loss (no (N, V) buffer).
* :func:`fused_linear_topk_distill_loss` trains against it: the fused loss's own chunked
  ``custom_vjp`` driver (:mod:`jaxdistill.fused`) with the top-k row stage of
  :func:`jaxdistill.rowmath.topk_rows_and_dlogits` in place of the teacher head.
"""

from __future__ import annotations

import dataclasses
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax

from jaxdistill import fused, rowmath
from jaxdistill._validate import (
    _check_bias,
    _check_hidden,
    concrete_float,
    narrow_token_ids,
    validate_and_flatten,
    weight_sizes,
)


class TopK(NamedTuple):
    """A top-k teacher cache: ``ids`` (..., k) int32 and ``logprobs`` (..., k) float32, descending."""

    ids: jax.Array
    logprobs: jax.Array


def _positive_int(value, name: str) -> int:
    if isinstance(value, bool) or not isinstance(value, int | np.integer):
        raise TypeError(f"`{name}` must be a positive int, got {type(value).__name__} {value!r}")
    if value < 1:
        raise ValueError(f"`{name}` must be a positive int, got {value}")
    return int(value)


def _check_k(k: int, vocab_size: int, name: str) -> int:
    k = _positive_int(k, name)
    if k > vocab_size:
        raise ValueError(f"`{name}` = {k} exceeds the vocabulary size {vocab_size}")
    return k


# Columns per tile of the two-level selection of exact_top_k. H200, one (1024, 128256) float32
# chunk, k = 64 (bench/results/2026-12-02-h200-topk): tile 32 / 64 / 128 / 256 / 512 took
# 0.85 / 0.81 / 1.24 / 1.74 / 2.94 ms, lax.top_k 9.33 ms.
TOP_K_TILE = 64


def exact_top_k(x, k: int, tile: int = TOP_K_TILE):
    """``lax.top_k(x, k)`` of (R, V) rows, exactly (values, ids, and lower ids first among ties), in two levels.

    The row is cut into ⌈V/tile⌉ tiles; the k tiles with the largest maxima (lower tile first
    among ties) hold every one of the row's k largest entries: an entry outside them would be
    beaten by the k tiles' maxima, k distinct entries at least as large and, when equal, at lower
    ids. The final ``lax.top_k`` runs over those k·tile candidates, in ascending id order, so
    ties resolve as in ``lax.top_k`` of the whole row. Selection work: R·(V/tile + k·tile)
    entries instead of R·V (k = 64, V = 128256, tile 64: 5 % of it).

    Falls back to ``lax.top_k`` when the row has no more than k tiles.
    """
    rows, vocab = x.shape
    n_tiles = -(-vocab // tile)
    if n_tiles <= k:
        return lax.top_k(x, k)
    padded = jnp.pad(x, ((0, 0), (0, n_tiles * tile - vocab)), constant_values=-jnp.inf)
    tiles = padded.reshape(rows, n_tiles, tile)
    _, best = lax.top_k(jnp.max(tiles, axis=-1), k)
    best = jnp.sort(best, axis=-1)  # ascending ids among the candidates
    candidates = jnp.take_along_axis(tiles, best[:, :, None], axis=1).reshape(rows, k * tile)
    values, position = lax.top_k(candidates, k)
    ids = jnp.take_along_axis(best, position // tile, axis=-1) * tile + position % tile
    return values, ids


def _chunk_topk(hidden, weight, bias, layout, inv_t, k):
    """(C, H) rows → their top-k of log softmax(z/T): ((C, k) int32 ids, (C, k) float32 log-probs)."""
    z = fused._logits(hidden, weight, bias, layout) * inv_t
    row_max = jnp.max(z, axis=-1, keepdims=True)
    log_normalizer = row_max + jnp.log(jnp.sum(jnp.exp(z - row_max), axis=-1, keepdims=True))
    values, ids = exact_top_k(z, k)
    return ids.astype(jnp.int32), values - log_normalizer


def teacher_topk(
    teacher_hidden,
    teacher_weight,
    k,
    *,
    teacher_bias=None,
    temperature=1.0,
    weight_layout="hv",
    chunk_size=None,
) -> TopK:
    """The k most likely tokens of a teacher head and their log-probabilities, chunked over rows.

    With z_t = x_t W_t + b_t and P = softmax(z_t / T) over the full vocabulary, returns the k
    largest P per row, in descending order (ties in ``lax.top_k``'s order), as ids and log P.
    The rows are processed ``chunk_size`` at a time under one ``lax.scan``: only one chunk of
    logits is ever alive. Works under ``jit``; the result carries no gradient.

    Args:
      teacher_hidden: (..., H) floating. teacher_weight: (H, V), or (V, H) with
        ``weight_layout="vh"``. k: 1 ≤ k ≤ V. teacher_bias: optional (V,).
      temperature: T > 0 (float or traced scalar; a traced T that is not finite and > 0 gives
        NaN log-probs); the cache is then made at the distillation temperature, as
        :func:`fused_linear_topk_distill_loss` expects.
      chunk_size: rows per chunk; None → :func:`jaxdistill.fused.default_chunk_size`.

    Returns:
      :class:`TopK` of (..., k) int32 ids and (..., k) float32 log-probs.

    Example:
      >>> import jax, jax.numpy as jnp
      >>> h, w = jnp.ones((2, 3, 8)), jax.random.normal(jax.random.key(0), (8, 50))
      >>> cache = teacher_topk(h, w, 4)
      >>> cache.ids.shape, cache.logprobs.dtype
      ((2, 3, 4), dtype('float32'))
    """
    hidden, vocab = weight_sizes(teacher_weight, weight_layout, "teacher_weight")
    _check_hidden(teacher_hidden, teacher_weight, weight_layout, "teacher_hidden", "teacher_weight")
    _check_bias(teacher_bias, vocab, "teacher_bias")
    k = _check_k(k, vocab, "k")
    t = concrete_float(temperature, "temperature")
    if t is not None and not 0.0 < t < float("inf"):
        raise ValueError(f"`temperature` must be finite and > 0, got {t}")
    chunk_size = fused.default_chunk_size(vocab) if chunk_size is None else _positive_int(chunk_size, "chunk_size")
    lead = jnp.shape(teacher_hidden)[:-1]
    rows = jnp.reshape(teacher_hidden, (-1, hidden))
    n_rows = rows.shape[0]
    chunk = max(1, min(chunk_size, n_rows))
    temperature = jnp.asarray(temperature, jnp.float32)
    inv_t = 1.0 / temperature

    def body(_, x):
        return None, _chunk_topk(x, teacher_weight, teacher_bias, weight_layout, inv_t, k)

    _, (ids, logprobs) = lax.scan(body, None, fused._chunked(rows, chunk, 0))
    ids, logprobs = (jnp.reshape(a, (-1, k))[:n_rows].reshape(lead + (k,)) for a in (ids, logprobs))
    logprobs = jnp.where((temperature > 0) & jnp.isfinite(temperature), logprobs, jnp.nan)  # a bad traced T
    return TopK(lax.stop_gradient(ids), lax.stop_gradient(logprobs))


def _check_teacher_cache(teacher_ids, teacher_logprobs, lead, vocab_size):
    """Shapes and dtypes of the cache; returns k."""
    for name, x in (("teacher_ids", teacher_ids), ("teacher_logprobs", teacher_logprobs)):
        if not isinstance(x, jax.Array | np.ndarray | np.generic):
            raise TypeError(f"`{name}` must be an array (jax.Array or numpy.ndarray), got {type(x).__name__}")
    if not jnp.issubdtype(teacher_ids.dtype, jnp.integer):
        raise TypeError(f"`teacher_ids` must be an integer array, got dtype {teacher_ids.dtype}")
    if teacher_logprobs.dtype not in (np.float32, np.float64):
        raise TypeError(
            f"`teacher_logprobs` must be float32 (or float64), got dtype {teacher_logprobs.dtype}: a 16-bit "
            "cache rounds each log-probability by ~1e-3, far above the teacher tail's float32 resolution"
        )
    if teacher_ids.ndim != len(lead) + 1 or teacher_ids.shape[:-1] != lead:
        raise ValueError(
            f"`teacher_ids` must have shape {lead} + (k,) (the hidden states' leading dims), got {teacher_ids.shape}"
        )
    if teacher_logprobs.shape != teacher_ids.shape:
        raise ValueError(
            f"`teacher_logprobs` shape {teacher_logprobs.shape} must equal `teacher_ids` shape {teacher_ids.shape}"
        )
    return _check_k(teacher_ids.shape[-1], vocab_size, "teacher_ids.shape[-1] (k)")


def _is_concrete(*arrays) -> bool:
    return not any(isinstance(a, jax.core.Tracer) for a in arrays)


def _check_distinct(ids, valid, vocab_size: int) -> None:
    """Raise when a valid row of concrete in-range ids repeats an id (out-of-range rows are NaN anyway)."""
    ids, valid = np.asarray(ids), np.asarray(valid)
    valid = valid & np.all((ids >= 0) & (ids < vocab_size), axis=-1)
    ordered = np.sort(ids[valid], axis=-1)
    repeated = np.any(ordered[:, 1:] == ordered[:, :-1], axis=-1)
    if repeated.any():
        row = int(np.flatnonzero(valid)[np.argmax(repeated)])
        raise ValueError(
            f"`teacher_ids` repeats an id within a row ({int(repeated.sum())} valid rows, the first is flat row "
            f"{row}: {ids[row].tolist()}); each row must hold k distinct ids"
        )


# Σ P of a row's cached log-probs may exceed 1 by rounding only: beyond this (in log Σ P), they are
# not log-probabilities (e.g. probabilities or logits passed in their place).
MAX_LOG_TOTAL_PROBABILITY = 1e-3


def _not_log_probabilities(logprobs, tail: str):
    """(N,) rows whose cached log-probs are not those of a distribution: Σ P > 1 (beyond rounding),
    a NaN, or, for ``"renormalize"``, no probability at all (every entry −inf: P_S / Σ P_S is 0/0)."""
    total = jax.nn.logsumexp(logprobs, axis=-1)  # log Σ P; −inf when every entry is −inf
    bad = (total > MAX_LOG_TOTAL_PROBABILITY) | jnp.any(jnp.isnan(logprobs), axis=-1)
    if tail == "renormalize":
        bad = bad | jnp.isneginf(total)
    return bad


def _check_log_probabilities(logprobs, valid, tail: str) -> None:
    """Raise when a valid row of concrete log-probs is not those of a distribution (see above)."""
    bad = np.asarray(_not_log_probabilities(logprobs, tail)) & np.asarray(valid)
    if bad.any():
        row = int(np.argmax(bad))
        total = float(np.exp(np.float64(jax.nn.logsumexp(logprobs[row]))))
        raise ValueError(
            "`teacher_logprobs` must be log-probabilities of the ids (Σ P ≤ 1, no NaN"
            + (", not all −inf with tail='renormalize'" if tail == "renormalize" else "")
            + f"); {int(bad.sum())} valid rows are not, the first is flat row {row} (Σ P = {total:.6g})"
        )


def fused_linear_topk_distill_loss(
    student_hidden,
    student_weight,
    teacher_ids,
    teacher_logprobs,
    labels,
    *,
    student_bias=None,
    beta=0.0,
    temperature=1.0,
    soft_weight=1.0,
    hard_weight=0.0,
    tail="bucket",
    ignore_index=-100,
    where=None,
    reduction="mean",
    chunk_size=None,
    axis_name=None,
    implementation=None,
    kernel_config=None,
    student_weight_layout="hv",
    return_aux=False,
):
    """Distillation loss of a student LM head against a cached top-k teacher, fused and chunked.

    With z_s = x_s W_s + b_s, Q = softmax(z_s/T) over the full vocabulary, and the teacher's
    cached P_i = exp(teacher_logprobs_i) at its ids (made at the distillation temperature, e.g.
    by :func:`teacher_topk`, and taken as given), the per-token loss is

        ℓ = soft_weight · JSD_β(P̃ ‖ Q̃) + hard_weight · CE,   CE = −log softmax(z_s)[y],

    where, for ``tail="bucket"``, P̃ = (P_1 … P_k, 1 − Σ P_i) and Q̃ = (Q_{id_1} … Q_{id_k},
    Σ_{v ∉ ids} Q_v) are distributions over k + 1 buckets (the student's tail is summed over the
    tail columns, never formed as 1 − Σ Q_ids; the teacher's is 1 − Σ P_i where that exceeds
    its float32 rounding δ_k = (k + 1)·2⁻²³, else δ_k where the student has a tail and 0 where it
    has none: k = V, or every tail column masked by a −inf bias; see
    :func:`jaxdistill.rowmath.teacher_tail_mass`), and for
    ``tail="renormalize"``, P̃ = P_ids / Σ P_ids and Q̃ = Q_ids / Σ Q_ids. JSD_β, its endpoints
    (β = 0: KL(P̃‖Q̃), β = 1: KL(Q̃‖P̃)), its β-accuracy and the reductions are those of
    :func:`jaxdistill.fused_linear_jsd_loss`; "bucket" with k = V equals the dense forward loss.

    The student side is the dense loss's driver: chunked over tokens, the gradients for
    ``student_hidden``, ``student_weight`` and ``student_bias`` computed in the forward pass. No
    teacher matmul runs. The dlogits are dense over V (the CE, and the bucket tail's
    Q_v·(…) term) plus the k id columns.

    Args:
      student_hidden: (..., H) floating. student_weight: (H, V), or (V, H) with
        ``student_weight_layout="vh"``. student_bias: optional (V,).
      teacher_ids: (..., k) integer ids (any integer dtype), distinct within each valid row,
        1 ≤ k ≤ V. A valid row with an id outside [0, V) makes the loss NaN. Repeated ids in a
        valid row raise ValueError when the ids and the validity mask are concrete; traced, they
        make the loss NaN. Ignored rows' ids and log-probs are never read.
      teacher_logprobs: (..., k) float32 (or float64) log P of those ids (−inf: probability 0). A valid row
        whose Σ P exceeds 1 by more than rounding (log Σ P > 1e-3: probabilities or logits passed
        in their place), with a NaN, or, for ``"renormalize"``, with every entry −inf (nothing to
        renormalize) raises ValueError when concrete and makes the loss NaN when traced.
      labels: (...) integer next-token ids, as for the dense loss.
      beta, temperature, soft_weight, hard_weight, ignore_index, where, reduction, chunk_size,
        axis_name, student_weight_layout, return_aux: as for :func:`jaxdistill.fused_linear_jsd_loss`
        (β defaults to 0, forward KL; T divides the student's logits only).
      tail: ``"bucket"`` or ``"renormalize"``.
      implementation: None (``"pallas"`` on a GPU, ``"xla"`` elsewhere), ``"xla"`` or ``"pallas"``
        (the row's two passes in :mod:`pallas_kernels.tail_rows`; interpret mode off the GPU).
      kernel_config: optional :class:`pallas_kernels.RowKernelConfig` of those kernels
        (``"pallas"`` only).

    Returns:
      The float32 scalar loss, or ``(loss, aux)`` with ``soft_loss``, ``hard_loss`` and
      ``num_valid_tokens``, as for the dense loss. The teacher cache gets zero gradients;
      gradients w.r.t. ``soft_weight``/``hard_weight`` are exact, w.r.t. β and T NaN. Second
      derivatives w.r.t. the student arguments are exact on the XLA path; the Pallas path
      computes first derivatives only and raises NotImplementedError when differentiated twice.

    Example:
      >>> import jax, jax.numpy as jnp
      >>> from jaxdistill import fused_linear_topk_distill_loss, teacher_topk
      >>> k = jax.random.split(jax.random.key(0), 5)
      >>> xs, ws = jax.random.normal(k[0], (2, 8, 16)), jax.random.normal(k[1], (16, 100)) / 4
      >>> xt, wt = jax.random.normal(k[2], (2, 8, 32)), jax.random.normal(k[3], (32, 100)) / 4
      >>> y = jax.random.randint(k[4], (2, 8), 0, 100)
      >>> cache = teacher_topk(xt, wt, 10, temperature=2.0)
      >>> loss, grad_w = jax.value_and_grad(fused_linear_topk_distill_loss, argnums=1)(
      ...     xs, ws, cache.ids, cache.logprobs, y, temperature=2.0, hard_weight=0.5)
      >>> grad_w.shape
      (16, 100)
    """
    if tail not in rowmath.TOPK_TAILS:
        raise ValueError(f"`tail` must be one of {rowmath.TOPK_TAILS}, got {tail!r}")
    a = validate_and_flatten(
        student_hidden,
        student_weight,
        None,
        None,
        labels,
        student_bias=student_bias,
        teacher_bias=None,
        beta=beta,
        temperature=temperature,
        soft_weight=soft_weight,
        hard_weight=hard_weight,
        ignore_index=ignore_index,
        where=where,
        reduction=reduction,
        return_aux=return_aux,
        student_weight_layout=student_weight_layout,
        dense_teacher=False,
    )
    vocab = a.vocab_size
    lead = jnp.shape(student_hidden)[:-1]
    k = _check_teacher_cache(teacher_ids, teacher_logprobs, lead, vocab)
    n_rows = a.labels.shape[0]
    ids = narrow_token_ids(teacher_ids, (n_rows, k), vocab)
    logprobs = jnp.reshape(jnp.asarray(teacher_logprobs), (n_rows, k)).astype(jnp.float32)
    if _is_concrete(ids, logprobs, a.valid):
        _check_distinct(ids, a.valid, vocab)
        _check_log_probabilities(logprobs, a.valid, tail)
    ordered = jnp.sort(ids, axis=-1)
    repeated = jnp.any(ordered[:, 1:] == ordered[:, :-1], axis=-1)
    out_of_range = jnp.any((ids < 0) | (ids >= vocab), axis=-1)
    bad_teacher = jnp.any(a.valid & (repeated | out_of_range | _not_log_probabilities(logprobs, tail)))
    # Ignored rows are never read: give them distinct in-range ids and finite log-probs (the
    # padding rows of a ragged last chunk get repeated ids 0; they are ignored too).
    ids = jnp.where(a.valid[:, None], jnp.clip(ids, 0, vocab - 1), jnp.arange(k, dtype=jnp.int32))
    logprobs = jnp.where(a.valid[:, None], logprobs, 0.0)

    requested, implementation = implementation, fused.resolve_implementation(implementation)
    fused.check_kernel_config(kernel_config, implementation, requested=requested)
    plan = fused.FusedPlan(
        chunk_size=fused.default_chunk_size(vocab) if chunk_size is None else chunk_size,
        implementation=implementation,
        divergence=fused.divergence_of(beta),
        kernel_config=kernel_config,
        interpret=jax.default_backend() != "gpu",
        student_weight_layout=student_weight_layout,
        teacher=tail,
    )
    return fused.fused_loss(
        dataclasses.replace(a, bad_teacher=bad_teacher),
        plan,
        student_weight,
        student_bias,
        (ids, logprobs),
        (),
        beta=beta,
        temperature=temperature,
        soft_weight=soft_weight,
        hard_weight=hard_weight,
        reduction=reduction,
        axis_name=axis_name,
        return_aux=return_aux,
    )
