"""Fused logits kernel: student and teacher logits of a chunk with their softmax partials.

One program computes one (``block_rows`` × ``block_v``) tile of both logits matrices,

    z_s = x_s · W_s (+ b_s),   z_t = x_t · W_t (+ b_t)     (float32 accumulators),

walking the hidden dimensions in ``block_k`` steps (Hs ≠ Ht is fine: two K loops into two
accumulators), and in its epilogue, for every row r of the tile (T = temperature, d = z − m with m
the row's maximum *inside this tile*):

* ``max_s`` = m_s, ``sum_q`` = Σ exp(d_s/T), ``sum_u`` = Σ exp(d_s) (untempered, for the CE),
* ``max_t`` = m_t, ``sum_p`` = Σ exp(d_t/T),
* ``kl_fwd`` = Σ exp(d_t/T)·(d_t − d_s)/T and ``kl_rev`` = Σ exp(d_s/T)·(d_s − d_t)/T, the
  tile's parts of KL(P‖Q) and KL(Q‖P) (see :func:`jaxdistill.rowmath.combine_partials`).

It stores each logits tile *relative to its own maximum*, d_s and d_t (every stored value is
≤ 0), in ``logits_dtype``, and the partials as float32 (n_tiles, R) arrays. Nothing
else of the chunk needs a pass over the logits: the row statistics come from the partials.

Weights are contracted in place in either layout: "hv" = (H, V) (Flax ``Dense`` kernel) or
"vh" = (V, H) (an ``nnx.Embed`` table). Any R, V and H: partial tiles are masked on every
load and store. float32 operands follow ``jax_default_matmul_precision`` (TF32 unless
"highest"), as XLA's matmuls do; other dtypes multiply in their own precision with float32
accumulation. Columns whose logit is −inf (a −inf bias mask) contribute nothing, and a tile
whose columns are all −inf reports max −inf with zero sums.

The grid is one-dimensional with row blocks fastest, so consecutive programs share a weight
tile (read from HBM once, then from L2) and the chunk's hidden states stay in L2.
"""

from __future__ import annotations

import dataclasses
import functools
import math
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax
from jax.experimental import pallas as pl
from jax.experimental.pallas import triton as plgpu

from pallas_kernels.config import ignore_triton_deprecation, is_power_of_two, out_shape_varying_like

_LOG2E = math.log2(math.e)
MIN_DOT_DIM = 16  # Triton's tl.dot needs every block dimension >= 16


def _next_power_of_two(n: int) -> int:
    return 1 << (max(int(n), 1) - 1).bit_length()


@dataclasses.dataclass(frozen=True)
class LogitsKernelConfig:
    """Tiling and launch parameters of :func:`logits_and_partials_pallas`.

    Attributes:
      block_rows: rows per tile (power of 2, >= 16).
      block_v: vocabulary columns per tile (power of 2, >= 16). Also the width over which the
        softmax partials are taken, hence the granularity of the stored relative logits.
      block_k: hidden-dimension step of the matmul loops (power of 2, >= 16).
      num_warps: warps per program (power of 2, 1..32).
      num_stages: Triton software-pipelining depth of the K loops (>= 1).
    """

    block_rows: int = 128
    block_v: int = 256
    block_k: int = 64
    num_warps: int = 8
    num_stages: int = 3

    def __post_init__(self):
        for name in ("block_rows", "block_v", "block_k", "num_warps", "num_stages"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int | np.integer):
                raise ValueError(f"LogitsKernelConfig.{name} must be an int, got {value!r}")
        for name in ("block_rows", "block_v", "block_k"):
            value = getattr(self, name)
            if not (is_power_of_two(value) and value >= MIN_DOT_DIM):
                raise ValueError(f"LogitsKernelConfig.{name} must be a power of 2 >= {MIN_DOT_DIM}, got {value}")
        if not (is_power_of_two(self.num_warps) and self.num_warps <= 32):
            raise ValueError(f"LogitsKernelConfig.num_warps must be a power of 2 in [1, 32], got {self.num_warps}")
        if self.num_stages < 1:
            raise ValueError(f"LogitsKernelConfig.num_stages must be >= 1, got {self.num_stages}")


