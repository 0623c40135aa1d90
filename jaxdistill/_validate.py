"""Argument validation shared by the fused loss and the reference: errors at trace time."""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np

REDUCTIONS = ("mean", "sum")


def concrete_float(value, name: str) -> float | None:
    """``value`` as a Python float when it is known at trace time, else None (a tracer).

    Raises:
      ValueError: ``value`` is not a scalar.
    """
    if jnp.ndim(value) != 0:
        raise ValueError(f"`{name}` must be a scalar, got shape {jnp.shape(value)}")
    try:
        return float(value)
    except (jax.errors.ConcretizationTypeError, jax.errors.TracerArrayConversionError):
        return None


@dataclasses.dataclass(frozen=True)
class FlatInputs:
    """Validated inputs with leading dims flattened to N rows.

    Attributes:
      student_hidden: (N, Hs). teacher_hidden: (N, Ht).
      labels: (N,) int32. valid: (N,) bool, ``labels != ignore_index`` AND ``where``.
      beta, temperature: the scalars as given (floats or traced arrays).
    """

    student_hidden: jax.Array
    teacher_hidden: jax.Array
    labels: jax.Array
    valid: jax.Array
    beta: object
    temperature: object

    def any_bad_label(self, vocab_size: int) -> jax.Array:
        """True when a valid row's label lies outside [0, vocab_size)."""
        out_of_range = (self.labels < 0) | (self.labels >= vocab_size)
        return jnp.any(self.valid & out_of_range)

    def bad_hyper(self) -> jax.Array:
        """True when a traced β is outside [0, 1] or a traced T is not > 0 (concrete ones raise)."""
        beta, temperature = jnp.asarray(self.beta), jnp.asarray(self.temperature)
        return ~((beta >= 0) & (beta <= 1) & (temperature > 0))


def _check_matrix(x, name: str) -> None:
    if jnp.ndim(x) != 2:
        raise ValueError(f"`{name}` must be 2-D (H, V), got shape {jnp.shape(x)}")
    if not jnp.issubdtype(jnp.result_type(x), jnp.floating):
        raise TypeError(f"`{name}` must be floating, got {jnp.result_type(x)}")


def _check_hidden(x, weight, name: str, weight_name: str) -> None:
    if jnp.ndim(x) < 1:
        raise ValueError(f"`{name}` must have shape (..., H), got a scalar")
    if not jnp.issubdtype(jnp.result_type(x), jnp.floating):
        raise TypeError(f"`{name}` must be floating, got {jnp.result_type(x)}")
    if jnp.shape(x)[-1] != jnp.shape(weight)[0]:
        raise ValueError(
            f"`{name}` hidden size {jnp.shape(x)[-1]} does not match `{weight_name}` "
            f"shape {jnp.shape(weight)} (expected (H, V) with H = {jnp.shape(x)[-1]})"
        )


def _check_bias(bias, vocab_size: int, name: str) -> None:
    if bias is None:
        return
    if jnp.shape(bias) != (vocab_size,):
        raise ValueError(f"`{name}` must have shape ({vocab_size},), got {jnp.shape(bias)}")
    if not jnp.issubdtype(jnp.result_type(bias), jnp.floating):
        raise TypeError(f"`{name}` must be floating, got {jnp.result_type(bias)}")


def validate_and_flatten(
    student_hidden,
    student_weight,
    teacher_hidden,
    teacher_weight,
    labels,
    *,
    student_bias,
    teacher_bias,
    beta,
    temperature,
    ignore_index,
    where,
    reduction,
) -> FlatInputs:
    """Check shapes, dtypes and options (see :func:`jaxdistill.fused_linear_jsd_loss`).

    Raises:
      ValueError, TypeError: with a message naming the offending argument.
    """
    _check_matrix(student_weight, "student_weight")
    _check_matrix(teacher_weight, "teacher_weight")
    _check_hidden(student_hidden, student_weight, "student_hidden", "student_weight")
    _check_hidden(teacher_hidden, teacher_weight, "teacher_hidden", "teacher_weight")
    vocab_size = jnp.shape(student_weight)[1]
    if jnp.shape(teacher_weight)[1] != vocab_size:
        raise ValueError(
            f"student vocabulary ({vocab_size}, `student_weight` {jnp.shape(student_weight)}) "
            f"and teacher vocabulary ({jnp.shape(teacher_weight)[1]}, `teacher_weight` "
            f"{jnp.shape(teacher_weight)}) must match"
        )
    _check_bias(student_bias, vocab_size, "student_bias")
    _check_bias(teacher_bias, vocab_size, "teacher_bias")
    lead = jnp.shape(student_hidden)[:-1]
    if jnp.shape(teacher_hidden)[:-1] != lead:
        raise ValueError(
            f"`teacher_hidden` leading dims {jnp.shape(teacher_hidden)[:-1]} do not match "
            f"`student_hidden` leading dims {lead}"
        )
    if not jnp.issubdtype(jnp.result_type(labels), jnp.integer):
        raise TypeError(f"`labels` must be integer, got {jnp.result_type(labels)}")
    if jnp.shape(labels) != lead:
        raise ValueError(f"`labels` shape {jnp.shape(labels)} must equal the leading dims {lead} of the hidden states")
    if where is not None:
        if jnp.shape(where) != lead:
            raise ValueError(f"`where` shape {jnp.shape(where)} must equal `labels` shape {lead}")
        if jnp.result_type(where) != jnp.bool_:
            raise TypeError(f"`where` must be boolean, got {jnp.result_type(where)}")
    if reduction not in REDUCTIONS:
        raise ValueError(f"`reduction` must be one of {REDUCTIONS}, got {reduction!r}")
    if not isinstance(ignore_index, (int, np.integer)):
        raise TypeError(f"`ignore_index` must be a Python int, got {type(ignore_index).__name__}")
    beta_value = concrete_float(beta, "beta")
    if beta_value is not None and not 0.0 <= beta_value <= 1.0:
        raise ValueError(f"`beta` must lie in [0, 1], got {beta_value}")
    temperature_value = concrete_float(temperature, "temperature")
    if temperature_value is not None and not temperature_value > 0.0:
        raise ValueError(f"`temperature` must be > 0, got {temperature_value}")

    n_rows = int(np.prod(lead, dtype=np.int64))
    flat_labels = jnp.reshape(labels, (n_rows,))
    valid = flat_labels != ignore_index
    # Clip before narrowing so that no out-of-range label can wrap into range.
    flat_labels = jnp.clip(flat_labels, -1, vocab_size).astype(jnp.int32)
    if where is not None:
        valid = valid & jnp.reshape(where, (n_rows,))
    return FlatInputs(
        student_hidden=jnp.reshape(student_hidden, (n_rows, jnp.shape(student_hidden)[-1])),
        teacher_hidden=jnp.reshape(teacher_hidden, (n_rows, jnp.shape(teacher_hidden)[-1])),
        labels=flat_labels,
        valid=valid,
        beta=beta,
        temperature=temperature,
    )
