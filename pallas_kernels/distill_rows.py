"""Fused per-row distillation kernel: JSD_β / KL soft loss, CE hard loss and dlogits in one launch.

One program per row (grid over rows) walks the row in ``block_v``-wide vocabulary tiles
(unmasked full tiles in a ``fori_loop`` and one masked tail tile; see ``_Tiling.sweep`` for the
order), in as few passes over HBM as the divergence allows:

* β = 0, KL(P‖Q): pass 1 stats + KL(P‖Q) online (3 exp2 per element); pass 2 writes dlogits
  (3 exp2: q, p, softmax(z_s)). 2 reads of both logits + 1 write.
* β = 1, KL(Q‖P): pass 1 stats + KL(Q‖P) online (3 exp2); pass 2 writes dlogits (2 exp2: q,
  softmax(z_s)). 2 reads + 1 write.
* 0 < β < 1, JSD_β: pass 1 stats (3 exp2); pass 2 KL(P‖M), KL(Q‖M) (2 exp2 + 1 log1p); pass 3
  writes dlogits (3 exp2 + 1 log1p). 3 reads + 1 write.
* ignored row (label < 0): one pass writing zeros, no reads.

Consecutive passes over a row run in opposite directions (forward, backward, forward), so each
pass starts on the tiles the previous one read last, the ones most likely still in L2 (H200,
(1024, 128256) rows: −3 to −5 % at interior β; see ``bench/results/2026-11-28-h200-run2``).

"stats" is the online max / sum-exp of the tempered student s' = z_s/T, the untempered student
z_s (for the CE) and the tempered teacher t' = z_t/T: one shared max per input, one exp2 per
stream. KL(P‖Q) and KL(Q‖P) need only those normalizers, so they accumulate online in the same
pass (Σ e·(Δt' − Δs') with the same rescaling as the sums); the interior JSD needs log M, which
exists only once both normalizers are final, hence its extra pass. The gradient w.r.t. s' needs
a row scalar (KL, or Σ Q a = (1−β)·KL(Q‖M)) known only after a full pass, so dlogits are
always written by the last pass. In the mixture, p, q and log M share two exp2 and one log1p
(log M = hi + log1p(exp(lo − hi)) with {hi, lo} = {log βp, log (1−β)q}: a log-sum-exp that
never takes the log of an underflowing sum).

The math runs in base 2 (``exp2`` of inputs pre-scaled by log2(e)/T, one multiply per element);
logits are shifted by the running raw maximum *before* scaling, ((z − m)·c), so that the shift is
exact whatever FMA contraction the compiler applies and the online rescale factors match.
Accuracy matches a plain float32 evaluation of the contract, except one known cancellation: for
β = 1 and a one-hot student at extreme logits, Q ⊙ (log Q − log P − KL) leaves ≈ ε·KL·w/T in
the top entry (KL and the entry are rounded along different paths; ε = float32 epsilon).
"""

from __future__ import annotations

import dataclasses
import functools
import math
import warnings

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl
from jax.experimental.pallas import triton as plgpu

from pallas_kernels.config import RowKernelConfig, default_row_kernel_config

_LOG2E = math.log2(math.e)
_LN2 = math.log(2.0)

# Branches of the in-kernel switch. The first three follow the β rule of
# jaxdistill.rowmath.divergence_branch (β ≤ 0 forward KL, β ≥ 1 reverse KL, else the mixture),
# restated here because pallas_kernels does not import jaxdistill.
_FORWARD_KL, _MIXTURE_JSD, _REVERSE_KL = range(3)

# JAX 0.11 warns at every lowering of a Pallas kernel through Triton; this is that warning only.
_TRITON_DEPRECATION = r"The Pallas Triton backend is deprecated"


def _ignore_triton_deprecation() -> None:
    """Silence exactly the Triton-backend DeprecationWarning (category and message).

    Installed on every launch rather than once at import: the warning fires when the enclosing
    jit lowers, and test runners reset the filter list around each test. ``filterwarnings``
    replaces an identical entry, so repeating it does not grow the list.
    """
    warnings.filterwarnings("ignore", message=_TRITON_DEPRECATION, category=DeprecationWarning)


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


