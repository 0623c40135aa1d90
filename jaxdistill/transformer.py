"""A small decoder-only transformer language model in Flax NNX (the student and teacher of the demo and tests).

Pre-norm blocks (RMSNorm → causal multi-head self-attention → residual, RMSNorm → GELU MLP →
residual), learned token and position embeddings, a final RMSNorm, and an LM head that is
either an untied ``nnx.Linear(d_model, V)`` (optionally with bias) or tied to the token
embedding (logits = h Eᵀ, optionally plus a (V,) bias).

For distillation the model is used in two halves: :meth:`TransformerLM.hidden_states` gives the
final hidden states and :attr:`TransformerLM.lm_head` the head as an :class:`~jaxdistill.heads.LMHead`,
which :func:`jaxdistill.heads.fused_head_loss` consumes without materializing logits.
``model(tokens)`` gives the materialized logits (generation, evaluation, the reference loss).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import nnx

from jaxdistill.heads import LMHead, lm_head

__all__ = ["TransformerLM"]


class _Block(nnx.Module):
    """One pre-norm transformer block: x + Attn(RMSNorm(x)), then x + MLP(RMSNorm(x))."""

    def __init__(self, d_model: int, n_heads: int, d_ff: int, *, dtype, param_dtype, rngs: nnx.Rngs):
        if d_model % n_heads:
            raise ValueError(f"`d_model` ({d_model}) must be divisible by `n_heads` ({n_heads})")
        self.n_heads = n_heads
        dense = dict(use_bias=False, dtype=dtype, param_dtype=param_dtype, rngs=rngs)
        self.attn_norm = nnx.RMSNorm(d_model, dtype=dtype, param_dtype=param_dtype, rngs=rngs)
        self.qkv = nnx.Linear(d_model, 3 * d_model, **dense)
        self.attn_out = nnx.Linear(d_model, d_model, **dense)
        self.mlp_norm = nnx.RMSNorm(d_model, dtype=dtype, param_dtype=param_dtype, rngs=rngs)
        self.mlp_in = nnx.Linear(d_model, d_ff, **dense)
        self.mlp_out = nnx.Linear(d_ff, d_model, **dense)

    def __call__(self, x: jax.Array) -> jax.Array:
        batch, length, d_model = x.shape
        q, k, v = jnp.split(self.qkv(self.attn_norm(x)), 3, axis=-1)
        heads = (batch, length, self.n_heads, d_model // self.n_heads)
        attended = jax.nn.dot_product_attention(q.reshape(heads), k.reshape(heads), v.reshape(heads), is_causal=True)
        x = x + self.attn_out(attended.reshape(x.shape))
        return x + self.mlp_out(jax.nn.gelu(self.mlp_in(self.mlp_norm(x))))


class TransformerLM(nnx.Module):
    """Decoder-only transformer LM: tokens (B, L) int → final hidden states (B, L, d_model) → logits (B, L, V).

    Args:
      vocab_size: V.
      d_model: hidden size H (the ``student_hidden``/``teacher_hidden`` width of the loss).
      n_layers, n_heads, d_ff: depth, attention heads (must divide ``d_model``), MLP width.
      max_len: longest sequence (learned position embeddings).
      tie_embeddings: the LM head is the token embedding (logits = h Eᵀ) instead of its own
        ``nnx.Linear(d_model, V)``.
      head_bias: the LM head has a (V,) bias (the Linear's bias, or a separate parameter
        ``head_bias`` when tied).
      dtype: computation dtype (None: the parameters' dtype). param_dtype: parameter dtype.
      rngs: ``nnx.Rngs`` for parameter initialization.

    Attributes:
      embed: ``nnx.Embed(V, d_model)`` token embedding. position: ``nnx.Embed(max_len, d_model)``.
      blocks: ``nnx.List`` of the ``n_layers`` blocks. final_norm: ``nnx.RMSNorm``.
      head: ``nnx.Linear(d_model, V)`` when untied, else absent.
      head_bias: ``nnx.Param`` (V,) when tied with a bias, else absent.

    Example:
      >>> from flax import nnx
      >>> import jax.numpy as jnp
      >>> model = TransformerLM(vocab_size=50, d_model=16, n_layers=1, n_heads=2, d_ff=32, max_len=8,
      ...                       tie_embeddings=True, rngs=nnx.Rngs(0))
      >>> tokens = jnp.zeros((2, 8), jnp.int32)
      >>> model.hidden_states(tokens).shape, model.lm_head.weight.shape, model(tokens).shape
      ((2, 8, 16), (50, 16), (2, 8, 50))
    """

    def __init__(
        self,
        *,
        vocab_size: int,
        d_model: int,
        n_layers: int,
        n_heads: int,
        d_ff: int,
        max_len: int,
        tie_embeddings: bool = False,
        head_bias: bool = False,
        dtype=None,
        param_dtype=jnp.float32,
        rngs: nnx.Rngs,
    ):
        self.tie_embeddings = tie_embeddings
        self.max_len = max_len
        embed_init = nnx.initializers.normal(stddev=d_model**-0.5)
        embed = dict(dtype=dtype, param_dtype=param_dtype, embedding_init=embed_init, rngs=rngs)
        self.embed = nnx.Embed(vocab_size, d_model, **embed)
        self.position = nnx.Embed(max_len, d_model, **embed)
        self.blocks = nnx.List(
            [_Block(d_model, n_heads, d_ff, dtype=dtype, param_dtype=param_dtype, rngs=rngs) for _ in range(n_layers)]
        )
        self.final_norm = nnx.RMSNorm(d_model, dtype=dtype, param_dtype=param_dtype, rngs=rngs)
        if tie_embeddings:
            if head_bias:
                self.head_bias = nnx.Param(jnp.zeros((vocab_size,), param_dtype))
        else:
            self.head = nnx.Linear(
                d_model, vocab_size, use_bias=head_bias, dtype=dtype, param_dtype=param_dtype, rngs=rngs
            )

    def hidden_states(self, tokens: jax.Array) -> jax.Array:
        """Final hidden states after the last block and the final RMSNorm.

        Args:
          tokens: (B, L) integer token ids, L ≤ ``max_len``.

        Returns:
          (B, L, d_model) in the computation dtype: the input of the LM head.
        """
        length = tokens.shape[-1]
        if length > self.max_len:
            raise ValueError(f"sequence length {length} exceeds `max_len` {self.max_len}")
        x = self.embed(tokens) + self.position(jnp.arange(length))
        for block in self.blocks:
            x = block(x)
        return self.final_norm(x)

    @property
    def lm_head(self) -> LMHead:
        """The LM head as an :class:`~jaxdistill.heads.LMHead`: (d_model, V) kernel, or the (V, d_model) tied table."""
        if self.tie_embeddings:
            return lm_head(self.embed, bias=self.head_bias[...] if hasattr(self, "head_bias") else None)
        return lm_head(self.head)

    def __call__(self, tokens: jax.Array) -> jax.Array:
        """(B, L) int tokens → (B, L, V) float32 logits (materialized)."""
        return self.lm_head.logits(self.hidden_states(tokens))
