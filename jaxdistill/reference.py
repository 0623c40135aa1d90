"""The unfused reference: materialized logits, plain jnp, plain autodiff.

It is the oracle of every test (upcast to float64 for accuracy checks) and the ``reference``
row of the benchmark. It shares no math with the fused path: only argument validation and the
final reduction over tokens (count, mean, NaN for bad labels), so a mistake in the fused math
cannot hide in both.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from jax import lax

from jaxdistill._validate import validate_and_flatten


def soft_divergence_rows(student_scaled, teacher_scaled, beta):
    """JSD_β per row of tempered logits s' = z_s/T (student) and t' = z_t/T (teacher).

    β = 0 gives KL(P‖Q), β = 1 gives KL(Q‖P), with Q = softmax(s') and P = softmax(t');
    otherwise β·KL(P‖M) + (1−β)·KL(Q‖M) with M = βP + (1−β)Q.

    Args:
      student_scaled, teacher_scaled: (N, V) floating.
      beta: scalar in [0, 1].

    Returns:
      (N,) divergences.
    """
    log_q = jax.nn.log_softmax(student_scaled, axis=-1)
    log_p = jax.nn.log_softmax(teacher_scaled, axis=-1)
    p, q = jnp.exp(log_p), jnp.exp(log_q)

    def forward_kl():
        return jnp.sum(p * (log_p - log_q), axis=-1)

    def reverse_kl():
        return jnp.sum(q * (log_q - log_p), axis=-1)

    def mixture():
        log_m = jnp.logaddexp(jnp.log(beta) + log_p, jnp.log1p(-beta) + log_q)
        kl_p_m = jnp.sum(p * (log_p - log_m), axis=-1)
        kl_q_m = jnp.sum(q * (log_q - log_m), axis=-1)
        return beta * kl_p_m + (1 - beta) * kl_q_m

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
    beta = jnp.asarray(beta, z_s.dtype)
    soft = soft_divergence_rows(z_s / temperature, z_t / temperature, beta)
    vocab = z_s.shape[-1]
    safe_labels = jnp.clip(a.labels, 0, vocab - 1)
    hard = -jnp.take_along_axis(jax.nn.log_softmax(z_s, axis=-1), safe_labels[:, None], axis=-1)[:, 0]

    soft_sum = jnp.sum(jnp.where(a.valid, soft, 0.0))
    hard_sum = jnp.sum(jnp.where(a.valid, hard, 0.0))
    total = soft_weight * soft_sum + hard_weight * hard_sum
    return a.reduce(total, soft_sum, hard_sum, reduction=reduction, axis_name=axis_name, return_aux=return_aux)