def _divergence_row(kind, tiling, hyper, label, s_ref, t_ref, soft_ref, hard_ref, g_ref):
    """Losses and dlogits of one valid row for one divergence kind (statically specialized)."""
    beta, inv_t, soft_weight, hard_weight = hyper
    c = _LOG2E * inv_t  # tempered base-2 scale: log2 softmax(z/T) = (z − m)·c − log2 S

    def stats(start, cols, mask, tiles, carry):
        ms, mt, sum_q, sum_u, sum_p, kl_acc = carry
        s, t = tiles
        ms_new = jnp.maximum(ms, jnp.max(_masked(mask, s, -jnp.inf)))
        mt_new = jnp.maximum(mt, jnp.max(_masked(mask, t, -jnp.inf)))
        ds = s - ms_new
        dq, du, dp = ds * c, ds * _LOG2E, (t - mt_new) * c  # shifted base-2 logits (≤ 0)
        eq = _masked(mask, jnp.exp2(dq))
        eu = _masked(mask, jnp.exp2(du))
        ep = _masked(mask, jnp.exp2(dp))
        shift_q, shift_p = (ms - ms_new) * c, (mt - mt_new) * c  # ≤ 0: old terms move by these
        alpha_q, alpha_u, alpha_p = jnp.exp2(shift_q), jnp.exp2((ms - ms_new) * _LOG2E), jnp.exp2(shift_p)
        # The sums are per-lane (block_v,) accumulators, reduced once after the sweep: the only
        # cross-warp reductions inside the loop are the two maxima.
        if kind == _FORWARD_KL:  # Σ e_p·(dp − dq); old terms gain shift_p − shift_q
            kl_acc = alpha_p * (kl_acc + sum_p * (shift_p - shift_q)) + ep * (dp - dq)
        elif kind == _REVERSE_KL:  # Σ e_q·(dq − dp)
            kl_acc = alpha_q * (kl_acc + sum_q * (shift_q - shift_p)) + eq * (dq - dp)
        sum_q = sum_q * alpha_q + eq
        sum_u = sum_u * alpha_u + eu
        sum_p = sum_p * alpha_p + ep
        return ms_new, mt_new, sum_q, sum_u, sum_p, kl_acc

    # Start the running maxima at column 0 (a finite lower bound of the row max), so every
    # rescale factor and shift is finite from the first tile on.
    lanes = jnp.zeros((tiling.block_v,), jnp.float32)
    init = (s_ref[0].astype(jnp.float32), t_ref[0].astype(jnp.float32), lanes, lanes, lanes, lanes)
    ms, mt, *lane_sums = tiling.sweep(stats, init, loads=(s_ref, t_ref), eviction_policy="evict_last")
    sum_q, sum_u, sum_p, kl_acc = (jnp.sum(x) for x in lane_sums)
    log2_sum_q = jnp.log(sum_q) * _LOG2E
    log2_sum_p = jnp.log(sum_p) * _LOG2E
    log2_sum_u = jnp.log(sum_u) * _LOG2E
    hard_ref[...] = (ms - s_ref[label].astype(jnp.float32)) + jnp.log(sum_u)

    def log2_probs(s, t):
        """log2 Q and log2 P of a tile (tempered)."""
        return (s - ms) * c - log2_sum_q, (t - mt) * c - log2_sum_p

    def mixture(lq, lp):
        """q, p and log2 M = log2(βp + (1−β)q) from two exp2 and one log1p (log-sum-exp form)."""
        a = lp + jnp.log(beta) * _LOG2E  # log2 βp
        b = lq + jnp.log1p(-beta) * _LOG2E  # log2 (1−β)q
        hi, lo = jnp.maximum(a, b), jnp.minimum(a, b)
        ratio = jnp.exp2(lo - hi)
        e_hi = jnp.exp2(hi)
        e_lo = e_hi * ratio
        p_is_hi = a >= b
        p = jnp.where(p_is_hi, e_hi, e_lo) * (1.0 / beta)
        q = jnp.where(p_is_hi, e_lo, e_hi) * (1.0 / (1.0 - beta))
        return q, p, hi + jnp.log1p(ratio) * _LOG2E

    if kind == _FORWARD_KL:
        kl = kl_acc / sum_p - log2_sum_p + log2_sum_q  # KL(P‖Q) in bits
        soft = _LN2 * kl
    elif kind == _REVERSE_KL:
        kl = kl_acc / sum_q - log2_sum_q + log2_sum_p  # KL(Q‖P) in bits
        soft = _LN2 * kl
    else:

        def mixture_kls(start, cols, mask, tiles, carry):
            kl_pm, kl_qm = carry
            lq, lp = log2_probs(*tiles)
            q, p, log2_m = mixture(lq, lp)
            kl_pm = kl_pm + _masked(mask, p) * (lp - log2_m)
            kl_qm = kl_qm + _masked(mask, q) * (lq - log2_m)
            return kl_pm, kl_qm

        kl_sums = tiling.sweep(
            mixture_kls, (lanes, lanes), loads=(s_ref, t_ref), eviction_policy="evict_last", reverse=True
        )
        kl_pm, kl_qm = (jnp.sum(x) for x in kl_sums)
        soft = _LN2 * (beta * kl_pm + (1.0 - beta) * kl_qm)
    soft_ref[...] = soft

    def soft_grad(lq, lp):
        """∂JSD_β/∂s' of a tile (natural units)."""
        if kind == _FORWARD_KL:
            return jnp.exp2(lq) - jnp.exp2(lp)
        if kind == _REVERSE_KL:
            return _LN2 * jnp.exp2(lq) * (lq - lp - kl)
        q, _, log2_m = mixture(lq, lp)  # Q ⊙ (a − Σ Q a), a = (1−β)(log Q − log M)
        return ((1.0 - beta) * _LN2) * q * (lq - log2_m - kl_qm)

    soft_scale = soft_weight * inv_t

    def write(start, cols, mask, tiles, carry):
        s, t = tiles
        lq, lp = log2_probs(s, t)
        softmax_z = jnp.exp2((s - ms) * _LOG2E - log2_sum_u)
        hard_grad = softmax_z - (cols == label).astype(jnp.float32)
        tiling.store(g_ref, start, mask, soft_scale * soft_grad(lq, lp) + hard_weight * hard_grad)
        return carry

    # Alternate directions: the last pass runs against the one before it (see _Tiling.sweep).
    tiling.sweep(write, (), loads=(s_ref, t_ref), eviction_policy="evict_first", reverse=kind != _MIXTURE_JSD)


