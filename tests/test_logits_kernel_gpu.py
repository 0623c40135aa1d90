"""The fused logits kernel and the whole Pallas path compiled through Triton on a GPU.

Skipped where there is no GPU (``tests/conftest.py``). On a GPU, ``test_logits_kernel.py`` also
runs the real kernel (``interpret=None`` picks it) over the small geometries; this file adds the
real vocabularies, ragged row and vocabulary tails at real size (Triton has no bounds masking of
its own: an unmasked tail would read or write past a row), and extreme logits.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from helpers import relative_error

from jaxdistill import fused_linear_jsd_loss, rowmath
from pallas_kernels import logits_and_partials_pallas

pytestmark = pytest.mark.gpu

# (rows, Hs, Ht, V): llama 3, qwen 2, gemma 3 heads; rows and V ragged against the 128 × 256 tile.
REAL_SHAPES = {
    "llama3-V128256": (384, 2048, 4096, 128256),
    "qwen2-V151936-ragged-rows": (200, 2048, 4096, 151936),
    "gemma3-V262144": (256, 1152, 3840, 262144),
    "llama3-V128263-ragged-vocab": (130, 2048, 4096, 128263),
}


def _inputs(rows, hs, ht, vocab, *, scale=3.0, seed=0, dtype=jnp.bfloat16):
    k = jax.random.split(jax.random.key(seed), 6)
    return (
        jax.random.normal(k[0], (rows, hs), dtype),
        (jax.random.normal(k[1], (hs, vocab)) * scale / np.sqrt(hs)).astype(dtype),
        (jax.random.normal(k[4], (vocab,)) * 0.5).astype(dtype),
        jax.random.normal(k[2], (rows, ht), dtype),
        (jax.random.normal(k[3], (ht, vocab)) * scale / np.sqrt(ht)).astype(dtype),
        (jax.random.normal(k[5], (vocab,)) * 0.5).astype(dtype),
    )


@pytest.mark.parametrize("shape", REAL_SHAPES.values(), ids=REAL_SHAPES.keys())
def test_kernel_matches_xla_logits_and_statistics(shape):
    xs, ws, bs, xt, wt, bt = _inputs(*shape)
    inv_t = jnp.float32(1 / 1.5)
    out = jax.jit(lambda *a: logits_and_partials_pallas(*a, jnp.float32(1.5)))(xs, ws, bs, xt, wt, bt)
    dot = lambda x, w, b: jnp.dot(x, w, preferred_element_type=jnp.float32) + b.astype(jnp.float32)  # noqa: E731
    want = rowmath.chunk_logits_xla(dot(xs, ws, bs), dot(xt, wt, bt), inv_t)
    got_stats = rowmath.combine_partials(out.partials, inv_t)
    want_stats = rowmath.combine_partials(want.partials, inv_t)
    for name, g, w in zip(rowmath.RowStats._fields, got_stats, want_stats, strict=True):
        assert bool(jnp.all(jnp.isfinite(g))), name
        np.testing.assert_allclose(g, w, rtol=1e-4, atol=1e-4, err_msg=name)
    # Relative logits: z − m_tile against z − m_row, shifted by the tile maxima.
    rows, vocab = out.student.shape
    offsets = jnp.repeat((out.partials.max_s - got_stats.max_s).T, out.tile_width, axis=1)[:, :vocab]
    np.testing.assert_allclose(out.student + offsets, want.student, atol=2e-3 * float(jnp.max(jnp.abs(want.student))))


@pytest.mark.parametrize("beta", [0.0, 0.5, 1.0], ids=lambda b: f"beta={b}")
@pytest.mark.parametrize("shape", list(REAL_SHAPES.values())[:2], ids=list(REAL_SHAPES)[:2])
def test_pallas_loss_matches_xla_path(shape, beta):
    xs, ws, bs, xt, wt, bt = _inputs(*shape, seed=1)
    labels = jax.random.randint(jax.random.key(2), (shape[0],), 0, shape[3]).at[::7].set(-100)
    options = dict(student_bias=bs, teacher_bias=bt, beta=beta, temperature=2.0, hard_weight=0.5, chunk_size=128)

    def value_and_grads(implementation):
        loss = lambda x, w, b: fused_linear_jsd_loss(  # noqa: E731
            x, w, xt, wt, labels, implementation=implementation, **{**options, "student_bias": b}
        )
        return jax.jit(jax.value_and_grad(loss, argnums=(0, 1, 2)))(xs, ws, bs)

    got_loss, got_grads = value_and_grads("pallas")
    want_loss, want_grads = value_and_grads("xla")
    np.testing.assert_allclose(float(got_loss), float(want_loss), rtol=2e-5)
    for g, w in zip(got_grads, want_grads, strict=True):
        assert relative_error(g, w) < 2 * 2.0**-8  # both round dlogits and results to bf16


@pytest.mark.parametrize("beta", [0.0, 0.5, 1.0], ids=lambda b: f"beta={b}")
def test_extreme_logits_and_low_temperature_stay_finite(beta):
    xs, ws, bs, xt, wt, bt = _inputs(256, 2048, 4096, 128256, scale=1000.0, seed=3)
    labels = jax.random.randint(jax.random.key(4), (256,), 0, 128256)
    loss = lambda x, w: fused_linear_jsd_loss(  # noqa: E731
        x, w, xt, wt, labels, beta=beta, temperature=0.05, hard_weight=0.5, implementation="pallas"
    )
    value, grads = jax.jit(jax.value_and_grad(loss, argnums=(0, 1)))(xs, ws)
    assert np.isfinite(float(value))
    assert all(bool(jnp.all(jnp.isfinite(g))) for g in grads)


def test_value_only_forward_matches_value_and_grad():
    xs, ws, bs, xt, wt, bt = _inputs(512, 2048, 4096, 128256, seed=5)
    labels = jax.random.randint(jax.random.key(6), (512,), 0, 128256)
    for beta in (0.0, 0.5, 1.0):
        loss = lambda x, w, beta=beta: fused_linear_jsd_loss(  # noqa: E731
            x, w, xt, wt, labels, beta=beta, hard_weight=0.5, implementation="pallas"
        )
        value = jax.jit(loss)(xs, ws)
        with_grads, _ = jax.jit(jax.value_and_grad(loss))(xs, ws)
        np.testing.assert_allclose(float(value), float(with_grads), rtol=1e-6)
