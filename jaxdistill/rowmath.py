"""Per-row distillation math on one chunk of logits, in plain jnp (the XLA path).

This is the contract that every chunk implementation meets (the Pallas kernel in
``pallas_kernels`` has the same signature and is tested against this function):

    distill_rows(student_logits, teacher_logits, labels, hyper, *, dlogits_dtype)
        -> (soft_rows, hard_rows, dlogits)

with, for row r, s' = z_s/T, t' = z_t/T, Q = softmax(s') (student), P = softmax(t')
(teacher), M = βP + (1−β)Q:

* ``soft_rows[r]`` = JSD_β (β = 0: KL(P‖Q); β = 1: KL(Q‖P)), unweighted, float32;
* ``hard_rows[r]`` = CE = −log softmax(z_s)[y], unweighted and untempered, float32;
* ``dlogits[r]`` = soft_weight/T · ∂JSD_β/∂s' + hard_weight · (softmax(z_s) − onehot(y)),
  cast to ``dlogits_dtype``.

Rows whose label is negative are ignored: zeros in all three outputs.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from jax import lax


def divergence_branch(beta: jax.Array) -> jax.Array:
    """Index of the divergence formula for β: 0 forward KL (β=0), 1 interior JSD, 2 reverse KL (β=1)."""
    return jnp.where(beta <= 0.0, 0, jnp.where(beta >= 1.0, 2, 1)).astype(jnp.int32)


def _forward_kl(log_p, log_q, p, q, beta):
    """KL(P‖Q) and its gradient w.r.t. s' (Q − P)."""
    del beta
    return jnp.sum(p * (log_p - log_q), axis=-1), q - p


def _mixture_jsd(log_p, log_q, p, q, beta):
    """Generalized JSD_β and its gradient Q ⊙ (a − Σ Q a), a = (1−β)(log Q − log M)."""
    log_m = jnp.logaddexp(jnp.log(beta) + log_p, jnp.log1p(-beta) + log_q)
    kl_p_m = jnp.sum(p * (log_p - log_m), axis=-1)
    kl_q_m = jnp.sum(q * (log_q - log_m), axis=-1)
    a = (1.0 - beta) * (log_q - log_m)
    grad = q * (a - ((1.0 - beta) * kl_q_m)[:, None])
    return beta * kl_p_m + (1.0 - beta) * kl_q_m, grad


def _reverse_kl(log_p, log_q, p, q, beta):
    """KL(Q‖P) and its gradient Q ⊙ (log Q − log P − KL(Q‖P))."""
    del p, beta
    kl = jnp.sum(q * (log_q - log_p), axis=-1)
    return kl, q * (log_q - log_p - kl[:, None])


def distill_rows(
    student_logits: jax.Array,
    teacher_logits: jax.Array,
    labels: jax.Array,
    hyper: jax.Array,
    *,
    dlogits_dtype,
) -> tuple[jax.Array, jax.Array, jax.Array]:
    """Per-row JSD_β and CE losses of a chunk with their gradient w.r.t. the student logits.

    Args:
      student_logits: (R, V) float32 student logits z_s.
      teacher_logits: (R, V) float32 teacher logits z_t.
      labels: (R,) int32; in [0, V) for valid rows, negative for ignored rows.
      hyper: (4,) float32 ``[beta, temperature, soft_weight, hard_weight]``.
      dlogits_dtype: dtype of the returned gradient (the activation dtype).

    Returns:
      ``(soft_rows (R,) f32, hard_rows (R,) f32, dlogits (R, V) dlogits_dtype)`` as in the
      module docstring.
    """
    beta, temperature, soft_weight, hard_weight = (hyper[i] for i in range(4))
    valid = labels >= 0
    inv_t = 1.0 / temperature
    log_q = jax.nn.log_softmax(student_logits * inv_t, axis=-1)
    log_p = jax.nn.log_softmax(teacher_logits * inv_t, axis=-1)
    p, q = jnp.exp(log_p), jnp.exp(log_q)
    soft, soft_grad = lax.switch(
        divergence_branch(beta), (_forward_kl, _mixture_jsd, _reverse_kl), log_p, log_q, p, q, beta
    )

    log_q_untempered = jax.nn.log_softmax(student_logits, axis=-1)
    safe_labels = jnp.maximum(labels, 0)
    hard = -jnp.take_along_axis(log_q_untempered, safe_labels[:, None], axis=-1)[:, 0]
    onehot = jnp.arange(student_logits.shape[-1], dtype=jnp.int32)[None, :] == safe_labels[:, None]
    hard_grad = jnp.exp(log_q_untempered) - onehot.astype(jnp.float32)

    dlogits = (soft_weight * inv_t) * soft_grad + hard_weight * hard_grad
    dlogits = jnp.where(valid[:, None], dlogits, 0.0).astype(dlogits_dtype)
    zero = jnp.zeros_like(soft)
    return jnp.where(valid, soft, zero), jnp.where(valid, hard, zero), dlogits