def _ignored_row(tiling, soft_ref, hard_ref, g_ref):
    """An ignored row: zero losses and zero dlogits, without reading the logits."""
    soft_ref[...] = jnp.float32(0.0)
    hard_ref[...] = jnp.float32(0.0)

    def write(start, cols, mask, tiles, carry):
        tiling.store(g_ref, start, mask, jnp.zeros((tiling.block_v,), jnp.float32))
        return carry

    tiling.sweep(write, ())


def _distill_row_kernel(hyper_ref, label_ref, s_ref, t_ref, soft_ref, hard_ref, g_ref, *, tiling):
    # β (and ignored rows) select among four statically specialized row programs with an
    # in-kernel switch on the loaded scalars: it is uniform per program (no divergence), keeps
    # one compiled kernel for every β (β is a runtime value), and, unlike a launcher-level
    # lax.switch over three kernels, needs no device-to-host read of the branch index. Each
    # program then pays only for its own passes and accumulators, and ignored rows (the padding
    # of a ragged last chunk) skip all reads.
    beta = hyper_ref[0]
    temperature = hyper_ref[1]
    hyper = (beta, 1.0 / temperature, hyper_ref[2], hyper_ref[3])
    label = label_ref[...]
    safe_label = jnp.minimum(label, tiling.vocab_size - 1)  # never read outside the row
    refs = (s_ref, t_ref, soft_ref, hard_ref, g_ref)
    forward_kl, mixture_jsd, reverse_kl = (
        functools.partial(_divergence_row, kind, tiling, hyper, safe_label, *refs)
        for kind in (_FORWARD_KL, _MIXTURE_JSD, _REVERSE_KL)
    )
    # Nested boolean conds, not lax.switch: switch clamps its index, and that clamp lowers to an
    # `arith.maxsi` whose operand types XLA's Triton rejects ("requires the same type for all
    # operands and results", seen on the H200 with jax 0.11.2).
    lax.cond(
        label < 0,
        functools.partial(_ignored_row, tiling, soft_ref, hard_ref, g_ref),
        lambda: lax.cond(beta <= 0.0, forward_kl, lambda: lax.cond(beta >= 1.0, reverse_kl, mixture_jsd)),
    )


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
    if hyper.shape != (4,) or not jnp.issubdtype(hyper.dtype, jnp.floating):
        raise ValueError(f"hyper must be a (4,) float array [beta, T, soft_w, hard_w], got {hyper.shape} {hyper.dtype}")


