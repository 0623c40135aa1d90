"""The NNX + optax distillation step (jaxdistill.training) and the TransformerLM it trains."""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from distill_setup import CONFIG, SEQ_LEN, STUDENT, VOCAB, make_batch, make_models
from flax import nnx

from jaxdistill.heads import LMHead
from jaxdistill.training import DistillConfig, loss_and_grads, train_step
from jaxdistill.transformer import TransformerLM

# Both head kinds for the student and for the teacher (tests/test_heads.py covers every pairing).
HEADS = {
    "student=tied+bias-teacher=untied": dict(tie_student=True, student_bias=True, tie_teacher=False),
    "student=untied+bias-teacher=tied+bias": dict(
        tie_student=False, student_bias=True, tie_teacher=True, teacher_bias=True
    ),
}


@functools.cache
def frozen_models(heads):
    """(student, teacher) for the tests that do not update them (built once per head pairing)."""
    return make_models(**HEADS[heads])[:2]


@pytest.mark.parametrize("heads", list(HEADS))
def test_transformer_interface(heads):
    student, _ = frozen_models(heads)
    tokens = jnp.asarray(make_batch(2)["inputs"])

    @nnx.jit
    def forward(model):
        return model.hidden_states(tokens), model.lm_head, model(tokens)

    hidden, head, logits = forward(student)
    assert hidden.shape == (2, SEQ_LEN, STUDENT["d_model"])
    assert isinstance(head, LMHead) and head.vocab_major == HEADS[heads]["tie_student"]
    assert (head.hidden_size, head.vocab_size) == (STUDENT["d_model"], VOCAB)
    assert (head.bias is not None) == HEADS[heads]["student_bias"]
    assert logits.shape == (2, SEQ_LEN, VOCAB) and logits.dtype == jnp.float32
    np.testing.assert_allclose(logits, head.logits(hidden), rtol=1e-5, atol=1e-5)
    if head.vocab_major:  # tied: the head is the token embedding itself
        np.testing.assert_array_equal(head.weight, student.embed.embedding[...])


def test_transformer_errors():
    with pytest.raises(ValueError, match="divisible"):
        TransformerLM(**dict(STUDENT, n_heads=3), rngs=nnx.Rngs(0))
    model = TransformerLM(**dict(STUDENT, n_layers=0), rngs=nnx.Rngs(0))
    with pytest.raises(ValueError, match="max_len"):
        model.hidden_states(jnp.zeros((1, SEQ_LEN + 1), jnp.int32))


@pytest.mark.parametrize("heads", list(HEADS))
def test_step0_gradients_equal_reference_loss(heads):
    """At step 0 the fused step's gradient of every student parameter equals that of the same
    step written with the unfused reference loss; every parameter gets a non-zero gradient (the
    gradient flows through student_hidden into the whole student)."""
    student, teacher = frozen_models(heads)
    batch = make_batch(8)
    grads_fn = nnx.jit(loss_and_grads, static_argnames="config")
    metrics, grads = grads_fn(student, teacher, batch, config=CONFIG)
    reference_config = DistillConfig(**{**CONFIG.__dict__, "chunk_size": None, "reference": True})
    want_metrics, want = grads_fn(student, teacher, batch, config=reference_config)

    for key in ("loss", "soft_loss", "hard_loss"):
        assert float(metrics[key]) == pytest.approx(float(want_metrics[key]), rel=1e-5), key
    assert int(metrics["num_valid_tokens"]) == int(want_metrics["num_valid_tokens"]) == 45
    got_leaves = dict(jax.tree_util.tree_leaves_with_path(nnx.to_pure_dict(grads)))
    want_leaves = dict(jax.tree_util.tree_leaves_with_path(nnx.to_pure_dict(want)))
    param_paths = {p for p, _ in jax.tree_util.tree_leaves_with_path(nnx.to_pure_dict(nnx.state(student, nnx.Param)))}
    assert set(got_leaves) == set(want_leaves) == param_paths
    for path, g in got_leaves.items():
        w = want_leaves[path]
        scale = float(jnp.max(jnp.abs(w)))
        assert scale > 0, f"no gradient reaches {jax.tree_util.keystr(path)}"
        assert float(jnp.max(jnp.abs(g - w))) <= 1e-4 * scale, jax.tree_util.keystr(path)


def test_training_lowers_the_loss():
    """50 adamw steps of the NNX distillation loop (forward KL to the teacher + 0.1·CE, 4
    recurring batches) lower the loss, and its distillation part most."""
    student, teacher, optimizer = make_models(tx=optax.adamw(1e-2))
    config = DistillConfig(beta=0.0, temperature=1.0, hard_weight=0.1, chunk_size=16)
    batches = [make_batch(8, seed=s) for s in range(4)]
    step = nnx.jit(train_step, static_argnames="config")
    metrics = [step(student, teacher, optimizer, batches[i % 4], config=config) for i in range(50)]
    losses = np.array([[float(m["loss"]), float(m["soft_loss"])] for m in metrics])
    assert np.all(np.isfinite(losses))
    first, last = losses[:4].mean(axis=0), losses[-4:].mean(axis=0)
    assert last[0] < 0.75 * first[0], (first, last)  # today ≈ 0.59×
    assert last[1] < 0.6 * first[1], (first, last)  # the KL to the teacher: ≈ 0.39×
    assert int(optimizer.step[...]) == 50
