"""The fused linear distillation loss: one ``jax.custom_vjp`` driving a ``lax.scan`` over chunks.

The forward pass walks the N tokens in chunks of ``chunk_size`` rows. For each chunk it
computes the student and teacher logits (float32 accumulation), hands them to a chunk
implementation (the jnp row math of :mod:`jaxdistill.rowmath` or the Pallas kernel of
:mod:`pallas_kernels`) that returns per-row losses and the student-logit gradient, and
immediately contracts that gradient into grad_x (per chunk) and grad_W / grad_b (float32
accumulators). No more than one chunk of logits is ever alive. The loss is linear in its
cotangent, so the backward pass only scales the saved gradients.
"""

from __future__ import annotations

import dataclasses
import functools
import math

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax

from jaxdistill import rowmath
from jaxdistill._validate import concrete_float, validate_and_flatten
from pallas_kernels import (
    ChunkLogits,
    RowKernelConfig,
    distill_rows_pallas,
    logits_and_partials_pallas,
    tail_dlogits_pallas,
    tail_statistics_pallas,
)

IMPLEMENTATIONS = ("xla", "pallas")
# The teacher of a plan: a dense head, or cached top-k log-probs with one of rowmath.TOPK_TAILS.
DENSE_TEACHER = "dense"
# Budget for the two float32 (chunk, V) logits buffers of one chunk; the dlogits and the
# kernel's temporaries add at most about the same again.
DEFAULT_LOGITS_BUDGET_BYTES = 1 << 30
MIN_CHUNK_ROWS, MAX_CHUNK_ROWS = 16, 4096


