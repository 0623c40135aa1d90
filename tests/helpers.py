"""Shared test helpers: realistic random inputs and the float64 oracle."""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np

from jaxdistill import reference


@dataclasses.dataclass
class Problem:
    """One loss problem: positional arrays, keyword options."""

    student_hidden: jax.Array
    student_weight: jax.Array
    teacher_hidden: jax.Array
    teacher_weight: jax.Array
    labels: jax.Array
    student_bias: jax.Array | None
    teacher_bias: jax.Array | None

    def astype(self, dtype):
        cast = lambda x: None if x is None else x.astype(dtype)  # noqa: E731
        return dataclasses.replace(
            self,
            student_hidden=cast(self.student_hidden),
            student_weight=cast(self.student_weight),
            teacher_hidden=cast(self.teacher_hidden),
            teacher_weight=cast(self.teacher_weight),
            student_bias=cast(self.student_bias),
            teacher_bias=cast(self.teacher_bias),
        )


def make_problem(
    n=37,
    hs=16,
    ht=24,
    vocab=123,
    *,
    dtype=jnp.float32,
    logit_scale=1.0,
    bias=True,
    ignored_fraction=0.2,
    lead_shape=None,
    seed=0,
) -> Problem:
    """Normal inputs whose logits have standard deviation ≈ ``logit_scale``; some rows ignored."""
    keys = jax.random.split(jax.random.key(seed), 8)
    lead = (n,) if lead_shape is None else lead_shape
    xs = jax.random.normal(keys[0], lead + (hs,))
    xt = jax.random.normal(keys[1], lead + (ht,))
    ws = jax.random.normal(keys[2], (hs, vocab)) * logit_scale / np.sqrt(hs)
    wt = jax.random.normal(keys[3], (ht, vocab)) * logit_scale / np.sqrt(ht)
    labels = jax.random.randint(keys[4], lead, 0, vocab)
    ignored = jax.random.uniform(keys[5], lead) < ignored_fraction
    labels = jnp.where(ignored, -100, labels)
    bs = jax.random.normal(keys[6], (vocab,)) * 0.5 * logit_scale if bias else None
    bt = jax.random.normal(keys[7], (vocab,)) * 0.5 * logit_scale if bias else None
    return Problem(xs, ws, xt, wt, labels, bs, bt).astype(dtype)


def loss_and_grads(loss_fn, p: Problem, cotangent=1.0, **options):
    """Loss and its gradients w.r.t. (student_hidden, student_weight, student_bias)."""

    def scalar(xs, ws, bs):
        return cotangent * loss_fn(
            xs,
            ws,
            p.teacher_hidden,
            p.teacher_weight,
            p.labels,
            student_bias=bs,
            teacher_bias=p.teacher_bias,
            **options,
        )

    loss, grads = jax.value_and_grad(scalar, argnums=(0, 1, 2))(p.student_hidden, p.student_weight, p.student_bias)
    return loss, grads


def oracle64(p: Problem, cotangent=1.0, **options):
    """The reference upcast to float64: (loss, grads) as numpy float64 arrays."""
    with jax.enable_x64(True):
        loss, grads = loss_and_grads(reference.fused_linear_jsd_loss, p.astype(jnp.float64), cotangent, **options)
        return np.asarray(loss), [None if g is None else np.asarray(g) for g in grads]


def relative_error(actual, expected) -> float:
    """max |actual − expected| / max(max |expected|, tiny), in float64."""
    actual = np.asarray(jnp.asarray(actual, jnp.float32), np.float64)
    expected = np.asarray(expected, np.float64)
    return float(np.max(np.abs(actual - expected)) / max(np.max(np.abs(expected)), 1e-30))


def naive_loss(
    xs, ws, xt, wt, labels, *, student_bias, teacher_bias, beta, temperature, soft_weight=1.0, hard_weight=0.0
):
    """What a user writes without jaxdistill: logits in the input dtype, softmaxes in that dtype.

    Its error against the float64 oracle is the "plain unfused computation" budget of
    DESIGN.md §3 for bf16 inputs (mean reduction, ignore_index −100).
    """
    z_s = xs @ ws + student_bias
    z_t = jax.lax.stop_gradient(xt @ wt + teacher_bias)
    soft = reference.soft_divergence_rows(z_s / temperature, z_t / temperature, jnp.asarray(beta, z_s.dtype))
    valid = labels != -100
    log_q = jax.nn.log_softmax(z_s, axis=-1)
    hard = -jnp.take_along_axis(log_q, jnp.maximum(labels, 0)[..., None], axis=-1)[..., 0]
    total = jnp.sum(jnp.where(valid, soft_weight * soft + hard_weight * hard, 0))
    return total / jnp.maximum(jnp.sum(valid), 1)