@functools.partial(jax.jit, static_argnames=("dlogits_dtype", "config", "interpret"))
def distill_rows_pallas(
    student_logits: jax.Array,
    teacher_logits: jax.Array,
    labels: jax.Array,
    hyper: jax.Array,
    *,
    dlogits_dtype,
    config: RowKernelConfig | None = None,
    interpret: bool | None = None,
) -> tuple[jax.Array, jax.Array, jax.Array]:
    """Per-row JSD_β and CE losses of a chunk with dlogits, as one Pallas (Triton) kernel.

    Same contract as ``jaxdistill.rowmath.distill_rows``: with s' = z_s/T, t' = z_t/T,
    Q = softmax(s') (student), P = softmax(t') (teacher) and M = βP + (1−β)Q, row r gets

    * ``soft_rows[r]`` = JSD_β = β·KL(P‖M) + (1−β)·KL(Q‖M) (β = 0: KL(P‖Q); β = 1: KL(Q‖P));
    * ``hard_rows[r]`` = −log softmax(z_s)[y] (untempered);
    * ``dlogits[r]`` = soft_weight/T · ∂JSD_β/∂s' + hard_weight · (softmax(z_s) − onehot(y)).

    Rows with a negative label are ignored: zeros in all three outputs. β, T and the weights
    are runtime values (changing them does not recompile).

    When ``dlogits_dtype`` is float32 the dlogits overwrite the student logits buffer
    (``input_output_aliases``): free when the logits die at this call (as inside a chunked
    loss), a copy inserted by XLA otherwise.

    Args:
      student_logits: (R, V) float32 student logits z_s.
      teacher_logits: (R, V) float32 teacher logits z_t.
      labels: (R,) integer; in [0, V) for valid rows, negative for ignored rows. A label ≥ V
        gives a NaN ``hard_rows`` entry (the row's dlogits then use column V − 1 as the label).
      hyper: (4,) float32 ``[beta, temperature, soft_weight, hard_weight]``, β ∈ [0, 1], T > 0.
      dlogits_dtype: dtype of the returned gradient (the activation dtype).
      config: tiling / launch config; None → :func:`default_row_kernel_config`.
      interpret: run in Pallas interpret mode; None → ``jax.default_backend() != "gpu"``.

    Returns:
      ``(soft_rows (R,) float32, hard_rows (R,) float32, dlogits (R, V) dlogits_dtype)``.

    Raises:
      ValueError: wrong shapes or dtypes.

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
    rows, vocab = student_logits.shape
    dlogits_dtype = jnp.dtype(dlogits_dtype)
    if config is None:
        config = default_row_kernel_config(vocab, dlogits_dtype)
    if interpret is None:
        interpret = jax.default_backend() != "gpu"
    if rows == 0:
        empty = jnp.zeros((0,), jnp.float32)
        return empty, empty, jnp.zeros((0, vocab), dlogits_dtype)
    _ignore_triton_deprecation()
    row_scalar = pl.BlockSpec((None,), lambda i: (i,))
    row = pl.BlockSpec((None, vocab), lambda i: (i, 0))
    kernel = functools.partial(_distill_row_kernel, tiling=_Tiling(vocab, config.block_v))
    soft_rows, hard_rows, dlogits = pl.pallas_call(
        kernel,
        grid=(rows,),
        in_specs=[pl.BlockSpec((4,), lambda i: (0,)), row_scalar, row, row],
        out_specs=[row_scalar, row_scalar, row],
        out_shape=[
            jax.ShapeDtypeStruct((rows,), jnp.float32),
            jax.ShapeDtypeStruct((rows,), jnp.float32),
            jax.ShapeDtypeStruct((rows, vocab), dlogits_dtype),
        ],
        # Operand 2 (student logits) → output 2 (dlogits): each program reads a tile before it
        # overwrites that same tile, and never touches another row.
        input_output_aliases={2: 2} if dlogits_dtype == student_logits.dtype else {},
        compiler_params=plgpu.CompilerParams(num_warps=config.num_warps, num_stages=config.num_stages),
        interpret=interpret,
        name="distill_rows",
    )(hyper.astype(jnp.float32), labels.astype(jnp.int32), student_logits, teacher_logits)
    # The kernel clamps labels into the row (it never reads outside it); flag the ones it clamped.
    return soft_rows, jnp.where(labels >= vocab, jnp.nan, hard_rows), dlogits