def default_chunk_size(vocab_size: int, logits_budget_bytes: int = DEFAULT_LOGITS_BUDGET_BYTES) -> int:
    """Rows per chunk: the largest power of two whose two float32 logits buffers fit the budget.

    chunk = 2^⌊log2(budget / (8·V))⌋, clamped to [16, 4096]. With the 1 GiB default that is
    1024 rows at V = 128256, 512 at V = 262144 and 4096 at V = 32000: large enough for the
    chunk's matmuls to run near peak, small enough that the chunk's logits (and not N) bound
    the temporary memory.
    """
    rows = max(1, logits_budget_bytes // (8 * vocab_size))
    return int(min(MAX_CHUNK_ROWS, max(MIN_CHUNK_ROWS, 2 ** math.floor(math.log2(rows)))))


def resolve_implementation(implementation: str | None) -> str:
    """``None`` → ``"pallas"`` on a GPU backend, ``"xla"`` elsewhere; validates the name."""
    if implementation is None:
        return "pallas" if jax.default_backend() == "gpu" else "xla"
    if implementation not in IMPLEMENTATIONS:
        raise ValueError(f"`implementation` must be None or one of {IMPLEMENTATIONS}, got {implementation!r}")
    return implementation


def check_kernel_config(kernel_config, implementation: str, *, requested) -> None:
    """``kernel_config`` is None or a :class:`RowKernelConfig` for the resolved ``"pallas"``.

    ``requested`` is the ``implementation`` argument as the caller gave it, so that the message
    says when None resolved to ``"xla"`` (no GPU backend).
    """
    if kernel_config is None:
        return
    if implementation != "pallas":
        given = f"implementation={requested!r}"
        if requested is None:
            given += f', which resolved to "{implementation}" on the {jax.default_backend()} backend'
        raise ValueError(f"`kernel_config` applies only to implementation='pallas'; got {given}")
    if not isinstance(kernel_config, RowKernelConfig):
        raise TypeError(f"`kernel_config` must be a RowKernelConfig, got {type(kernel_config).__name__}")


def divergence_of(beta) -> str:
    """The divergence branch of a β known at trace time (its exact value), or ``TRACED_BETA``.

    β = 0 exactly is forward KL and β = 1 exactly reverse KL; every other β in (0, 1), however
    close to an endpoint (1e-40, 1 − 1e-8), is the mixture JSD_β.
    """
    value = concrete_float(beta, "beta")
    if value is None:
        return rowmath.TRACED_BETA
    if value == 0.0:
        return rowmath.FORWARD_KL
    if value == 1.0:
        return rowmath.REVERSE_KL
    return rowmath.MIXTURE_JSD


@dataclasses.dataclass(frozen=True)
class FusedPlan:
    """Static plan of one fused call (hashable; part of the jit cache key).

    Attributes:
      chunk_size: rows per chunk (≥ 1); the last chunk is padded and masked.
      implementation: ``"xla"`` or ``"pallas"`` (which logits stage runs; see
        :mod:`jaxdistill.rowmath`). Over a sharded vocabulary ``"pallas"`` is the fused logits
        kernel followed by the row stages of the XLA path (the whole-row kernel cannot take
        all-reduced row statistics).
      divergence: the static divergence branch (:func:`divergence_of`).
      kernel_config: launch config of the Pallas row kernel (None: its default; None for ``"xla"``).
      interpret: run the Pallas kernel in interpret mode (non-GPU backends).
      student_weight_layout, teacher_weight_layout: ``"hv"`` ((H, V) kernel) or ``"vh"``
        ((V, H) table, e.g. a tied embedding), contracted in place without a transpose.
      vocab_axis_name: mesh axis over which the vocabulary is sharded, or None. The weights
        and biases are then this device's contiguous V/M-column shard (in axis-index order);
        the row statistics are all-reduced over the axis, and so is grad_x.
      teacher: ``DENSE_TEACHER`` (the teacher's hidden states and head: rows ``(x_t,)``, shared
        ``(w_t, b_t)``) or a top-k teacher, one of ``rowmath.TOPK_TAILS`` (rows
        ``(ids, logprobs)``, nothing shared; the row stage of :func:`jaxdistill.rowmath.
        topk_rows_and_dlogits` with that tail).
    """

    chunk_size: int
    implementation: str
    divergence: str = rowmath.TRACED_BETA
    kernel_config: RowKernelConfig | None = None
    interpret: bool = False
    student_weight_layout: str = "hv"
    teacher_weight_layout: str = "hv"
    vocab_axis_name: str | None = None
    teacher: str = DENSE_TEACHER

    def __post_init__(self):
        if isinstance(self.chunk_size, bool) or not isinstance(self.chunk_size, (int, np.integer)):
            raise ValueError(f"`chunk_size` must be a positive int, got {self.chunk_size!r}")
        object.__setattr__(self, "chunk_size", int(self.chunk_size))
        if self.chunk_size <= 0:
            raise ValueError(f"`chunk_size` must be a positive int, got {self.chunk_size!r}")
        if self.teacher not in (DENSE_TEACHER, *rowmath.TOPK_TAILS):
            raise ValueError(f"FusedPlan.teacher must be {DENSE_TEACHER!r} or one of {rowmath.TOPK_TAILS}")
        if self.teacher != DENSE_TEACHER and self.vocab_axis_name is not None:
            raise ValueError("a top-k teacher does not support `vocab_axis_name` (a sharded vocabulary)")

    def chunk_logits(self, x_s, w_s, b_s, x_t, w_t, b_t, hyper) -> ChunkLogits:
        """Stage 1: the chunk's float32 logits relative to their tile maxima, and the tiles' partials.

        ``"xla"``: XLA's logits, one tile per row. ``"pallas"``: the fused logits kernel
        (:func:`pallas_kernels.logits_and_partials_pallas`, float32 storage).
        """
        if self.implementation == "pallas":
            return logits_and_partials_pallas(
                x_s,
                w_s,
                b_s,
                x_t,
                w_t,
                b_t,
                1.0 / hyper.inv_temperature,
                layouts=(self.student_weight_layout, self.teacher_weight_layout),
                logits_dtype=jnp.float32,
                interpret=self.interpret,
            )
        z_s = _logits(x_s, w_s, b_s, self.student_weight_layout)
        z_t = _logits(x_t, w_t, b_t, self.teacher_weight_layout)
        return rowmath.chunk_logits_xla(z_s, z_t, hyper.inv_temperature)

    def rows(self, x_s, w_s, b_s, teacher_rows, teacher_shared, labels, hyper, *, with_dlogits):
        """One chunk's (soft_rows, hard_rows, dlogits or None).

        ``"xla"``: the three stages of :mod:`jaxdistill.rowmath`. ``"pallas"``: XLA's logits, then
        the Pallas row kernel, which computes the statistics, losses and dlogits of whole rows in
        its own passes (given the exact 1 − β and the branch of ``divergence``, so both paths decide
        the β branch from the exact β). ``"pallas"`` over a sharded
        vocabulary: the three stages, stage 1 in the fused logits kernel. A top-k teacher: XLA's
        student logits, then :func:`jaxdistill.rowmath.topk_rows_and_dlogits` (its two passes over
        the row in Pallas kernels for ``"pallas"``).
        """
        if self.teacher != DENSE_TEACHER:
            ids, logprobs = teacher_rows
            return rowmath.topk_rows_and_dlogits(
                _logits(x_s, w_s, b_s, self.student_weight_layout),
                ids,
                logprobs,
                labels,
                hyper,
                divergence=self.divergence,
                tail=self.teacher,
                dlogits_dtype=x_s.dtype,
                with_dlogits=with_dlogits,
                passes=self.tail_passes(),
            )
        (x_t,), (w_t, b_t) = teacher_rows, teacher_shared
        if self.implementation == "pallas" and self.vocab_axis_name is None:
            z_s = _logits(x_s, w_s, b_s, self.student_weight_layout)
            z_t = _logits(x_t, w_t, b_t, self.teacher_weight_layout)
            soft_rows, hard_rows, dlogits = _row_kernel(
                z_s,
                z_t,
                labels,
                rowmath.kernel_hyper(hyper, self.divergence),
                dlogits_dtype=x_s.dtype,
                config=self.kernel_config,
                interpret=self.interpret,
                branch=rowmath.kernel_branch(self.divergence),
            )
            return soft_rows, hard_rows, dlogits if with_dlogits else None
        chunk = self.chunk_logits(x_s, w_s, b_s, x_t, w_t, b_t, hyper)
        stats = rowmath.combine_partials(chunk.partials, hyper.inv_temperature, vocab_axis_name=self.vocab_axis_name)
        vocab_start = self.vocab_start(w_s)
        label_logits = _label_logits(
            x_s, w_s, b_s, labels, self.student_weight_layout, vocab_start, self.vocab_axis_name
        )
        return rowmath.soft_rows_and_dlogits(
            chunk,
            stats,
            labels,
            label_logits,
            hyper,
            divergence=self.divergence,
            dlogits_dtype=x_s.dtype,
            with_dlogits=with_dlogits,
            vocab_axis_name=self.vocab_axis_name,
            vocab_start=vocab_start,
        )

    def tail_passes(self) -> rowmath.TailPasses:
        """The two passes over a top-k teacher's student row: jnp (``"xla"``) or Pallas kernels."""
        if self.implementation != "pallas":
            return rowmath.TAIL_PASSES_XLA
        options = dict(config=self.kernel_config, interpret=self.interpret)
        statistics_kernel = _first_derivatives_only(functools.partial(tail_statistics_pallas, **options))

        def statistics(z_tail, inv_t):
            return rowmath.TailStatistics(*statistics_kernel(z_tail, inv_t))

        def dlogits(z_tail, labels, inv_t, coefficients, dlogits_dtype):
            launch = functools.partial(tail_dlogits_pallas, dlogits_dtype=dlogits_dtype, **options)
            return _first_derivatives_only(launch)(z_tail, labels, inv_t, tuple(coefficients))

        return rowmath.TailPasses(statistics, dlogits)

    def vocab_start(self, w_s):
        """Global id of this device's first vocabulary column (0 unless the vocabulary is sharded)."""
        if self.vocab_axis_name is None:
            return 0
        local_vocab = w_s.shape[1 - hidden_dim(self.student_weight_layout)]
        return lax.axis_index(self.vocab_axis_name) * local_vocab


def _contract(a, b, a_dim: int, b_dim: int):
    """Σ over a's ``a_dim`` and b's ``b_dim`` of two 2-D arrays, float32 accumulation."""
    return lax.dot_general(a, b, (((a_dim,), (b_dim,)), ((), ())), preferred_element_type=jnp.float32)


def hidden_dim(layout: str) -> int:
    """Index of the hidden dimension H of a weight stored in ``layout``."""
    return 0 if layout == "hv" else 1


def _logits(hidden, weight, bias, layout):
    """(C, H) · weight (+ (V,)) → (C, V) float32, weight (H, V) or (V, H) by ``layout``."""
    z = _contract(hidden, weight, 1, hidden_dim(layout))
    return z if bias is None else z + bias.astype(jnp.float32)


def _first_derivatives_only(launch):
    """``launch`` (a Pallas kernel call), with a clear error where it would be differentiated.

    First derivatives come from the custom VJP's forward pass, which runs the kernels on primal
    values; grad-of-grad or ``jax.hessian`` would differentiate a kernel itself (unsupported).
    """
    kernel = jax.custom_jvp(launch)

    @kernel.defjvp
    def _(primals, tangents):
        raise NotImplementedError("second derivatives are not supported on the Pallas path; use implementation='xla'")

    return kernel


def _row_kernel(z_s, z_t, labels, kernel_hyper, *, dlogits_dtype, config, interpret, branch):
    """:func:`pallas_kernels.distill_rows_pallas`, first derivatives only (:func:`_first_derivatives_only`)."""
    launch = functools.partial(
        distill_rows_pallas, dlogits_dtype=dlogits_dtype, config=config, interpret=interpret, branch=branch
    )
    return _first_derivatives_only(launch)(z_s, z_t, labels, kernel_hyper)


def _label_logits(x_s, w_s, b_s, labels, layout, vocab_start, vocab_axis_name):
    """z_s[y] per row, float32, from the label's weight column alone (C·H work, not C·V).

    Over a sharded vocabulary the shard that holds the label contributes it (a psum of one row
    scalar). Ignored rows (negative labels) get an arbitrary finite value.
    """
    local_vocab = w_s.shape[1 - hidden_dim(layout)]
    local = labels - vocab_start
    here = (local >= 0) & (local < local_vocab)
    safe = jnp.clip(local, 0, local_vocab - 1)
    columns = jnp.take(w_s, safe, axis=1 - hidden_dim(layout))  # (H, C) for "hv", (C, H) for "vh"
    if layout == "hv":
        z = jnp.einsum("ch,hc->c", x_s, columns, preferred_element_type=jnp.float32)
    else:
        z = jnp.einsum("ch,ch->c", x_s, columns, preferred_element_type=jnp.float32)
    if b_s is not None:
        z = z + b_s[safe].astype(jnp.float32)
    if vocab_axis_name is None:
        return z
    return lax.psum(jnp.where(here, z, 0.0), vocab_axis_name)


def _chunked(x, chunk_size, fill):
    """(N, ...) → (⌈N/C⌉, C, ...), padding the last chunk with ``fill``."""
    n_rows = x.shape[0]
    n_chunks = -(-n_rows // chunk_size)
    pad = n_chunks * chunk_size - n_rows
    if pad:
        x = jnp.pad(x, [(0, pad)] + [(0, 0)] * (x.ndim - 1), constant_values=fill)
    return x.reshape((n_chunks, chunk_size) + x.shape[1:])


def _varying_axes(*arrays) -> tuple[str, ...]:
    """Mesh axes over which any of ``arrays`` varies (non-empty only in shard_map with check_vma)."""
    axes = set()
    for a in jax.tree.leaves(arrays):
        axes |= jax.typeof(a).manual_axis_type.varying
    return tuple(sorted(axes))


def _like_primal(cotangent, primal):
    """Give ``cotangent`` the varying axes of ``primal``, as autodiff would under shard_map.

    A replicated primal (e.g. the weight) whose cotangent varies over the data axis gets the
    ``psum`` of it; a varying primal with a replicated cotangent gets a ``pcast``. Outside
    ``shard_map(check_vma=True)`` both sets are empty and this is the identity.
    """
    have = jax.typeof(cotangent).manual_axis_type.varying
    want = jax.typeof(primal).manual_axis_type.varying
    if extra := tuple(sorted(have - want)):
        cotangent = lax.psum(cotangent, extra)
    if missing := tuple(sorted(want - have)):
        cotangent = lax.pcast(cotangent, missing, to="varying")
    return cotangent


def _tracks_vocab_axis(plan) -> bool:
    """Whether the vocabulary axis is type-checked: a value can vary over it (its index does).

    True inside ``shard_map(check_vma=True)``. False under ``check_vma=False`` or ``pmap``,
    where no type varies: there the VJP follows JAX's per-device rule for collectives (see
    :func:`_fused_sums_bwd`).
    """
    name = plan.vocab_axis_name
    return name is not None and name in _varying_axes(lax.axis_index(name))


def _scan_losses_and_grads(plan, x_s, w_s, b_s, teacher_rows, teacher_shared, labels, hyper, *, with_grads=True):
    """Σ losses over valid rows and the gradients of scale·Σ_rows ℓ, chunk by chunk.

    Args:
      plan: FusedPlan. x_s: (N, Hs). w_s: (Hs, V) or (V, Hs) by the plan's layout.
      b_s: (V,) or None.
      teacher_rows: tuple of (N, ...) arrays walked in chunks with the student's rows; for the
        dense teacher ``(x_t,)``, x_t (N, Ht); for a top-k teacher ``(ids, logprobs)``, (N, k).
      teacher_shared: tuple passed whole to every chunk: ``(w_t, b_t)``, w_t (Ht, V) or (V, Ht),
        b_t (V,) or None, for the dense teacher; ``()`` for a top-k one.
      labels: (N,) int32 in [0, V), −1 = ignored.
      hyper: :class:`jaxdistill.rowmath.Hyper`.
      with_grads: False computes the losses only (no dlogits, no gradient matmuls).

    Returns:
      (soft_sum, hard_sum) float32 scalars, then, with gradients, grad_x (N, Hs) float32 (one
      rounding to the activation dtype happens after the cotangent scaling), grad_W float32
      in w_s's layout, grad_b (V,) float32 or None; without, three Nones. Over a sharded
      vocabulary V is the local shard's width, and grad_x is the psum over the vocabulary
      axis of every shard's dZ·Wᵀ when that axis is type-checked (:func:`_tracks_vocab_axis`),
      this shard's part otherwise.
    """
    n_rows, hidden_s = x_s.shape
    chunk = max(1, min(plan.chunk_size, n_rows))
    xs = (
        _chunked(x_s, chunk, 0),
        tuple(_chunked(t, chunk, 0) for t in teacher_rows),
        _chunked(labels, chunk, -1),
    )

    def body(carry, chunk_inputs):
        soft_acc, hard_acc, grad_w, grad_b = carry
        x_s_c, teacher_c, labels_c = chunk_inputs
        soft_rows, hard_rows, dlogits = plan.rows(
            x_s_c, w_s, b_s, teacher_c, teacher_shared, labels_c, hyper, with_dlogits=with_grads
        )
        carry = (soft_acc + jnp.sum(soft_rows), hard_acc + jnp.sum(hard_rows), grad_w, grad_b)
        if not with_grads:
            return carry, None
        grad_x_c = _contract(dlogits, w_s, 1, 1 - hidden_dim(plan.student_weight_layout))
        if plan.student_weight_layout == "hv":
            grad_w = grad_w + _contract(x_s_c, dlogits, 0, 0)
        else:
            grad_w = grad_w + _contract(dlogits, x_s_c, 0, 0)
        if grad_b is not None:
            grad_b = grad_b + jnp.sum(dlogits, axis=0, dtype=jnp.float32)
        return (carry[0], carry[1], grad_w, grad_b), grad_x_c

    zero = jnp.zeros((), jnp.float32)
    init = (zero, zero, None, None)
    if with_grads:
        init = (
            zero,
            zero,
            jnp.zeros(w_s.shape, jnp.float32),
            None if b_s is None else jnp.zeros(b_s.shape, jnp.float32),
        )
    # Inside shard_map(check_vma=True) the carry varies like the chunk results do: the loss sums
    # like the inputs but not over the vocabulary axis (their rows come from statistics
    # all-reduced over it), the gradient accumulators like the inputs and over the vocabulary
    # axis (a shard's dlogits vary over it through its one-hot columns, whatever the weights).
    input_axes = set(_varying_axes(x_s, w_s, b_s, teacher_rows, teacher_shared, labels, hyper))
    sum_axes = tuple(sorted(input_axes - {plan.vocab_axis_name}))
    grad_axes = tuple(sorted(input_axes | ({plan.vocab_axis_name} if _tracks_vocab_axis(plan) else set())))
    init = tuple(
        z if z is None or not axes else lax.pcast(z, axes, to="varying")
        for z, axes in zip(init, (sum_axes, sum_axes, grad_axes, grad_axes), strict=True)
    )
    (soft_sum, hard_sum, grad_w, grad_b), grad_x = lax.scan(body, init, xs)
    if not with_grads:
        return soft_sum, hard_sum, None, None, None
    grad_x = grad_x.reshape(-1, hidden_s)[:n_rows]
    if _tracks_vocab_axis(plan):  # each vocabulary shard holds its part of dZ·Wᵀ
        grad_x = lax.psum(grad_x, plan.vocab_axis_name)
    return soft_sum, hard_sum, grad_x, grad_w, grad_b


@functools.partial(jax.custom_vjp, nondiff_argnums=(0,))
def _fused_sums(plan, x_s, w_s, b_s, teacher_rows, teacher_shared, labels, hyper):
    """(scale·Σ (soft_weight·JSD + hard_weight·CE), Σ JSD, Σ CE) over valid rows.

    Without differentiation this is the value-only path: no dlogits, no gradient matmuls, and, for
    the dense teacher at β ∈ {0, 1}, no logits stored at all. See :func:`_scan_losses_and_grads`. The teacher (dense
    or top-k, by ``plan.teacher``) gets zero cotangents.
    """
    soft_sum, hard_sum, *_ = _scan_losses_and_grads(
        plan, x_s, w_s, b_s, teacher_rows, teacher_shared, labels, hyper, with_grads=False
    )
    return _weighted_total(hyper, soft_sum, hard_sum), soft_sum, hard_sum


def _weighted_total(hyper, soft_sum, hard_sum):
    return hyper.scale * (hyper.soft_weight * soft_sum + hyper.hard_weight * hard_sum)


def _fused_sums_fwd(plan, x_s, w_s, b_s, teacher_rows, teacher_shared, labels, hyper):
    soft_sum, hard_sum, grad_x, grad_w, grad_b = _scan_losses_and_grads(
        plan, x_s, w_s, b_s, teacher_rows, teacher_shared, labels, hyper
    )
    # The student inputs are saved (no copies: they are the primal inputs) for the dtypes and
    # varying axes of their cotangents.
    residuals = (grad_x, grad_w, grad_b, soft_sum, hard_sum, x_s, w_s, b_s, hyper)
    return (_weighted_total(hyper, soft_sum, hard_sum), soft_sum, hard_sum), residuals


def _fused_sums_bwd(plan, residuals, cotangents):
    grad_x, grad_w, grad_b, soft_sum, hard_sum, x_s, w_s, b_s, hyper = residuals
    g = cotangents[0]  # the soft/hard outputs are stop_gradient-ed by the caller
    g_student = g
    if plan.vocab_axis_name is not None and not _tracks_vocab_axis(plan):
        # Untyped axes (check_vma=False, pmap): every shard's output depends on every shard's
        # inputs through the all-reduced statistics, so the transpose sums the cotangents over
        # the axis (as JAX transposes a psum there); grad_x stays this shard's part, which
        # shard_map's transpose sums over the axis the hidden states are replicated on.
        g_student = lax.psum(g, plan.vocab_axis_name)
    nan = jnp.full((), jnp.nan, jnp.float32)
    # d/d(soft_weight) and d/d(hard_weight) are exact; β and T are not differentiable (NaN);
    # the scale is a function of the labels (no gradient).
    grad_hyper = rowmath.Hyper(
        beta=nan,
        one_minus_beta=nan,
        inv_temperature=nan,
        soft_weight=hyper.scale * soft_sum,
        hard_weight=hyper.scale * hard_sum,
        scale=jnp.zeros((), jnp.float32),
    )
    return (
        _like_primal((g_student * grad_x).astype(x_s.dtype), x_s),
        _like_primal((g_student * grad_w).astype(w_s.dtype), w_s),
        None if grad_b is None else _like_primal((g_student * grad_b).astype(b_s.dtype), b_s),
        None,  # the teacher and the labels get zero cotangents
        None,
        None,
        jax.tree.map(lambda c, h: _like_primal((g * c).astype(h.dtype), h), grad_hyper, hyper),
    )


_fused_sums.defvjp(_fused_sums_fwd, _fused_sums_bwd)


def fused_linear_jsd_loss(
    student_hidden,
    student_weight,
    teacher_hidden,
    teacher_weight,
    labels,
    *,
    student_bias=None,
    teacher_bias=None,
    beta=0.5,
    temperature=1.0,
    soft_weight=1.0,
    hard_weight=0.0,
    ignore_index=-100,
    where=None,
    reduction="mean",
    chunk_size=None,
    axis_name=None,
    vocab_axis_name=None,
    implementation=None,
    kernel_config=None,
    student_weight_layout="hv",
    teacher_weight_layout="hv",
    return_aux=False,
):
    """Distillation loss of a student LM head against a teacher LM head, fused and chunked.

    With z_s = x_s W_s + b_s (student), z_t = x_t W_t + b_t (teacher), Q = softmax(z_s/T),
    P = softmax(z_t/T) and M = βP + (1−β)Q, the per-token loss is

        ℓ = soft_weight · JSD_β + hard_weight · CE,
        JSD_β = β·KL(P‖M) + (1−β)·KL(Q‖M)   (β = 0: KL(P‖Q), forward; β = 1: KL(Q‖P), reverse),
        CE = −log softmax(z_s)[y]            (untempered; no T² factor),

    summed over valid tokens (``labels != ignore_index`` and ``where``) and divided by
    max(1, number of valid tokens) for ``reduction="mean"``. The (N, V) logits are never
    materialized: the tokens are processed ``chunk_size`` rows at a time and the gradients
    for ``student_hidden``, ``student_weight`` and ``student_bias`` are computed in the same
    forward pass (the backward only scales them). The teacher gets zero gradients.

    Args:
      student_hidden: (..., Hs) floating, the student's final hidden states.
      student_weight: (Hs, V) floating, the student LM head (Flax ``Dense`` kernel layout), or
        (V, Hs) with ``student_weight_layout="vh"``.
      teacher_hidden: (..., Ht) floating, same leading dims; Ht may differ from Hs.
      teacher_weight: (Ht, V) floating, the teacher LM head, or (V, Ht) with
        ``teacher_weight_layout="vh"``.
      labels: (...) integer next-token ids. A valid label outside [0, V) makes the loss
        (and its gradients) NaN, so it cannot pass unnoticed; it is never read out of bounds.
      student_bias, teacher_bias: optional (V,) biases.
      beta: JSD mixture weight in [0, 1] (float or traced scalar; changing it does not recompile).
      temperature: T > 0, divides both logits for the soft part.
      soft_weight, hard_weight: weights of JSD_β and CE (floats or traced scalars).
      ignore_index: label value excluded from the loss.
      where: optional boolean (...) mask, AND-ed with ``labels != ignore_index``.
      reduction: ``"mean"`` or ``"sum"``.
      chunk_size: rows per chunk; None → :func:`default_chunk_size` (1024 at V = 128256).
        Any positive int works; N need not be a multiple of it.
      axis_name: inside ``pmap``/``shard_map``, the mapped axis. "mean" then divides by the
        valid-token count summed over that axis, and the function returns this device's share
        Σ_local ℓ / N_global: the ``psum`` of the returned values (and of their gradients) is
        the global mean (and its gradient).
      vocab_axis_name: inside ``shard_map``, the mesh axis over which the vocabulary is
        sharded (M devices). Each device then passes its contiguous shard of both heads, in
        axis-index order: weights (H, V/M) (or (V/M, H) for "vh") and biases (V/M,); the
        hidden states and labels are the same on every device of the axis, and the labels are
        global ids in [0, V). The loss is the full-vocabulary loss of those rows, on every
        device of the axis; the weight and bias gradients are this shard's slice of the full
        ones; only per-row scalars are all-reduced per chunk, and grad_x once. Under
        ``check_vma=True`` the hidden-state gradient is complete (all-reduced inside the VJP)
        and invariant over the axis. Under ``check_vma=False`` (or ``pmap``) gradients follow
        JAX's per-device rule for collectives: take them through the ``shard_map`` from
        outside, whose transpose sums grad_x over the axis. Combines with ``axis_name``
        (a 2-D (data, model) mesh). A vocabulary that M does not divide must be padded by the
        caller: zero weight columns whose bias is −inf, on both heads, take no probability and
        get zero gradient (:mod:`jaxdistill.training` checks the divisibility).
      implementation: None (Pallas kernel on GPU, XLA elsewhere), ``"xla"`` or ``"pallas"``
        (on a non-GPU backend the kernel runs in interpret mode: slow, for tests).
        With ``vocab_axis_name``, ``"pallas"`` runs the fused logits kernel and then the XLA
        path's row stages.
      kernel_config: optional :class:`pallas_kernels.RowKernelConfig` for ``"pallas"``;
        None → :func:`pallas_kernels.default_row_kernel_config`. Not with ``vocab_axis_name``
        (the row kernel does not run there).
      student_weight_layout, teacher_weight_layout: ``"hv"`` (default; (H, V), the
        ``nnx.Linear``/``nn.Dense`` kernel) or ``"vh"`` ((V, H): the ``nnx.Embed`` table of a
        tied head, or a PyTorch ``Linear`` weight). A "vh" weight is contracted in place: no
        transposed copy of it, nor of its gradient (returned in the same (V, H) layout).
      return_aux: also return a dict with ``soft_loss`` (JSD_β) and ``hard_loss`` (CE), both
        unweighted and reduced like the loss, and ``num_valid_tokens`` (global when
        ``axis_name`` is set). The aux values carry no gradient (``stop_gradient``).

    Returns:
      The float32 scalar loss, or ``(loss, aux)`` when ``return_aux``. Gradients w.r.t.
      ``soft_weight``/``hard_weight`` are exact; w.r.t. ``beta``/``temperature`` they are NaN
      (not implemented). A traced β outside [0, 1] or T not finite and > 0 gives a NaN loss.
      Second derivatives (grad of grad, ``jax.hessian``) w.r.t. the student arguments are exact
      on the XLA path; the Pallas path computes first derivatives only.

    Raises:
      NotImplementedError: when differentiated twice with ``implementation="pallas"`` (use
        ``"xla"`` for second derivatives).
      ValueError, TypeError: at trace time, for bad shapes, dtypes or options; the message
        names the argument (``vocab_axis_name`` not a string, not a mapped axis here, or equal
        to ``axis_name``).

    Example:
      >>> import jax, jax.numpy as jnp
      >>> from jaxdistill import fused_linear_jsd_loss
      >>> k = jax.random.split(jax.random.key(0), 5)
      >>> xs, ws = jax.random.normal(k[0], (2, 8, 16)), jax.random.normal(k[1], (16, 100)) / 4
      >>> xt, wt = jax.random.normal(k[2], (2, 8, 32)), jax.random.normal(k[3], (32, 100)) / 4
      >>> y = jax.random.randint(k[4], (2, 8), 0, 100)
      >>> loss, grads = jax.value_and_grad(fused_linear_jsd_loss, argnums=(0, 1))(
      ...     xs, ws, xt, wt, y, beta=0.5, temperature=2.0, hard_weight=0.5)
      >>> grads[1].shape
      (16, 100)
    """
    vocab_shards = vocab_shard_count(vocab_axis_name, axis_name)
    a = validate_and_flatten(
        student_hidden,
        student_weight,
        teacher_hidden,
        teacher_weight,
        labels,
        student_bias=student_bias,
        teacher_bias=teacher_bias,
        beta=beta,
        temperature=temperature,
        soft_weight=soft_weight,
        hard_weight=hard_weight,
        ignore_index=ignore_index,
        where=where,
        reduction=reduction,
        return_aux=return_aux,
        student_weight_layout=student_weight_layout,
        teacher_weight_layout=teacher_weight_layout,
        vocab_shards=vocab_shards,
    )
    requested, implementation = implementation, resolve_implementation(implementation)
    vocab = a.vocab_size  # global: the labels index all shards
    if chunk_size is None:
        chunk_size = default_chunk_size(vocab)  # so the chunk's logits per device shrink as 1/M too
    check_kernel_config(kernel_config, implementation, requested=requested)
    if kernel_config is not None and vocab_axis_name is not None:
        raise ValueError(
            "`kernel_config` configures the row kernel, which does not run with `vocab_axis_name` "
            "(the fused logits kernel and the row stages of the XLA path do)"
        )
    plan = FusedPlan(
        chunk_size=chunk_size,
        implementation=implementation,
        divergence=divergence_of(beta),
        kernel_config=kernel_config,
        interpret=jax.default_backend() != "gpu",
        student_weight_layout=student_weight_layout,
        teacher_weight_layout=teacher_weight_layout,
        vocab_axis_name=vocab_axis_name,
    )
    return fused_loss(
        a,
        plan,
        student_weight,
        student_bias,
        (a.teacher_hidden,),
        (teacher_weight, teacher_bias),
        beta=beta,
        temperature=temperature,
        soft_weight=soft_weight,
        hard_weight=hard_weight,
        reduction=reduction,
        axis_name=axis_name,
        return_aux=return_aux,
    )


def fused_loss(
    a,
    plan: FusedPlan,
    student_weight,
    student_bias,
    teacher_rows,
    teacher_shared,
    *,
    beta,
    temperature,
    soft_weight,
    hard_weight,
    reduction,
    axis_name,
    return_aux,
):
    """The loss (and aux) of validated inputs under ``plan``: the one entry into the driver.

    Shared by :func:`fused_linear_jsd_loss` and :func:`jaxdistill.fused_linear_topk_distill_loss`:
    the reduction's divisor (psum-ed over ``axis_name``) scales the hyper-parameters, so the
    dlogits are scaled before they are rounded; :func:`_fused_sums` runs the chunks (teacher as in
    :func:`_scan_losses_and_grads`); ``a.reduce`` applies the NaN poisons and builds the aux.

    Args:
      a: :class:`jaxdistill._validate.FlatInputs`. plan: :class:`FusedPlan`.
      student_weight, student_bias: as given to the loss. teacher_rows, teacher_shared: the
        plan's teacher (:func:`_scan_losses_and_grads`).
      beta … return_aux: the loss's arguments of those names.
    """
    _, denominator = a.count_and_denominator(reduction=reduction, axis_name=axis_name)
    hyper = _hyper(beta, temperature, soft_weight, hard_weight, 1.0 / denominator)
    # Rows the driver sees: a label in [0, V) for valid rows, −1 for ignored ones.
    total, soft_sum, hard_sum = _fused_sums(
        plan, a.student_hidden, student_weight, student_bias, teacher_rows, teacher_shared, a.row_labels(), hyper
    )
    return a.reduce(
        total, soft_sum, hard_sum, reduction=reduction, axis_name=axis_name, return_aux=return_aux, prescaled=True
    )


def vocab_shard_count(vocab_axis_name, axis_name=None) -> int:
    """M, the size of the mesh axis ``vocab_axis_name`` (1 for None), checked at trace time.

    Raises:
      TypeError: ``vocab_axis_name`` is neither None nor a string.
      ValueError: it is not a mapped axis where the loss is called, or it equals ``axis_name``.
    """
    if vocab_axis_name is None:
        return 1
    if not isinstance(vocab_axis_name, str):
        raise TypeError(f"`vocab_axis_name` must be None or a mesh axis name (str), got {vocab_axis_name!r}")
    if vocab_axis_name == axis_name:
        raise ValueError(
            f"`vocab_axis_name` and `axis_name` must differ (the vocabulary and the tokens are split over "
            f"different mesh axes), got {vocab_axis_name!r} for both"
        )
    try:
        return lax.axis_size(vocab_axis_name)
    except NameError:
        raise ValueError(
            f"`vocab_axis_name` {vocab_axis_name!r} is not a mapped axis here: call the loss inside "
            f"jax.shard_map over a mesh with that axis"
        ) from None


def _hyper(beta, temperature, soft_weight, hard_weight, scale) -> rowmath.Hyper:
    """The float32 hyper-parameters, with 1 − β from the exact β when β is known at trace time."""
    beta_value = concrete_float(beta, "beta")
    one_minus_beta = 1.0 - jnp.asarray(beta, jnp.float32) if beta_value is None else 1.0 - beta_value
    f32 = lambda v: jnp.asarray(v, jnp.float32)  # noqa: E731
    return rowmath.Hyper(
        beta=f32(beta),
        one_minus_beta=f32(one_minus_beta),
        inv_temperature=1.0 / f32(temperature),
        soft_weight=f32(soft_weight),
        hard_weight=f32(hard_weight),
        scale=lax.stop_gradient(f32(scale)),
    )
