"""The two full-row passes of the top-k teacher's row stage, as Pallas (Triton) kernels.

A top-k teacher (``jaxdistill.fused_linear_topk_distill_loss``) needs, from each student row of
float32 logits whose k teacher ids have been set to −inf (the *tail*), only

1. :func:`tail_statistics_pallas`: the tail's maximum and its two sums of exponentials
   (tempered, for Q_tail; untempered, for the CE), in one online pass (2 exp2 per element);
2. :func:`tail_dlogits_pallas`: the tail's dlogits from six row scalars,
   soft·Q_v/Q_tail + hard·(softmax(z_s)_v − [v = y]) (2 exp2 per element, one read, one write).

The (k+1)-wide bucket math between them, and the gather/scatter of the k id columns, are small
and stay in XLA (``jaxdistill.rowmath.topk_rows_and_dlogits``, whose jnp passes these kernels
replace). One program per row walks the row in ``block_v``-wide tiles, as the row kernel of
:mod:`pallas_kernels.distill_rows` does (same tiling, masks and launch config).
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl
from jax.experimental.pallas import triton as plgpu

from pallas_kernels.config import (
    RowKernelConfig,
    default_row_kernel_config,
    ignore_triton_deprecation,
    out_shape_varying_like,
)
from pallas_kernels.distill_rows import _LOG2E, _MAX_FLOOR, _masked, _Tiling

N_COEFFICIENTS = 6  # max_tail, log_sum_tail, soft, max_s, log_sum_u, hard


def _tail_statistics_kernel(inv_t_ref, z_ref, max_ref, sum_q_ref, sum_u_ref, *, tiling):
    c = _LOG2E * inv_t_ref[0]  # tempered base-2 scale

    def stats(start, cols, mask, tiles, carry):
        m, sum_q, sum_u = carry
        (z,) = tiles
        m_new = jnp.maximum(m, jnp.max(_masked(mask, z, -jnp.inf)))
        d = z - m_new  # shifted before scaling (exact), −inf at the ids
        sum_q = sum_q * jnp.exp2((m - m_new) * c) + _masked(mask, jnp.exp2(d * c))
        sum_u = sum_u * jnp.exp2((m - m_new) * _LOG2E) + _masked(mask, jnp.exp2(d * _LOG2E))
        return m_new, sum_q, sum_u

    lanes = jnp.zeros((tiling.block_v,), jnp.float32)
    floor = jnp.float32(_MAX_FLOOR)
    m, sum_q, sum_u = tiling.sweep(stats, (floor, lanes, lanes), loads=(z_ref,), eviction_policy="evict_last")
    max_ref[...] = jnp.where(m > floor, m, -jnp.inf)  # an empty tail has maximum −inf
    sum_q_ref[...] = jnp.sum(sum_q)
    sum_u_ref[...] = jnp.sum(sum_u)


def _tail_dlogits_kernel(inv_t_ref, label_ref, *refs, tiling):
    *coefficient_refs, z_ref, g_ref = refs
    max_tail, log_sum_tail, soft, max_s, log_sum_u, hard = (r[...] for r in coefficient_refs)
    c = _LOG2E * inv_t_ref[0]
    log2_sum_tail, log2_sum_u = log_sum_tail * _LOG2E, log_sum_u * _LOG2E
    label = label_ref[...]

    def write(start, cols, mask, tiles, carry):
        (z,) = tiles
        q_over_tail = jnp.exp2((z - max_tail) * c - log2_sum_tail)
        softmax_u = jnp.exp2((z - max_s) * _LOG2E - log2_sum_u)
        hard_grad = softmax_u - (cols == label).astype(jnp.float32)
        tiling.store(g_ref, start, mask, soft * q_over_tail + hard * hard_grad)
        return carry

    tiling.sweep(write, (), loads=(z_ref,), eviction_policy="evict_first", reverse=True)


def _launch_setup(z_tail, config, dtype, interpret):
    if z_tail.ndim != 2 or z_tail.dtype != jnp.float32:
        raise ValueError(f"z_tail must be (R, V) float32, got {z_tail.shape} {z_tail.dtype}")
    if z_tail.shape[1] == 0:
        raise ValueError("z_tail must have at least one column")
    vocab = z_tail.shape[1]
    if config is None:
        config = default_row_kernel_config(vocab, dtype)
    if not isinstance(config, RowKernelConfig):
        raise TypeError(f"config must be a RowKernelConfig, got {type(config).__name__}")
    if interpret is None:
        interpret = jax.default_backend() != "gpu"
    ignore_triton_deprecation()
    return config, interpret


_ROW_SCALAR = pl.BlockSpec((None,), lambda i: (i,))


@functools.partial(jax.jit, static_argnames=("config", "interpret"))
def tail_statistics_pallas(z_tail, inv_t, *, config: RowKernelConfig | None = None, interpret: bool | None = None):
    """Per-row maximum and sums of exponentials of (R, V) float32 logits (−inf columns weigh 0).

    Args:
      z_tail: (R, V) float32, −inf at the columns to leave out (a row's top-k ids).
      inv_t: scalar 1/T (runtime value).
      config: :class:`RowKernelConfig` (None: :func:`default_row_kernel_config`).
      interpret: Pallas interpret mode; None → off on a GPU backend.

    Returns:
      ``(max, sum_q, sum_u)``, (R,) float32 each: M = max_v z_v (−inf for a row of −inf),
      Σ exp((z − M)/T) and Σ exp(z − M) (0 for a row of −inf).
    """
    config, interpret = _launch_setup(z_tail, config, jnp.float32, interpret)
    rows, vocab = z_tail.shape
    if rows == 0:
        empty = jnp.zeros((0,), jnp.float32)
        return empty, empty, empty
    inv_t = jnp.reshape(jnp.asarray(inv_t, jnp.float32), (1,))
    out = out_shape_varying_like(z_tail, inv_t)
    return pl.pallas_call(
        functools.partial(_tail_statistics_kernel, tiling=_Tiling(vocab, config.block_v)),
        grid=(rows,),
        in_specs=[pl.BlockSpec((1,), lambda i: (0,)), pl.BlockSpec((None, vocab), lambda i: (i, 0))],
        out_specs=[_ROW_SCALAR] * 3,
        out_shape=[out((rows,), jnp.float32)] * 3,
        compiler_params=plgpu.CompilerParams(num_warps=config.num_warps, num_stages=config.num_stages),
        interpret=interpret,
        name="tail_statistics",
    )(inv_t, z_tail)


@functools.partial(jax.jit, static_argnames=("dlogits_dtype", "config", "interpret"))
def tail_dlogits_pallas(
    z_tail,
    labels,
    inv_t,
    coefficients,
    dlogits_dtype,
    *,
    config: RowKernelConfig | None = None,
    interpret: bool | None = None,
):
    """(R, V) dlogits of the tail columns from six row scalars (``jaxdistill.rowmath.TailCoefficients``).

    Column v of row r: soft·exp((z_v − max_tail)/T − log_sum_tail) + hard·(exp(z_v − max_s −
    log_sum_u) − [v = label]); the −inf columns get 0, except the label's (−hard) when the label
    is one of them (the caller scatters the values of all of them).

    Args:
      z_tail: (R, V) float32. labels: (R,) int (negative: no one-hot term). inv_t: scalar 1/T.
      coefficients: six (R,) float32 arrays ``(max_tail, log_sum_tail, soft, max_s, log_sum_u,
        hard)``, all finite.
      dlogits_dtype: output dtype. When float32 the output overwrites ``z_tail``'s buffer.
      config, interpret: as for :func:`tail_statistics_pallas`.
    """
    dlogits_dtype = jnp.dtype(dlogits_dtype)
    config, interpret = _launch_setup(z_tail, config, dlogits_dtype, interpret)
    if len(coefficients) != N_COEFFICIENTS:
        raise ValueError(f"expected {N_COEFFICIENTS} coefficient rows, got {len(coefficients)}")
    rows, vocab = z_tail.shape
    if labels.shape != (rows,) or not jnp.issubdtype(labels.dtype, jnp.integer):
        raise ValueError(f"labels must be ({rows},) integers, got {labels.shape} {labels.dtype}")
    if any(jnp.shape(x) != (rows,) for x in coefficients):
        raise ValueError(f"each coefficient must have shape ({rows},), got {[jnp.shape(x) for x in coefficients]}")
    if rows == 0:
        return jnp.zeros((0, vocab), dlogits_dtype)
    inv_t = jnp.reshape(jnp.asarray(inv_t, jnp.float32), (1,))
    labels = labels.astype(jnp.int32)
    coefficients = [jnp.asarray(x, jnp.float32) for x in coefficients]
    out = out_shape_varying_like(z_tail, inv_t, labels, *coefficients)
    row = pl.BlockSpec((None, vocab), lambda i: (i, 0))
    z_operand = 2 + N_COEFFICIENTS
    return pl.pallas_call(
        functools.partial(_tail_dlogits_kernel, tiling=_Tiling(vocab, config.block_v)),
        grid=(rows,),
        in_specs=[pl.BlockSpec((1,), lambda i: (0,))] + [_ROW_SCALAR] * (1 + N_COEFFICIENTS) + [row],
        out_specs=row,
        out_shape=out((rows, vocab), dlogits_dtype),
        # Each program reads a tile before it overwrites it, and never touches another row.
        input_output_aliases={z_operand: 0} if dlogits_dtype == jnp.float32 else {},
        compiler_params=plgpu.CompilerParams(num_warps=config.num_warps, num_stages=config.num_stages),
        interpret=interpret,
        name="tail_dlogits",
    )(inv_t, labels, *coefficients, z_tail)