def default_logits_kernel_config(rows: int, vocab_size: int, hidden_sizes: tuple[int, ...]) -> LogitsKernelConfig:
    """The default tiling: 128 × 256 × 64, 8 warps, 3 stages, shrunk to small problems.

    128 × 256 × 64 with 8 warps and 3 stages was the best of the block shapes probed on the H200
    for (1024 × 2048/4096) · (… × 128256) in bf16 (1.03× the two cuBLAS matmuls, statistics
    included). Each block dimension is clamped to the next power of two of the problem's size
    (but >= 16), so small problems do not compute mostly-masked tiles.
    """
    clamp = lambda n, cap: max(MIN_DOT_DIM, min(cap, _next_power_of_two(n)))  # noqa: E731
    return LogitsKernelConfig(
        block_rows=clamp(rows, 128),
        block_v=clamp(vocab_size, 256),
        block_k=clamp(min(hidden_sizes), 64),
        num_warps=8,
        num_stages=3,
    )


class TilePartials(NamedTuple):
    """Softmax partials per (vocabulary tile, row), each float32 (n_tiles, R); see the module doc."""

    max_s: jax.Array
    sum_q: jax.Array
    sum_u: jax.Array
    max_t: jax.Array
    sum_p: jax.Array
    kl_fwd: jax.Array
    kl_rev: jax.Array


@functools.partial(
    jax.tree_util.register_dataclass, data_fields=["student", "teacher", "partials"], meta_fields=["tile_width"]
)
@dataclasses.dataclass(frozen=True)
class ChunkLogits:
    """A chunk's logits relative to their tile maxima, and the tiles' softmax partials.

    A pytree whose ``tile_width`` is static (it passes through ``jit`` as a Python int).

    Attributes:
      student, teacher: (R, V) ``d = z − m_tile`` (≤ 0, or −inf), in the storage dtype.
      partials: :class:`TilePartials`, (n_tiles, R) each; tile j covers columns
        [j·tile_width, (j+1)·tile_width).
      tile_width: columns per tile.
    """

    student: jax.Array
    teacher: jax.Array
    partials: TilePartials
    tile_width: int


def _dot(a, b, a_contract: int, b_contract: int):
    return lax.dot_general(a, b, (((a_contract,), (b_contract,)), ((), ())), preferred_element_type=jnp.float32)


def _accumulate_logits(x_ref, w_ref, layout, hidden, r0, c0, row_mask, col_mask, cfg, compute_dtype):
    """(block_rows, block_v) float32 x[rows] · W[:, cols] over the hidden dimension in block_k steps."""
    bk = cfg.block_k
    ks = jnp.arange(bk, dtype=jnp.int32)
    k_ragged = hidden % bk != 0

    def step(k, acc):
        k0 = pl.multiple_of(k * bk, bk)
        k_mask = (k0 + ks) < hidden if k_ragged else None
        x_mask = _and(row_mask[:, None] if row_mask is not None else None, k_mask[None, :] if k_ragged else None)
        x = _load(x_ref.at[pl.ds(r0, cfg.block_rows), pl.ds(k0, bk)], x_mask)
        if layout == "hv":
            w_mask = _and(k_mask[:, None] if k_ragged else None, col_mask[None, :] if col_mask is not None else None)
            w = _load(w_ref.at[pl.ds(k0, bk), pl.ds(c0, cfg.block_v)], w_mask)
            return acc + _dot(x.astype(compute_dtype), w.astype(compute_dtype), 1, 0)
        w_mask = _and(col_mask[:, None] if col_mask is not None else None, k_mask[None, :] if k_ragged else None)
        w = _load(w_ref.at[pl.ds(c0, cfg.block_v), pl.ds(k0, bk)], w_mask)
        return acc + _dot(x.astype(compute_dtype), w.astype(compute_dtype), 1, 1)

    acc = jnp.zeros((cfg.block_rows, cfg.block_v), jnp.float32)
    return lax.fori_loop(0, pl.cdiv(hidden, bk), step, acc)


def _and(a, b):
    if a is None:
        return b
    if b is None:
        return a
    return a & b


def _load(view, mask):
    if mask is None:
        return plgpu.load(view)
    return plgpu.load(view, mask=mask, other=0)


def _tile_stats(z, col_mask, scale):
    """Row max m (−inf for an all −inf row), d = z − m, and exp2(d·scale) (0 where masked)."""
    if col_mask is not None:
        z = jnp.where(col_mask[None, :], z, -jnp.inf)
    m = jnp.max(z, axis=1)
    m_safe = jnp.where(m == -jnp.inf, 0.0, m)  # an all −inf row: d = −inf, e = 0 (never −inf − −inf)
    d = z - m_safe[:, None]
    return m, d, jnp.exp2(d * scale)


def _weighted_difference(e, a, b):
    """Σ_cols e·(a − b), with e = 0 terms contributing 0 even where a − b is not finite."""
    return jnp.sum(jnp.where(e > 0.0, e * (a - b), 0.0), axis=1)


