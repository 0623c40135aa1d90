"""Argument validation shared by the fused loss and the reference: errors at trace time."""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np

REDUCTIONS = ("mean", "sum")
# "hv": (H, V), the Flax Dense / nnx.Linear kernel. "vh": (V, H), an nnx.Embed table (tied head)
# or a PyTorch Linear weight.
WEIGHT_LAYOUTS = ("hv", "vh")


def concrete_float(value, name: str) -> float | None:
    """``value`` as a Python float when it is known at trace time, else None (a tracer).

    Accepts Python ints and floats, NumPy and JAX integer or floating scalars and 0-d arrays.

    Raises:
      TypeError: ``value`` is not a real number (a string such as ``"0.5"``, a bool, None,
        a list, a complex number, a non-numeric array).
      ValueError: ``value`` is a numeric array that is not a scalar.
    """
    dtype = getattr(value, "dtype", None)
    if dtype is not None:
        real = jnp.issubdtype(dtype, jnp.integer) or jnp.issubdtype(dtype, jnp.floating)
    else:
        real = isinstance(value, int | float) and not isinstance(value, bool)
    if not real:
        raise TypeError(
            f"`{name}` must be a real number (a Python int or float, or a 0-d numeric array), "
            f"got {type(value).__name__} {value!r}"
        )
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
      vocab_size: V, the global vocabulary (all shards of a sharded one).
      student_hidden: (N, Hs). teacher_hidden: (N, Ht), or None without a dense teacher.
      labels: (N,) int32. valid: (N,) bool, ``labels != ignore_index`` AND ``where``.
      beta, temperature: the scalars as given (floats or traced arrays).
      bad_teacher: None, or a traced bool that poisons the loss like a bad label (a top-k
        teacher's out-of-range or repeated ids, or cached values that are not log-probabilities,
        on a valid row).
    """

    vocab_size: int
    student_hidden: jax.Array
    teacher_hidden: jax.Array
    labels: jax.Array
    valid: jax.Array
    beta: object
    temperature: object
    bad_teacher: jax.Array | None = None

    def any_bad_label(self) -> jax.Array:
        """True when a valid row's label lies outside [0, V)."""
        out_of_range = (self.labels < 0) | (self.labels >= self.vocab_size)
        return jnp.any(self.valid & out_of_range)

    def row_labels(self) -> jax.Array:
        """(N,) int32 labels as the row math reads them: in [0, V) for valid rows, −1 for ignored ones.

        A valid label outside [0, V) is clipped into it so that nothing reads out of bounds; the
        loss is NaN for it anyway (:meth:`any_bad_label`).
        """
        return jnp.where(self.valid, jnp.clip(self.labels, 0, self.vocab_size - 1), -1)

    def count_and_denominator(self, *, reduction, axis_name):
        """(valid-token count, psum-ed over ``axis_name`` when given; the float32 reduction divisor).

        The divisor is max(1, count) for ``"mean"`` and 1 for ``"sum"``.
        """
        count = jnp.sum(self.valid.astype(jnp.int32))
        if axis_name is not None:
            count = jax.lax.psum(count, axis_name)
        denominator = jnp.maximum(count, 1).astype(jnp.float32) if reduction == "mean" else jnp.ones((), jnp.float32)
        return count, denominator

    def reduce(self, total, soft_sum, hard_sum, *, reduction, axis_name, return_aux, prescaled=False):
        """The loss (and aux) from sums over the valid rows; shared by the fused path and the reference.

        ``"mean"`` divides by max(1, valid-token count), psum-ed over ``axis_name`` when given.
        A bad label or a bad traced β/T makes the loss and the aux parts NaN. The aux parts are
        ``stop_gradient``-ed.

        Args:
          total: scalar Σ soft_weight·JSD + hard_weight·CE, or that sum already divided by the
            divisor when ``prescaled`` (the fused path scales its gradients before rounding them).
          soft_sum, hard_sum: scalar Σ JSD, Σ CE.
        """
        count, denominator = self.count_and_denominator(reduction=reduction, axis_name=axis_name)
        dtype = jnp.result_type(total)
        denominator = denominator.astype(dtype)
        bad = self.any_bad_label() | self.bad_hyper()
        if self.bad_teacher is not None:
            bad = bad | self.bad_teacher
        poison = jnp.where(bad, jnp.nan, 1.0).astype(dtype)
        loss = total * poison / (1 if prescaled else denominator)
        if not return_aux:
            return loss
        aux = {
            "soft_loss": jax.lax.stop_gradient(soft_sum * poison / denominator),
            "hard_loss": jax.lax.stop_gradient(hard_sum * poison / denominator),
            "num_valid_tokens": count,
        }
        return loss, aux

    def bad_hyper(self) -> jax.Array:
        """True when a traced β is outside [0, 1] or a traced T is not finite and > 0 (concrete ones raise)."""
        beta, temperature = jnp.asarray(self.beta), jnp.asarray(self.temperature)
        return ~((beta >= 0) & (beta <= 1) & (temperature > 0) & jnp.isfinite(temperature))


