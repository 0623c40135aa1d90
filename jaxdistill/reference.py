"""The unfused reference: materialized logits, plain jnp, plain autodiff.

It is the oracle of every test (upcast to float64 for accuracy checks) and the ``reference``
row of the benchmark. It shares no math with the fused path: only argument validation and the
final reduction over tokens (count, mean, NaN for bad labels), so a mistake in the fused math
cannot hide in both.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax

from jaxdistill._validate import concrete_float, validate_and_flatten


def _times(w, x):
    """w·x, and 0 where w = 0 whatever x is (a column of probability 0), safe to differentiate."""
    positive = w > 0
    return jnp.where(positive, w * jnp.where(positive, x, 0), 0)


def _phi_weighted(weight, x, exact_far, log_ratio):
    """weight·(x − log1p(x)), where x = c·(ratio − 1) and ``exact_far`` = the same product
    written out as c·(other − weight) − weight·log(1 + x) for the far cases.

    |x| ≤ 1/8: the Taylor series Σ_{n≥2} (−x)^n/n (x − log1p(x) cancels; the first-order term of
    the KL vanishes in the row sum, so it is not formed). −1/2 ≤ x ≤ 1: x − log1p(x) directly.
    Elsewhere (x near −1, x large or ``log_ratio`` too large for expm1): ``exact_far``, whose
    log(1 + x) comes from a log-sum-exp of the exact β and 1 − β.
    """
    terms = 10 if jnp.finfo(x.dtype).bits <= 32 else 20  # truncation < 2e-9 (f32) / 2e-18 (f64) at 1/8
    cap = 0.5 * float(np.log(jnp.finfo(x.dtype).max))
    small = jnp.abs(x) <= 0.125
    mid = ~small & (x >= -0.5) & (x <= 1.0) & (log_ratio <= cap)
    far = ~small & ~mid
    xs = jnp.where(small, x, 0)
    series = 1.0 / terms  # Horner: x²·(1/2 − x·(1/3 − x·(… − x/terms)))
    for n in range(terms - 1, 1, -1):
        series = 1.0 / n - xs * series
    series = xs * xs * series
    xm = jnp.where(mid, x, 0)
    return jnp.where(small, _times(weight, series), jnp.where(mid, _times(weight, xm - jnp.log1p(xm)), exact_far(far)))


def soft_divergence_rows(student_scaled, teacher_scaled, beta):
    """JSD_β per row of tempered logits s' = z_s/T (student) and t' = z_t/T (teacher).

    β = 0 gives KL(P‖Q), β = 1 gives KL(Q‖P), with Q = softmax(s') and P = softmax(t');
    otherwise β·KL(P‖M) + (1−β)·KL(Q‖M) with M = βP + (1−β)Q, written without cancellation:
    with r = P/Q − 1 and s = Q/P − 1, KL(Q‖M) = Σ Q·φ(β r) and KL(P‖M) = Σ P·φ((1−β) s),
    φ(x) = x − log1p(x) ≥ 0 (the first-order terms Σ Q β r = β Σ (P − Q) = 0 drop out). A β known
    at trace time (a Python float) picks its branch from its exact value, and 1 − β is computed
    exactly: β = 1 − 1e-8 is the mixture even where it rounds to 1 in the logits' dtype.
    Columns of probability 0 (−inf logits) contribute 0; a true +∞ (P > 0 where Q = 0 at
    β = 0) stays +∞.

    Args:
      student_scaled, teacher_scaled: (N, V) floating.
      beta: scalar in [0, 1] (a Python number, or a traced scalar: then the branch follows β in
        the logits' dtype at run time).

    Returns:
      (N,) divergences.
    """
    dtype = jnp.result_type(student_scaled)
    value = concrete_float(beta, "beta")
    if value is None:
        beta = jnp.asarray(beta, dtype)
        return _divergence_rows(student_scaled, teacher_scaled, beta, 1 - beta, kind="traced")
    kind = "forward" if value == 0 else "reverse" if value == 1 else "mixture"
    return _divergence_rows(
        student_scaled, teacher_scaled, jnp.asarray(value, dtype), jnp.asarray(1.0 - value, dtype), kind=kind
    )


@functools.partial(jax.jit, static_argnames="kind")
def _divergence_rows(student_scaled, teacher_scaled, beta, one_minus_beta, *, kind):
    """:func:`soft_divergence_rows` for a resolved β: ``kind`` "forward", "mixture", "reverse", or
    "traced" (the branch from β at run time). Jitted: one dispatch instead of a few hundred."""
    log_q = jax.nn.log_softmax(student_scaled, axis=-1)
    log_p = jax.nn.log_softmax(teacher_scaled, axis=-1)
    p, q = jnp.exp(log_p), jnp.exp(log_q)
    dtype = log_q.dtype

    def forward_kl():
        return jnp.sum(_times(p, log_p - log_q), axis=-1)

    def reverse_kl():
        return jnp.sum(_times(q, log_q - log_p), axis=-1)

    def mixture():
        log_ratio = log_p - log_q  # log P/Q; NaN only where both are masked (then both terms are 0)
        log_ratio = jnp.where(jnp.isnan(log_ratio), 0, log_ratio)
        cap = 0.5 * float(np.log(jnp.finfo(dtype).max))
        log_beta, log_one_minus_beta = jnp.log(beta), jnp.log(one_minus_beta)

        def side(weight, other, c, log_c, log_c_other, ratio_log):
            """weight·φ(c·(other/weight − 1)) with log(other/weight) = ratio_log."""
            x = c * jnp.expm1(jnp.minimum(ratio_log, cap))

            def exact_far(far):
                log_one_plus_x = jnp.logaddexp(log_c + jnp.where(far, ratio_log, 0), log_c_other)
                return c * (other - weight) - _times(weight, log_one_plus_x)

            return _phi_weighted(weight, x, exact_far, ratio_log)

        kl_q_m = jnp.sum(side(q, p, beta, log_beta, log_one_minus_beta, log_ratio), axis=-1)
        kl_p_m = jnp.sum(side(p, q, one_minus_beta, log_one_minus_beta, log_beta, -log_ratio), axis=-1)
        return beta * kl_p_m + one_minus_beta * kl_q_m

    if kind != "traced":
        return {"forward": forward_kl, "mixture": mixture, "reverse": reverse_kl}[kind]()
    branch = jnp.where(beta <= 0, 0, jnp.where(beta >= 1, 2, 1))
    return lax.switch(branch, (forward_kl, mixture, reverse_kl))


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
    axis_name=None,
    student_weight_layout="hv",
    teacher_weight_layout="hv",
    return_aux=False,
):
    """Reference of :func:`jaxdistill.fused_linear_jsd_loss` (same math, materialized logits).

    Same arguments and returns, minus ``chunk_size`` and ``implementation``. Out-of-range
    labels give a NaN loss, as in the fused path.
    """
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
    )

    def dot(x, w):  # float32 accumulation, or float64 for the upcast oracle
        return jnp.matmul(x, w, preferred_element_type=jnp.promote_types(x.dtype, jnp.float32))

    z_s = dot(a.student_hidden, student_weight if student_weight_layout == "hv" else student_weight.T)
    z_t = dot(a.teacher_hidden, teacher_weight if teacher_weight_layout == "hv" else teacher_weight.T)
    if student_bias is not None:
        z_s = z_s + student_bias.astype(z_s.dtype)
    if teacher_bias is not None:
        z_t = z_t + teacher_bias.astype(z_t.dtype)
    z_t = lax.stop_gradient(z_t)

    temperature = jnp.asarray(temperature, z_s.dtype)
    soft = soft_divergence_rows(z_s / temperature, z_t / temperature, beta)
    safe_labels = jnp.maximum(a.row_labels(), 0)  # ignored rows read column 0, then drop out
    hard = -jnp.take_along_axis(jax.nn.log_softmax(z_s, axis=-1), safe_labels[:, None], axis=-1)[:, 0]

    soft_sum = jnp.sum(jnp.where(a.valid, soft, 0.0))
    hard_sum = jnp.sum(jnp.where(a.valid, hard, 0.0))
    total = soft_weight * soft_sum + hard_weight * hard_sum
    return a.reduce(total, soft_sum, hard_sum, reduction=reduction, axis_name=axis_name, return_aux=return_aux)
