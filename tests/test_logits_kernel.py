"""The fused logits kernel (Pallas interpret mode on the CPU) against jnp math, and its lowering.

The kernel computes both logits of a chunk tile by tile and, in its epilogue, the tile's softmax
partials; the logits are stored relative to each tile's maximum. The expected values here are
computed independently: plain matmuls, then the tile maxima and sums of the padded logits.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxdistill import rowmath
from pallas_kernels import LogitsKernelConfig, default_logits_kernel_config, logits_and_partials_pallas

SMALL = LogitsKernelConfig(block_rows=16, block_v=64, block_k=16, num_warps=4, num_stages=1)


def _inputs(rows, hs, ht, vocab, *, dtype=jnp.float32, bias=True, scale=1.0, seed=0):
    k = jax.random.split(jax.random.key(seed), 6)
    xs = jax.random.normal(k[0], (rows, hs))
    ws = jax.random.normal(k[1], (hs, vocab)) * scale / np.sqrt(hs)
    xt = jax.random.normal(k[2], (rows, ht))
    wt = jax.random.normal(k[3], (ht, vocab)) * scale / np.sqrt(ht)
    bs = jax.random.normal(k[4], (vocab,)) * scale if bias else None
    bt = jax.random.normal(k[5], (vocab,)) * scale if bias else None
    cast = lambda a: None if a is None else a.astype(dtype)  # noqa: E731
    return tuple(map(cast, (xs, ws, bs, xt, wt, bt)))


def _expected(z_s, z_t, temperature, tile):
    """Tile maxima, relative logits and the partials of TilePartials, in float64 numpy."""
    z_s, z_t = np.asarray(z_s, np.float64), np.asarray(z_t, np.float64)
    rows, vocab = z_s.shape
    n_tiles = -(-vocab // tile)
    pad = ((0, 0), (0, n_tiles * tile - vocab))
    s = np.pad(z_s, pad, constant_values=-np.inf).reshape(rows, n_tiles, tile)
    t = np.pad(z_t, pad, constant_values=-np.inf).reshape(rows, n_tiles, tile)
    m_s, m_t = s.max(-1, keepdims=True), t.max(-1, keepdims=True)
    d_s, d_t = s - m_s, t - m_t
    e_q, e_p = np.exp(d_s / temperature), np.exp(d_t / temperature)
    with np.errstate(invalid="ignore"):
        kl_fwd = np.where(e_p > 0, e_p * (d_t - d_s), 0).sum(-1) / temperature
        kl_rev = np.where(e_q > 0, e_q * (d_s - d_t), 0).sum(-1) / temperature
    partials = dict(
        max_s=m_s[..., 0],
        sum_q=e_q.sum(-1),
        sum_u=np.exp(d_s).sum(-1),
        max_t=m_t[..., 0],
        sum_p=e_p.sum(-1),
        kl_fwd=kl_fwd,
        kl_rev=kl_rev,
    )
    flat = lambda d: d.reshape(rows, -1)[:, :vocab]  # noqa: E731
    return flat(d_s), flat(d_t), {k: v.T for k, v in partials.items()}


def _run(inputs, layouts, temperature, config, **kw):
    xs, ws, bs, xt, wt, bt = inputs
    ws_in = ws if layouts[0] == "hv" else ws.T
    wt_in = wt if layouts[1] == "hv" else wt.T
    return logits_and_partials_pallas(
        xs, ws_in, bs, xt, wt_in, bt, jnp.float32(temperature), layouts=layouts, config=config, **kw
    )


def _check(out, inputs, temperature, *, rtol):
    xs, ws, bs, xt, wt, bt = (None if a is None else np.asarray(a, np.float64) for a in inputs)
    z_s = xs @ ws + (0 if bs is None else bs)
    z_t = xt @ wt + (0 if bt is None else bt)
    d_s, d_t, partials = _expected(z_s, z_t, temperature, out.tile_width)
    scale = np.abs(z_s).max() + np.abs(z_t).max()
    np.testing.assert_allclose(np.asarray(out.student, np.float64), d_s, atol=rtol * scale)
    np.testing.assert_allclose(np.asarray(out.teacher, np.float64), d_t, atol=rtol * scale)
    for name, want in partials.items():
        got = np.asarray(getattr(out.partials, name), np.float64)
        atol = rtol * scale * (np.abs(want).max() + 1)
        np.testing.assert_allclose(got, want, rtol=rtol * 10, atol=atol, err_msg=name)


# Every pair of layouts; each layout of each head both with and without biases.
LAYOUTS_AND_BIAS = {
    "hv-hv-bias": (("hv", "hv"), True),
    "vh-hv-no-bias": (("vh", "hv"), False),
    "hv-vh-no-bias": (("hv", "vh"), False),
    "vh-vh-bias": (("vh", "vh"), True),
}


@pytest.mark.parametrize("layouts, bias", LAYOUTS_AND_BIAS.values(), ids=LAYOUTS_AND_BIAS.keys())
def test_layouts_and_bias(layouts, bias):
    # 37 rows (ragged row block), V = 200 (ragged vocabulary tile), Hs = 40 ≠ Ht = 24 (ragged K).
    inputs = _inputs(37, 40, 24, 200, bias=bias, seed=1)
    out = _run(inputs, layouts, 2.0, SMALL)
    _check(out, inputs, 2.0, rtol=2e-6)
    assert out.tile_width == SMALL.block_v
    assert out.partials.max_s.shape == (4, 37)


@pytest.mark.parametrize("temperature", [0.05, 1.0, 100.0], ids=lambda t: f"T={t}")
@pytest.mark.parametrize("scale", [1.0, 30.0], ids=lambda s: f"scale={s}")
def test_temperatures_and_logit_scales(temperature, scale):
    inputs = _inputs(20, 32, 48, 130, scale=scale, seed=2)
    out = _run(inputs, ("hv", "hv"), temperature, SMALL)
    _check(out, inputs, temperature, rtol=2e-6)
    assert all(bool(jnp.all(jnp.isfinite(x))) for x in out.partials)


@pytest.mark.parametrize("vocab", [16, 63, 64, 65, 1000], ids=lambda v: f"V={v}")
def test_vocabulary_tails(vocab):
    inputs = _inputs(16, 16, 32, vocab, seed=vocab)
    out = _run(inputs, ("hv", "hv"), 1.0, SMALL)
    _check(out, inputs, 1.0, rtol=2e-6)


def test_bfloat16_operands_accumulate_in_float32():
    inputs = _inputs(33, 64, 32, 300, dtype=jnp.bfloat16, seed=3)
    out = _run(inputs, ("hv", "vh"), 1.5, default_logits_kernel_config(33, 300, (64, 32)))
    _check(out, inputs, 1.5, rtol=2e-6)  # products of bf16 values are exact in float32


def test_bfloat16_storage_is_relative_to_the_tile_maximum():
    inputs = _inputs(16, 32, 32, 256, seed=4)
    f32 = _run(inputs, ("hv", "hv"), 1.0, SMALL)
    bf16 = _run(inputs, ("hv", "hv"), 1.0, SMALL, logits_dtype=jnp.bfloat16)
    assert bf16.student.dtype == jnp.bfloat16
    # Every stored value is ≤ 0 and its maximum over each tile is exactly 0.
    assert float(jnp.max(bf16.student)) == 0.0
    tiles = bf16.student.astype(jnp.float32).reshape(16, -1, SMALL.block_v)
    assert bool(jnp.all(jnp.max(tiles, axis=-1) == 0.0))
    np.testing.assert_allclose(bf16.student.astype(jnp.float32), f32.student, rtol=2**-8, atol=0)
    for name in ("max_s", "sum_q", "sum_u", "max_t", "sum_p"):  # from the float32 accumulators
        np.testing.assert_array_equal(getattr(bf16.partials, name), getattr(f32.partials, name), err_msg=name)


def test_negative_infinite_bias_columns_contribute_nothing():
    xs, ws, bs, xt, wt, bt = _inputs(16, 16, 16, 128, seed=5)
    masked = jnp.arange(128) >= 100  # padded vocabulary: the last 28 columns, a whole tile among them
    out = logits_and_partials_pallas(
        xs, ws, jnp.where(masked, -jnp.inf, bs), xt, wt, jnp.where(masked, -jnp.inf, bt), jnp.float32(0.5), config=SMALL
    )
    kept = logits_and_partials_pallas(
        xs, ws[:, :100], bs[:100], xt, wt[:, :100], bt[:100], jnp.float32(0.5), config=SMALL
    )
    for name in ("sum_q", "sum_u", "sum_p", "kl_fwd", "kl_rev"):
        got, want = getattr(out.partials, name), getattr(kept.partials, name)
        assert bool(jnp.all(jnp.isfinite(got))), name
        np.testing.assert_allclose(got[:1], want[:1], rtol=1e-6, err_msg=name)  # tile 0: columns 0..63
    assert bool(jnp.all(jnp.isneginf(out.partials.max_s[1:2][:, :]) | (out.partials.max_s[1] > -jnp.inf)))
    # Combined, the masked call gives the row statistics of the truncated vocabulary.
    got = rowmath.combine_partials(out.partials, 2.0)
    want = rowmath.combine_partials(kept.partials, 2.0)
    for name, g, w in zip(rowmath.RowStats._fields, got, want, strict=True):
        np.testing.assert_allclose(g, w, rtol=2e-6, atol=1e-6, err_msg=name)


def test_partials_combine_to_the_row_statistics():
    inputs = _inputs(24, 32, 16, 500, scale=4.0, seed=6)
    out = _run(inputs, ("hv", "hv"), 0.7, SMALL)
    xs, ws, bs, xt, wt, bt = inputs
    z_s, z_t = xs @ ws + bs, xt @ wt + bt
    whole = rowmath.chunk_logits_xla(z_s, z_t, 1 / 0.7)
    got = rowmath.combine_partials(out.partials, 1 / 0.7)
    want = rowmath.combine_partials(whole.partials, 1 / 0.7)
    for name, g, w in zip(rowmath.RowStats._fields, got, want, strict=True):
        np.testing.assert_allclose(g, w, rtol=1e-5, atol=1e-5, err_msg=name)
    log_p = jax.nn.log_softmax(z_t / 0.7)
    log_q = jax.nn.log_softmax(z_s / 0.7)
    np.testing.assert_allclose(got.kl_fwd, jnp.sum(jnp.exp(log_p) * (log_p - log_q), -1), rtol=1e-4, atol=1e-6)
    np.testing.assert_allclose(got.kl_rev, jnp.sum(jnp.exp(log_q) * (log_q - log_p), -1), rtol=1e-4, atol=1e-6)


def test_temperature_is_a_runtime_value():
    inputs = _inputs(16, 16, 16, 100, seed=8)
    call = jax.jit(lambda t: _run(inputs, ("hv", "hv"), t, SMALL).partials.sum_q)
    a, b = call(jnp.float32(1.0)), call(jnp.float32(2.0))
    assert call._cache_size() == 1
    assert not np.allclose(a, b)


def test_zero_rows():
    inputs = _inputs(0, 16, 16, 100)
    out = _run(inputs, ("hv", "hv"), 1.0, SMALL)
    assert out.student.shape == (0, 100) and out.partials.sum_q.shape == (2, 0)


@pytest.mark.parametrize(
    "kwargs",
    [dict(block_rows=8), dict(block_v=100), dict(block_k=0), dict(num_warps=3), dict(num_stages=0), dict(block_v=True)],
    ids=lambda kw: next(iter(kw)),
)
def test_config_rejects(kwargs):
    with pytest.raises(ValueError, match=next(iter(kwargs))):
        LogitsKernelConfig(**kwargs)


def test_default_config_shrinks_to_small_problems():
    assert default_logits_kernel_config(1024, 128256, (2048, 4096)) == LogitsKernelConfig(128, 256, 64, 8, 3)
    assert default_logits_kernel_config(5, 100, (8, 40)) == LogitsKernelConfig(16, 128, 16, 8, 3)


def test_rejects_mismatched_shapes():
    xs, ws, bs, xt, wt, bt = _inputs(8, 16, 16, 100)
    with pytest.raises(ValueError, match="student"):
        logits_and_partials_pallas(xs, ws.T, bs, xt, wt, bt, jnp.float32(1.0))
    with pytest.raises(ValueError, match="bias"):
        logits_and_partials_pallas(xs, ws, bs[:50], xt, wt, bt, jnp.float32(1.0))


LOWERING_CASES = {
    "llama-bf16-hv": ((1024, 2048, 4096, 128256), jnp.bfloat16, ("hv", "hv")),
    "ragged-f32-vh": ((100, 40, 24, 1000), jnp.float32, ("vh", "hv")),
}


@pytest.mark.parametrize("case", LOWERING_CASES, ids=list(LOWERING_CASES))
def test_lowers_to_triton(case):
    """Lowering for a CUDA device catches Triton-only failures (power-of-2 shapes, unsupported ops)."""
    from jax.sharding import AbstractDevice, AbstractMesh, AxisType, use_abstract_mesh

    (rows, hs, ht, vocab), dtype, layouts = LOWERING_CASES[case]
    w_shape = lambda h, lay: (h, vocab) if lay == "hv" else (vocab, h)  # noqa: E731
    shapes = [
        jax.ShapeDtypeStruct((rows, hs), dtype),
        jax.ShapeDtypeStruct(w_shape(hs, layouts[0]), dtype),
        jax.ShapeDtypeStruct((vocab,), dtype),
        jax.ShapeDtypeStruct((rows, ht), dtype),
        jax.ShapeDtypeStruct(w_shape(ht, layouts[1]), dtype),
        jax.ShapeDtypeStruct((vocab,), dtype),
        jax.ShapeDtypeStruct((), jnp.float32),
    ]
    call = jax.jit(functools.partial(logits_and_partials_pallas, layouts=layouts, interpret=False))
    mesh = AbstractMesh((1,), ("x",), (AxisType.Explicit,), abstract_device=AbstractDevice("NVIDIA H200", 1, "cuda"))
    with use_abstract_mesh(mesh):
        text = call.trace(*shapes).lower().as_text()
    assert "__gpu$xla.gpu.triton" in text
