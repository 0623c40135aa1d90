"""LM-head adapters (jaxdistill.heads): tied/untied heads, with and without bias, NNX and Linen.

Each fused loss and gradient is compared with the unfused reference on the same heads.
"""

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx
from helpers import relative_error

from bench.multi_gpu import weight_sized_copies
from jaxdistill import fused_linear_jsd_loss, reference
from jaxdistill.heads import LMHead, fused_head_loss, lm_head

N, HS, HT, V = 37, 16, 24, 123  # N not a multiple of the chunk (8); V not a multiple of anything
LOSS = dict(beta=0.3, temperature=2.0, hard_weight=0.5)


def _head(key, hidden, *, tied, bias):
    """An LMHead with logits of std ≈ 2: a (V, H) table when tied, else an (H, V) kernel."""
    k_w, k_b = jax.random.split(key)
    shape = (V, hidden) if tied else (hidden, V)
    weight = 2 * jax.random.normal(k_w, shape) / np.sqrt(hidden)
    return LMHead(weight, jax.random.normal(k_b, (V,)) if bias else None, vocab_major=tied)


def _inputs(seed=0):
    k = jax.random.split(jax.random.key(seed), 3)
    labels = jax.random.randint(k[2], (N,), 0, V).at[::5].set(-100)
    return jax.random.normal(k[0], (N, HS)), jax.random.normal(k[1], (N, HT)), labels


HEAD_KINDS = {"untied": (False, False), "untied+bias": (False, True), "tied": (True, False), "tied+bias": (True, True)}
# Every head kind appears once as the student and once as the teacher.
PAIRS = [("untied", "tied"), ("untied+bias", "tied+bias"), ("tied", "untied+bias"), ("tied+bias", "untied")]


@pytest.mark.parametrize(("student_kind", "teacher_kind"), PAIRS, ids=[f"student={s}-teacher={t}" for s, t in PAIRS])
def test_head_loss_matches_reference(student_kind, teacher_kind):
    k_s, k_t = jax.random.split(jax.random.key(1))
    tied_s, bias_s = HEAD_KINDS[student_kind]
    tied_t, bias_t = HEAD_KINDS[teacher_kind]
    student = _head(k_s, HS, tied=tied_s, bias=bias_s)
    teacher = _head(k_t, HT, tied=tied_t, bias=bias_t)
    xs, xt, labels = _inputs()

    def value_and_grads(loss_fn, **extra):
        def f(xs, student, teacher):
            return fused_head_loss(xs, student, xt, teacher, labels, loss_fn=loss_fn, **LOSS, **extra)

        return jax.jit(jax.value_and_grad(f, argnums=(0, 1, 2)))(xs, student, teacher)

    loss, (g_x, g_student, g_teacher) = value_and_grads(fused_linear_jsd_loss, chunk_size=8)
    want_loss, (want_x, want_student, _) = value_and_grads(reference.fused_linear_jsd_loss)
    assert float(loss) == pytest.approx(float(want_loss), rel=2e-5)
    assert relative_error(g_x, want_x) < 1e-4
    # The student head's gradient comes back in the head's own layout: (V, H) for a tied table.
    assert g_student.weight.shape == student.weight.shape
    assert relative_error(g_student.weight, want_student.weight) < 1e-4
    if bias_s:
        assert relative_error(g_student.bias, want_student.bias) < 1e-4
    assert not jnp.any(g_teacher.weight)
    if bias_t:
        assert not jnp.any(g_teacher.bias)


@pytest.mark.parametrize("kind", list(HEAD_KINDS))
def test_lm_head_of_nnx_module(kind):
    """lm_head reads an nnx.Linear / nnx.Embed and nnx.grad reaches the module's parameters."""
    tied, bias = HEAD_KINDS[kind]
    rngs = nnx.Rngs(0)
    module = nnx.Embed(V, HS, rngs=rngs) if tied else nnx.Linear(HS, V, use_bias=bias, rngs=rngs)
    tied_bias = nnx.Param(jnp.linspace(-1, 1, V)) if tied and bias else None
    teacher = _head(jax.random.key(2), HT, tied=False, bias=False)
    xs, xt, labels = _inputs(3)

    def module_loss(module, tied_bias):
        head = lm_head(module, bias=None if tied_bias is None else tied_bias[...])
        return fused_head_loss(xs, head, xt, teacher, labels, chunk_size=8, **LOSS)

    grads = nnx.jit(nnx.grad(module_loss, argnums=(0, 1)))(module, tied_bias)
    head = lm_head(module, bias=None if tied_bias is None else tied_bias[...])
    assert head.vocab_major == tied and (head.bias is not None) == bias
    assert (head.hidden_size, head.vocab_size, head.layout) == (HS, V, "vh" if tied else "hv")
    want = jax.jit(jax.grad(lambda h: fused_head_loss(xs, h, xt, teacher, labels, chunk_size=8, **LOSS)))(head)
    if tied:
        np.testing.assert_allclose(grads[0].embedding[...], want.weight, rtol=1e-6, atol=1e-9)
        if bias:
            np.testing.assert_allclose(grads[1][...], want.bias, rtol=1e-6, atol=1e-9)
    else:
        np.testing.assert_allclose(grads[0].kernel[...], want.weight, rtol=1e-6, atol=1e-9)
        if bias:
            np.testing.assert_allclose(grads[0].bias[...], want.bias, rtol=1e-6, atol=1e-9)