def _head_kernel(
    inv_t_ref,
    x_ref,
    w_ref,
    b_ref,
    teacher_ref,
    d_ref,
    *stat_refs,
    rows,
    vocab,
    hidden,
    layout,
    n_row_blocks,
    cfg,
    compute_dtype,
):
    """One (block_rows × block_v) logits tile of one head, its relative store and its partials.

    Teacher launch (``teacher_ref`` None): stores d_t and (max_t, sum_p). Student launch: stores
    d_s and (max_s, sum_q, sum_u, kl_fwd, kl_rev), reading the teacher's stored d_t tile back
    for the KL parts. Two launches keep one float32 accumulator live per program (two would
    spill registers at 128 × 256), at the cost of re-reading the teacher tile once.
    """
    pid = pl.program_id(0)
    row_block, tile = pid % n_row_blocks, pid // n_row_blocks
    r0 = pl.multiple_of(row_block * cfg.block_rows, cfg.block_rows)
    c0 = pl.multiple_of(tile * cfg.block_v, cfg.block_v)
    row_ids = r0 + jnp.arange(cfg.block_rows, dtype=jnp.int32)
    col_ids = c0 + jnp.arange(cfg.block_v, dtype=jnp.int32)
    row_mask = row_ids < rows if rows % cfg.block_rows else None
    col_mask = col_ids < vocab if vocab % cfg.block_v else None
    mask2 = _and(
        row_mask[:, None] if row_mask is not None else None, col_mask[None, :] if col_mask is not None else None
    )
    tile_view = (pl.ds(r0, cfg.block_rows), pl.ds(c0, cfg.block_v))

    z = _accumulate_logits(x_ref, w_ref, layout, hidden, r0, c0, row_mask, col_mask, cfg, compute_dtype)
    if b_ref is not None:
        z = z + _load(b_ref.at[pl.ds(c0, cfg.block_v)], col_mask).astype(jnp.float32)[None, :]
    inv_t = inv_t_ref[0]
    c = _LOG2E * inv_t  # exp(d/T) = exp2(d·c)
    m, d, e = _tile_stats(z, col_mask, c)
    plgpu.store(d_ref.at[tile_view], d.astype(d_ref.dtype), mask=mask2)
    if teacher_ref is None:
        values = (m, jnp.sum(e, axis=1))
    else:
        d_t = _load(teacher_ref.at[tile_view], mask2).astype(jnp.float32)
        e_p = jnp.exp2(d_t * c)
        e_u = jnp.exp2(d * _LOG2E)
        if col_mask is not None:
            e_p = jnp.where(col_mask[None, :], e_p, 0.0)
            e_u = jnp.where(col_mask[None, :], e_u, 0.0)
        values = (
            m,
            jnp.sum(e, axis=1),
            jnp.sum(e_u, axis=1),
            _weighted_difference(e_p, d_t, d) * inv_t,
            _weighted_difference(e, d, d_t) * inv_t,
        )
    row_view = (tile, pl.ds(r0, cfg.block_rows))
    for ref, value in zip(stat_refs, values, strict=True):
        plgpu.store(ref.at[row_view], value, mask=row_mask)


def _launch_head(x, w, b, teacher_d, temperature, *, layout, logits_dtype, config, interpret, name):
    """One head's launch of :func:`_head_kernel`: (d, stats...) with (n_tiles, R) float32 stats."""
    rows, hidden = x.shape
    vocab = w.shape[1] if layout == "hv" else w.shape[0]
    n_tiles = pl.cdiv(vocab, config.block_v)
    n_row_blocks = pl.cdiv(rows, config.block_rows)
    kernel = functools.partial(
        _head_kernel,
        rows=rows,
        vocab=vocab,
        hidden=hidden,
        layout=layout,
        n_row_blocks=n_row_blocks,
        cfg=config,
        compute_dtype=jnp.promote_types(x.dtype, w.dtype),
    )
    operands = [x, w, b, teacher_d]
    present = [op is not None for op in operands]

    def kernel_with_optional(inv_t_ref, *refs):  # a None operand is dropped; the kernel sees None
        it = iter(refs[: sum(present)])
        kernel(inv_t_ref, *[next(it) if here else None for here in present], *refs[sum(present) :])

    n_stats = 2 if teacher_d is None else 5
    inv_t = (1.0 / jnp.asarray(temperature, jnp.float32)).reshape(1)
    out = out_shape_varying_like(inv_t, *operands)
    return pl.pallas_call(
        kernel_with_optional,
        grid=(n_row_blocks * n_tiles,),
        out_shape=[out((rows, vocab), logits_dtype)] + [out((n_tiles, rows), jnp.float32)] * n_stats,
        compiler_params=plgpu.CompilerParams(num_warps=config.num_warps, num_stages=config.num_stages),
        interpret=interpret,
        name=name,
    )(inv_t, *[op for op in operands if op is not None])


