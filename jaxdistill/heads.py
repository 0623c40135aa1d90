"""LM-head adapters: the fused loss on Flax NNX, Linen or plain-array language-model heads.

:func:`jaxdistill.fused_linear_jsd_loss` takes each head as a weight, (H, V) (Flax ``Dense`` /
``nnx.Linear`` kernel layout) or (V, H) (``*_weight_layout="vh"``), and an optional (V,) bias.
A language model's head is either

- an untied projection: ``nnx.Linear(H, V)`` (kernel (H, V), optional bias), or
- tied to the input embedding: ``nnx.Embed(V, H)`` (table (V, H)), logits = x Eᵀ.

:class:`LMHead` holds either form together with its layout; :func:`lm_head` builds one from an
NNX module, and :func:`fused_head_loss` is the fused loss on two heads. A tied head's (V, H)
table goes to the loss as it is, with ``*_weight_layout="vh"``: the chunk matmuls contract it in
place, so no transposed copy of the table or of its gradient is ever made
(``tests/test_heads.py`` checks the compiled step; ``python -m bench.multi_gpu`` reports the
count on GPU).

Linen models: build the head from the parameter arrays, e.g.
``LMHead(params["lm_head"]["kernel"], params["lm_head"].get("bias"))`` or
``LMHead(params["embed"]["embedding"], vocab_major=True)``.
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
from flax import nnx

from jaxdistill._validate import weight_sizes
from jaxdistill.fused import fused_linear_jsd_loss, hidden_dim

__all__ = ["LMHead", "fused_head_loss", "lm_head"]


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class LMHead:
    """An LM head as arrays: logits = hidden · kernel + bias.

    A pytree (``weight`` and ``bias`` are leaves, ``vocab_major`` is static), so it can cross
    ``jit``/``pmap``/``shard_map`` boundaries and carry gradients.

    Attributes:
      weight: (H, V) kernel (``vocab_major=False``, ``nnx.Linear``/``nn.Dense`` layout), or the
        (V, H) embedding table of a tied head (``vocab_major=True``, ``nnx.Embed`` layout).
      bias: optional (V,) bias.
      vocab_major: whether ``weight`` is stored (V, H).

    Example:
      >>> import jax.numpy as jnp
      >>> head = LMHead(jnp.ones((10, 4)), vocab_major=True)  # tied to a (V=10, H=4) embedding
      >>> head.layout, head.hidden_size, head.logits(jnp.ones((2, 4))).shape
      ('vh', 4, (2, 10))
    """

    weight: jax.Array
    bias: jax.Array | None = None
    vocab_major: bool = dataclasses.field(default=False, metadata={"static": True})

    @property
    def hidden_size(self) -> int:
        return weight_sizes(self.weight, self.layout, "weight")[0]

    @property
    def vocab_size(self) -> int:
        return weight_sizes(self.weight, self.layout, "weight")[1]

    @property
    def layout(self) -> str:
        """The ``*_weight_layout`` of :func:`jaxdistill.fused_linear_jsd_loss`: "vh" or "hv"."""
        return "vh" if self.vocab_major else "hv"

    def logits(self, hidden: jax.Array) -> jax.Array:
        """(..., H) → (..., V) float32 logits, materialized (for generation/evaluation, not the loss)."""
        z = jax.lax.dot_general(
            hidden,
            self.weight,
            (((hidden.ndim - 1,), (hidden_dim(self.layout),)), ((), ())),
            preferred_element_type=jnp.float32,
        )
        return z if self.bias is None else z + self.bias.astype(jnp.float32)


def lm_head(module: nnx.Linear | nnx.Embed, *, bias: jax.Array | None = None) -> LMHead:
    """The :class:`LMHead` of an NNX module: an untied ``nnx.Linear`` or a tied ``nnx.Embed``.

    Reads the parameters' current values (tracers inside ``nnx.value_and_grad``/``nnx.jit``, so
    gradients flow back to the module's parameters).

    Args:
      module: ``nnx.Linear(H, V)`` (kernel (H, V), its own optional bias) or ``nnx.Embed(V, H)``
        (a tied head; logits = x Eᵀ).
      bias: optional (V,) output bias, only for a tied ``nnx.Embed`` head (an ``nnx.Linear``
        carries its own).

    Returns:
      The head, with ``vocab_major=True`` for an embedding.

    Raises:
      TypeError: ``module`` is neither an ``nnx.Linear`` nor an ``nnx.Embed``.
      ValueError: ``bias`` given with an ``nnx.Linear``.
    """
    if isinstance(module, nnx.Linear):
        if bias is not None:
            raise ValueError("`bias` is for a tied nnx.Embed head; an nnx.Linear head carries its own bias")
        return LMHead(module.kernel[...], None if module.bias is None else module.bias[...])
    if isinstance(module, nnx.Embed):
        return LMHead(module.embedding[...], bias, vocab_major=True)
    raise TypeError(f"`module` must be an nnx.Linear or nnx.Embed LM head, got {type(module).__name__}")


def fused_head_loss(
    student_hidden,
    student_head: LMHead,
    teacher_hidden,
    teacher_head: LMHead,
    labels,
    *,
    loss_fn=fused_linear_jsd_loss,
    **loss_kwargs,
):
    """:func:`jaxdistill.fused_linear_jsd_loss` with each head given as an :class:`LMHead`.

    Same loss (teacher = ``teacher_hidden``/``teacher_head``): ℓ = soft_weight·JSD_β(P_teacher,
    Q_student) + hard_weight·CE(student), reduced over valid tokens. Gradients flow to
    ``student_hidden`` and to the student head's weight and bias, in the head's own layout;
    the teacher gets zero gradients.

    Args:
      student_hidden: (..., Hs) floating. student_head: LMHead with hidden size Hs.
      teacher_hidden: (..., Ht) floating. teacher_head: LMHead with hidden size Ht, same V.
      labels: (...) integer.
      loss_fn: :func:`jaxdistill.fused_linear_jsd_loss` or
        :func:`jaxdistill.reference.fused_linear_jsd_loss` (the unfused reference).
      **loss_kwargs: keyword options of :func:`jaxdistill.fused_linear_jsd_loss` (``beta``,
        ``temperature``, ``soft_weight``, ``hard_weight``, ``ignore_index``, ``where``,
        ``reduction``, ``chunk_size``, ``axis_name``, ``implementation``, ...), except the biases.

    Returns:
      As :func:`jaxdistill.fused_linear_jsd_loss`.

    Example:
      >>> import jax, jax.numpy as jnp
      >>> k = jax.random.split(jax.random.key(0), 4)
      >>> student = LMHead(jax.random.normal(k[0], (100, 16)) / 4, vocab_major=True)  # tied
      >>> teacher = LMHead(jax.random.normal(k[1], (32, 100)) / 4, jnp.zeros(100))  # untied
      >>> xs, xt = jax.random.normal(k[2], (8, 16)), jax.random.normal(k[3], (8, 32))
      >>> y = jnp.arange(8)
      >>> grads = jax.grad(fused_head_loss, argnums=1)(xs, student, xt, teacher, y, beta=0.5)
      >>> grads.weight.shape
      (100, 16)
    """
    for name in ("student_bias", "teacher_bias", "student_weight_layout", "teacher_weight_layout"):
        if name in loss_kwargs:
            raise TypeError(f"`{name}` comes from the LMHead, not from a keyword")
    return loss_fn(
        student_hidden,
        student_head.weight,
        teacher_hidden,
        teacher_head.weight,
        labels,
        student_bias=student_head.bias,
        teacher_bias=teacher_head.bias,
        student_weight_layout=student_head.layout,
        teacher_weight_layout=teacher_head.layout,
        **loss_kwargs,
    )