class _LinenLM(nn.Module):
    """A Linen model with an untied Dense head or a head tied to its Embed."""

    tied: bool

    def setup(self):
        self.embed = nn.Embed(V, HS)
        self.body = nn.Dense(HS)
        if not self.tied:
            self.head = nn.Dense(V)

    def hidden_states(self, tokens):
        return jnp.tanh(self.body(self.embed(tokens)))

    def __call__(self, tokens):
        h = self.hidden_states(tokens)
        return self.embed.attend(h) if self.tied else self.head(h)


@pytest.mark.parametrize("tied", [False, True], ids=["linen-dense-head", "linen-tied-embed"])
def test_linen_model(tied):
    """A Linen model: the head is built from its parameter arrays; gradients flow through the whole model."""
    model = _LinenLM(tied=tied)
    tokens = jax.random.randint(jax.random.key(4), (N,), 0, V)
    params = jax.jit(model.init)(jax.random.key(5), tokens)["params"]
    teacher = _head(jax.random.key(6), HT, tied=True, bias=True)
    _, xt, labels = _inputs(7)

    def head_of(params):
        if tied:
            return LMHead(params["embed"]["embedding"], vocab_major=True)
        return LMHead(params["head"]["kernel"], params["head"]["bias"])

    def loss(params, loss_fn, **extra):
        hidden = model.apply({"params": params}, tokens, method=_LinenLM.hidden_states)
        return fused_head_loss(hidden, head_of(params), xt, teacher, labels, loss_fn=loss_fn, **LOSS, **extra)

    @jax.jit
    def logits_both_ways(params):
        hidden = model.apply({"params": params}, tokens, method=_LinenLM.hidden_states)
        return head_of(params).logits(hidden), model.apply({"params": params}, tokens)

    np.testing.assert_allclose(*logits_both_ways(params), atol=1e-5)
    grad = jax.jit(jax.grad(loss), static_argnums=1, static_argnames="chunk_size")
    got = grad(params, fused_linear_jsd_loss, chunk_size=8)
    want = grad(params, reference.fused_linear_jsd_loss)
    for path, g in jax.tree_util.tree_leaves_with_path(got):
        w = dict(jax.tree_util.tree_leaves_with_path(want))[path]
        assert jnp.any(g != 0), path
        assert relative_error(g, w) < 1e-4, path


def _compiled_step_text(head: LMHead):
    teacher = _head(jax.random.key(8), HT, tied=False, bias=False)
    xs, xt, labels = _inputs(9)

    def f(xs, head):
        return fused_head_loss(xs, head, xt, teacher, labels, chunk_size=8, **LOSS)

    return jax.jit(jax.value_and_grad(f, argnums=(0, 1))).lower(xs, head).compile().as_text()


def test_untied_head_makes_no_weight_copy():
    text = _compiled_step_text(_head(jax.random.key(10), HS, tied=False, bias=True))
    assert weight_sized_copies(text, V, HS) == {"per_call": 0, "per_chunk": 0, "names": []}


def test_tied_head_makes_no_table_copy():
    """The (V, H) table goes to the loss with ``student_weight_layout="vh"`` and is contracted in
    place: no transposed copy of it, nor of its gradient, per step or per chunk."""
    text = _compiled_step_text(_head(jax.random.key(10), HS, tied=True, bias=True))
    assert weight_sized_copies(text, V, HS) == {"per_call": 0, "per_chunk": 0, "names": []}


def test_errors():
    rngs = nnx.Rngs(0)
    with pytest.raises(TypeError, match="nnx.Linear or nnx.Embed"):
        lm_head(nnx.RMSNorm(HS, rngs=rngs))
    with pytest.raises(ValueError, match="carries its own bias"):
        lm_head(nnx.Linear(HS, V, rngs=rngs), bias=jnp.zeros(V))
    head = _head(jax.random.key(0), HS, tied=False, bias=False)
    xs, _, labels = _inputs()
    with pytest.raises(TypeError, match="comes from the LMHead"):
        fused_head_loss(xs, head, xs, head, labels, student_bias=jnp.zeros(V))