def _check(x, w, b, layout, name):
    if x.ndim != 2 or w.ndim != 2:
        raise ValueError(f"{name}: hidden states must be (R, H) and the weight 2-D, got {x.shape} and {w.shape}")
    if layout not in ("hv", "vh"):
        raise ValueError(f"{name}: layout must be 'hv' or 'vh', got {layout!r}")
    hidden, vocab = w.shape if layout == "hv" else w.shape[::-1]
    if x.shape[1] != hidden:
        raise ValueError(f"{name}: hidden size {x.shape[1]} does not match the weight {w.shape} ({layout})")
    if b is not None and b.shape != (vocab,):
        raise ValueError(f"{name}: bias must be ({vocab},), got {b.shape}")
    return hidden, vocab


def logits_and_partials_pallas(
    student_hidden: jax.Array,
    student_weight: jax.Array,
    student_bias: jax.Array | None,
    teacher_hidden: jax.Array,
    teacher_weight: jax.Array,
    teacher_bias: jax.Array | None,
    temperature: jax.Array,
    *,
    layouts: tuple[str, str] = ("hv", "hv"),
    logits_dtype=jnp.float32,
    config: LogitsKernelConfig | None = None,
    interpret: bool | None = None,
) -> ChunkLogits:
    """Both logits of a chunk, relative to their tile maxima, with the tiles' softmax partials.

    Args:
      student_hidden: (R, Hs) x_s. student_weight: (Hs, V) ("hv") or (V, Hs) ("vh").
      student_bias: (V,) or None.
      teacher_hidden: (R, Ht) x_t. teacher_weight: (Ht, V) or (V, Ht). teacher_bias: (V,) or None.
      temperature: scalar T > 0 (a runtime value: changing it does not recompile).
      layouts: the (student, teacher) weight layouts.
      logits_dtype: storage dtype of the relative logits (float32; bfloat16 halves the bytes
        but was refuted by the float64 error budget, see ``jaxdistill.fused``).
      config: tiling; None → :func:`default_logits_kernel_config`.
      interpret: Pallas interpret mode; None → ``jax.default_backend() != "gpu"``.

    Returns:
      :class:`ChunkLogits` with (R, V) logits in ``logits_dtype`` and (n_tiles, R) partials,
      ``n_tiles = ⌈V / config.block_v⌉``.

    Example:
      >>> xs, ws = jnp.ones((4, 32)), jnp.ones((32, 100)) / 32
      >>> xt, wt = jnp.ones((4, 16)), jnp.ones((16, 100)) / 16
      >>> out = logits_and_partials_pallas(xs, ws, None, xt, wt, None, jnp.float32(1.0))
      >>> out.student.shape, out.partials.sum_q.shape
      ((4, 100), (1, 4))
    """
    hidden_s, vocab = _check(student_hidden, student_weight, student_bias, layouts[0], "student")
    hidden_t, vocab_t = _check(teacher_hidden, teacher_weight, teacher_bias, layouts[1], "teacher")
    if vocab_t != vocab or teacher_hidden.shape[0] != student_hidden.shape[0]:
        raise ValueError("student and teacher must have the same rows and vocabulary")
    rows = student_hidden.shape[0]
    if config is None:
        config = default_logits_kernel_config(rows, vocab, (hidden_s, hidden_t))
    if interpret is None:
        interpret = jax.default_backend() != "gpu"
    logits_dtype = jnp.dtype(logits_dtype)
    n_tiles = pl.cdiv(vocab, config.block_v)
    if rows == 0:
        empty = jnp.zeros((n_tiles, 0), jnp.float32)
        z = jnp.zeros((0, vocab), logits_dtype)
        return ChunkLogits(z, z, TilePartials(*([empty] * 7)), config.block_v)
    ignore_triton_deprecation()
    launch = functools.partial(_launch_head, logits_dtype=logits_dtype, config=config, interpret=interpret)
    d_t, max_t, sum_p = launch(
        teacher_hidden, teacher_weight, teacher_bias, None, temperature, layout=layouts[1], name="teacher_logits"
    )
    d_s, max_s, sum_q, sum_u, kl_fwd, kl_rev = launch(
        student_hidden, student_weight, student_bias, d_t, temperature, layout=layouts[0], name="student_logits"
    )
    return ChunkLogits(d_s, d_t, TilePartials(max_s, sum_q, sum_u, max_t, sum_p, kl_fwd, kl_rev), config.block_v)