def weight_sizes(weight, layout: str, name: str) -> tuple[int, int]:
    """(H, V) of a 2-D floating LM-head weight stored in ``layout`` ("hv" or "vh").

    Raises:
      ValueError, TypeError: unknown layout, not 2-D, or not floating.
    """
    if layout not in WEIGHT_LAYOUTS:
        raise ValueError(f"`{name}_layout` must be one of {WEIGHT_LAYOUTS}, got {layout!r}")
    if jnp.ndim(weight) != 2:
        raise ValueError(f"`{name}` must be 2-D ({layout[0].upper()}, {layout[1].upper()}), got {jnp.shape(weight)}")
    if not jnp.issubdtype(jnp.result_type(weight), jnp.floating):
        raise TypeError(f"`{name}` must be floating, got {jnp.result_type(weight)}")
    rows, cols = jnp.shape(weight)
    return (rows, cols) if layout == "hv" else (cols, rows)


def _check_hidden(x, weight, layout: str, name: str, weight_name: str) -> None:
    """``x`` is (..., H) floating, H the hidden size of ``weight`` read in ``layout``.

    When ``x`` would fit ``weight`` read in the other layout, the message names that layout.
    """
    if jnp.ndim(x) < 1:
        raise ValueError(f"`{name}` must have shape (..., H), got a scalar")
    if not jnp.issubdtype(jnp.result_type(x), jnp.floating):
        raise TypeError(f"`{name}` must be floating, got {jnp.result_type(x)}")
    hidden_size = jnp.shape(x)[-1]
    expected = weight_sizes(weight, layout, weight_name)[0]
    if hidden_size == expected:
        return
    message = (
        f"`{name}` hidden size {hidden_size} does not match the hidden size {expected} of `{weight_name}` "
        f"{jnp.shape(weight)}"
    )
    other = "vh" if layout == "hv" else "hv"
    if hidden_size == weight_sizes(weight, other, weight_name)[0]:
        read_as = "(V, H)" if other == "vh" else "(H, V)"
        message += f'; it fits `{weight_name}` read as {read_as}: pass {weight_name}_layout="{other}"'
    raise ValueError(message)


def _check_bias(bias, vocab_size: int, name: str) -> None:
    if bias is None:
        return
    if jnp.shape(bias) != (vocab_size,):
        raise ValueError(f"`{name}` must have shape ({vocab_size},), got {jnp.shape(bias)}")
    if not jnp.issubdtype(jnp.result_type(bias), jnp.floating):
        raise TypeError(f"`{name}` must be floating, got {jnp.result_type(bias)}")


def _labels_array(labels):
    """``labels`` as an integer array: a JAX or NumPy array (any signed or unsigned width) or a Python int.

    Raises:
      TypeError: a list or tuple (JAX converts those ambiguously), or not integer.
    """
    if isinstance(labels, int) and not isinstance(labels, bool):
        labels = np.asarray(labels)  # int64: _narrow_labels range-checks it before JAX sees it
    if not isinstance(labels, jax.Array | np.ndarray | np.generic):
        raise TypeError(
            f"`labels` must be an integer array (jax.Array or numpy.ndarray), got {type(labels).__name__}: "
            "pass np.asarray(labels)"
        )
    if not jnp.issubdtype(labels.dtype, jnp.integer):
        raise TypeError(f"`labels` must be an integer array, got dtype {labels.dtype}")
    return labels


def _narrow_labels(labels, n_rows: int, vocab_size: int, ignore_index: int) -> tuple[jax.Array, jax.Array]:
    """(N,) int32 labels clipped to [-1, V] and the (N,) mask ``labels != ignore_index``.

    Both are computed in the labels' own dtype, before any narrowing, so that no label wraps:
    with x64 off, JAX keeps only the low 32 bits of a NumPy int64 (2**32 + 3 would become 3), so
    NumPy labels are compared and clipped in NumPy. An unsigned label never equals a negative
    ``ignore_index``. A label outside [0, V) stays outside it (-1 or V), so the loss is NaN.
    """
    xp = np if isinstance(labels, np.ndarray | np.generic) else jnp
    info = np.iinfo(labels.dtype)
    if info.min <= ignore_index <= info.max:
        valid = xp.reshape(labels, (n_rows,)) != ignore_index
    else:
        valid = xp.ones((n_rows,), bool)
    return narrow_token_ids(labels, (n_rows,), vocab_size), jnp.asarray(valid)


def narrow_token_ids(ids, shape, vocab_size: int) -> jax.Array:
    """``ids`` (any integer dtype) reshaped to ``shape`` and clipped to [−1, V] as int32.

    The clip happens in the ids' own dtype, before any narrowing (NumPy ids in NumPy), so that no
    id wraps: with x64 off, JAX keeps only the low 32 bits of a NumPy int64. An id outside [0, V)
    stays outside it (−1 or V). Shared by the labels and a top-k teacher's ids.
    """
    xp = np if isinstance(ids, np.ndarray | np.generic) else jnp
    info = np.iinfo(ids.dtype)
    flat = xp.reshape(ids, shape)
    return jnp.asarray(xp.clip(flat, max(-1, int(info.min)), min(vocab_size, int(info.max))).astype(np.int32))


def _check_dense_teacher(teacher_hidden, teacher_weight, layout, vocab_size, student_weight, lead) -> None:
    """The teacher head fits its hidden states and the student's vocabulary V, with the same leading dims."""
    if teacher_hidden is None or teacher_weight is None:
        raise ValueError(
            "`teacher_hidden` and `teacher_weight` are required (for a cached top-k teacher use "
            "jaxdistill.fused_linear_topk_distill_loss)"
        )
    teacher_vocab = weight_sizes(teacher_weight, layout, "teacher_weight")[1]
    _check_hidden(teacher_hidden, teacher_weight, layout, "teacher_hidden", "teacher_weight")
    if teacher_vocab != vocab_size:
        raise ValueError(
            f"student vocabulary ({vocab_size}, `student_weight` {jnp.shape(student_weight)}) "
            f"and teacher vocabulary ({teacher_vocab}, `teacher_weight` "
            f"{jnp.shape(teacher_weight)}) must match"
        )
    if jnp.shape(teacher_hidden)[:-1] != lead:
        raise ValueError(
            f"`teacher_hidden` leading dims {jnp.shape(teacher_hidden)[:-1]} do not match "
            f"`student_hidden` leading dims {lead}"
        )


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
    soft_weight,
    hard_weight,
    ignore_index,
    where,
    reduction,
    return_aux=False,
    student_weight_layout="hv",
    teacher_weight_layout="hv",
    vocab_shards: int = 1,
    dense_teacher: bool = True,
) -> FlatInputs:
    """Check shapes, dtypes and options (see :func:`jaxdistill.fused_linear_jsd_loss`).

    With ``dense_teacher=False`` (a teacher that is not a dense head, e.g. cached top-k log-probs,
    checked by its caller) ``teacher_hidden`` and ``teacher_weight`` are None and only the student
    is checked.

    With ``vocab_shards`` = M > 1 the weights and biases are one of M equal vocabulary shards
    (V/M columns each) and the labels are global ids: ``FlatInputs.vocab_size`` is then V.

    Raises:
      ValueError, TypeError: with a message naming the offending argument.
    """
    vocab_size = weight_sizes(student_weight, student_weight_layout, "student_weight")[1]
    _check_hidden(student_hidden, student_weight, student_weight_layout, "student_hidden", "student_weight")
    lead = jnp.shape(student_hidden)[:-1]
    if dense_teacher:
        _check_dense_teacher(teacher_hidden, teacher_weight, teacher_weight_layout, vocab_size, student_weight, lead)
    _check_bias(student_bias, vocab_size, "student_bias")
    _check_bias(teacher_bias, vocab_size, "teacher_bias")
    labels = _labels_array(labels)
    if jnp.shape(labels) != lead:
        raise ValueError(f"`labels` shape {jnp.shape(labels)} must equal the leading dims {lead} of the hidden states")
    if where is not None:
        if jnp.shape(where) != lead:
            raise ValueError(f"`where` shape {jnp.shape(where)} must equal `labels` shape {lead}")
        if jnp.result_type(where) != jnp.bool_:
            raise TypeError(f"`where` must be boolean, got {jnp.result_type(where)}")
    if not isinstance(return_aux, bool):
        raise TypeError(f"`return_aux` must be a bool, got {type(return_aux).__name__}")
    if reduction not in REDUCTIONS:
        raise ValueError(f"`reduction` must be one of {REDUCTIONS}, got {reduction!r}")
    if isinstance(ignore_index, bool) or not isinstance(ignore_index, (int, np.integer)):
        raise TypeError(f"`ignore_index` must be a Python int, got {type(ignore_index).__name__}")
    beta_value = concrete_float(beta, "beta")
    if beta_value is not None and not 0.0 <= beta_value <= 1.0:
        raise ValueError(f"`beta` must lie in [0, 1], got {beta_value}")
    temperature_value = concrete_float(temperature, "temperature")
    if temperature_value is not None and not 0.0 < temperature_value < float("inf"):
        raise ValueError(f"`temperature` must be finite and > 0, got {temperature_value}")
    concrete_float(soft_weight, "soft_weight")
    concrete_float(hard_weight, "hard_weight")

    n_rows = int(np.prod(lead, dtype=np.int64))
    vocab_size *= vocab_shards  # the global vocabulary the labels index
    flat_labels, valid = _narrow_labels(labels, n_rows, vocab_size, ignore_index)
    if where is not None:
        valid = valid & jnp.reshape(where, (n_rows,))
    return FlatInputs(
        vocab_size=vocab_size,
        student_hidden=jnp.reshape(student_hidden, (n_rows, jnp.shape(student_hidden)[-1])),
        teacher_hidden=None
        if teacher_hidden is None
        else jnp.reshape(teacher_hidden, (n_rows, jnp.shape(teacher_hidden)[-1])),
        labels=flat_labels,
        valid=valid,
        beta=beta,
        temperature=temperature,
    )
