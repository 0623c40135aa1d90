"""The Pallas row kernel compiled through Triton on a GPU: real vocabularies, row isolation.

Skipped where there is no GPU (``tests/conftest.py``). On a GPU, ``test_kernel.py`` also runs
the real kernel (``interpret=None`` picks it), over the small geometries (V < tile, no tail,
k·tile + 1); this file adds real sizes and what interpret mode cannot see: loads and stores
outside a row, which on Triton become raw pointer arithmetic into the neighbouring rows, and the
Pallas path inside ``shard_map(check_vma=True)`` (interpret mode cannot run there on JAX 0.10.2).
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import Mesh
from jax.sharding import PartitionSpec as P
from test_kernel import (
    HYPERS,
    IGNORE,
    assert_matches_contract,
    hyper_array,
    make_rows,
)

from jaxdistill import fused_linear_jsd_loss
from pallas_kernels import RowKernelConfig, distill_rows_pallas

pytestmark = pytest.mark.gpu

ORACLE_ROWS_PER_CALL = 128  # bounds the float64 oracle's temporaries at V = 262144
# (V, rows, dlogits dtype): the real vocabularies with bf16 dlogits, one also in place (f32).
REAL_CASES = {
    "V128256-llama3-bf16": (128256, 2048, jnp.bfloat16),
    "V128256-llama3-f32-in-place": (128256, 2048, jnp.float32),
    "V151936-qwen2-bf16": (151936, 2048, jnp.bfloat16),
    "V262144-gemma3-bf16": (262144, 1024, jnp.bfloat16),
}


def ignore_some(labels, fraction, seed):
    drop = jax.random.uniform(jax.random.key(seed), labels.shape) < fraction
    return jnp.where(drop, IGNORE, labels)


@pytest.mark.parametrize("vocab, rows, dtype", REAL_CASES.values(), ids=REAL_CASES.keys())
@pytest.mark.parametrize("beta, temperature", HYPERS.values(), ids=HYPERS.keys())
def test_real_vocabularies(beta, temperature, vocab, rows, dtype):
    student, teacher, labels = make_rows(rows, vocab, scale=2.0, seed=vocab)
    labels = ignore_some(labels, 0.1, seed=rows)
    hyper = hyper_array(beta, temperature)
    got = distill_rows_pallas(student, teacher, labels, hyper, dlogits_dtype=dtype)
    assert_matches_contract(got, student, teacher, labels, hyper, rows_per_call=ORACLE_ROWS_PER_CALL)


@pytest.mark.parametrize("beta", [0.0, 0.5, 1.0], ids=["fwdKL", "jsd0.5", "revKL"])
@pytest.mark.parametrize("scale", [1000.0, 3000.0], ids=["scale1e3", "scale3e3-logits2e4"])
def test_extreme_logits_real_vocabulary(beta, scale):
    """|z| up to ~2e4 at T = 0.05 stays finite and within the float32 budget (as in test_kernel)."""
    student, teacher, labels = make_rows(256, 128256, scale=scale, seed=7)
    hyper = hyper_array(beta, 0.05)
    got = distill_rows_pallas(student, teacher, labels, hyper, dlogits_dtype=jnp.bfloat16)
    for x in got:
        assert np.isfinite(np.asarray(x.astype(jnp.float32))).all()
    assert_matches_contract(got, student, teacher, labels, hyper, rows_per_call=ORACLE_ROWS_PER_CALL)


# --- row isolation -----------------------------------------------------------------------------

ISOLATION = {
    "V123-one-masked-tile": (123, None),
    "V4097-tail1": (4097, RowKernelConfig(block_v=1024, num_warps=4, num_stages=1)),
    "V32003-default": (32003, None),
    "V128263-8192x16w": (128263, RowKernelConfig(block_v=8192, num_warps=16, num_stages=2)),
}
POISONS = (np.nan, 3e38, -3e38, 1e30)


def poison(x, rows):
    """Fill ``rows`` of x with NaN / ±huge values (one poison per row, cycling)."""
    fill = jnp.asarray([POISONS[i % len(POISONS)] for i in range(len(rows))], jnp.float32)[:, None]
    return x.at[rows].set(jnp.broadcast_to(fill, (len(rows), x.shape[1])))


def launcher(hyper, dtype, config):
    """``(student, teacher, labels) -> outputs``; float32 dlogits really overwrite the donated student."""
    launch = functools.partial(distill_rows_pallas, hyper=hyper, dlogits_dtype=dtype, config=config)
    return jax.jit(launch, donate_argnums=(0,) if dtype == jnp.float32 else ())


@pytest.mark.parametrize("dtype", [jnp.bfloat16, jnp.float32], ids=["bf16", "f32-in-place"])
@pytest.mark.parametrize("vocab, config", ISOLATION.values(), ids=ISOLATION.keys())
@pytest.mark.parametrize("beta", [0.0, 0.5, 1.0], ids=["fwdKL", "jsd0.5", "revKL"])
def test_rows_are_isolated(beta, vocab, config, dtype):
    """Poisoned neighbours change nothing in a clean row, and no row writes into another.

    Rows 3k stay clean; rows 3k+1 are poisoned (NaN, ±3e38, 1e30) with valid labels, so their
    programs read and write garbage; rows 3k+2 are poisoned *and ignored*, so their programs
    write zeros without reading. A load past a row's end would change the clean row next to
    it; a store past a row's end would put non-zero values into the ignored row after it (or
    be overwritten by it: many rows make that race lose somewhere). Clean rows must equal,
    bit for bit, the same rows computed among clean neighbours, and the rows computed alone up to
    float32 rounding (a one-row launch is a separate compile).
    """
    rows = 3 * 128
    student, teacher, labels = make_rows(rows, vocab, scale=3.0, seed=11)
    labels = labels.at[1].set(5)  # make_rows ignores row 1; here every 3k+1 row is valid
    hyper = hyper_array(beta, 0.8)
    run = launcher(hyper, dtype, config)
    clean, dirty, ignored = np.arange(0, rows, 3), np.arange(1, rows, 3), np.arange(2, rows, 3)

    reference = run(student.copy(), teacher, labels)
    labels_poisoned = labels.at[ignored].set(IGNORE)
    s_poisoned = poison(poison(student, dirty), ignored)
    t_poisoned = poison(poison(teacher, dirty[::-1]), ignored)
    got = run(s_poisoned, t_poisoned, labels_poisoned)

    for name, g, r in zip(("soft", "hard", "dlogits"), got, reference, strict=True):
        g, r = np.asarray(g.astype(jnp.float32)), np.asarray(r.astype(jnp.float32))
        np.testing.assert_array_equal(g[clean], r[clean], err_msg=f"{name}: clean rows next to poison")
        np.testing.assert_array_equal(g[ignored], 0.0, err_msg=f"{name}: ignored rows received stores")
    for i in (0, rows // 2 - rows // 2 % 3, clean[-1]):
        alone = run(student[i : i + 1].copy(), teacher[i : i + 1], labels[i : i + 1])
        for name, a, r in zip(("soft", "hard", "dlogits"), alone, reference, strict=True):
            a, r = np.asarray(a.astype(jnp.float32)), np.asarray(r.astype(jnp.float32))
            # A one-row launch is another compile: allow a rounding-level difference (float32
            # math, then one ulp of the output dtype: a bf16 dlogit may round the other way).
            rtol = 2.0**-7 if name == "dlogits" and dtype == jnp.bfloat16 else 1e-6
            np.testing.assert_allclose(a[0], r[i], rtol=rtol, atol=1e-7, err_msg=f"{name}: row {i} alone")


# --- shard_map with check_vma=True (the compiled kernel; interpret mode cannot run there) ------------


def test_pallas_loss_inside_shard_map_with_check_vma_equals_unsharded():
    """The whole Pallas path inside ``jax.shard_map`` with the default check_vma=True over every
    local GPU (tokens sharded, heads replicated): loss and gradients equal the unsharded call's."""
    devices = jax.devices()
    n, hs, ht, vocab = 16 * len(devices), 64, 96, 4099
    k = jax.random.split(jax.random.key(0), 5)
    xs, xt = jax.random.normal(k[0], (n, hs)), jax.random.normal(k[1], (n, ht))
    ws, wt = jax.random.normal(k[2], (hs, vocab)) / 8, jax.random.normal(k[3], (ht, vocab)) / 10
    labels = jax.random.randint(k[4], (n,), 0, vocab).at[::5].set(IGNORE)
    options = dict(beta=0.3, temperature=2.0, hard_weight=0.5, chunk_size=8, implementation="pallas")

    def loss(xs, ws, xt, labels, axis_name=None):
        return fused_linear_jsd_loss(xs, ws, xt, wt, labels, axis_name=axis_name, **options)

    mesh = Mesh(np.array(devices), ("data",))
    mapped = jax.shard_map(
        lambda *a: jax.lax.psum(loss(*a, axis_name="data"), "data"),
        mesh=mesh,
        in_specs=(P("data"), P(), P("data"), P("data")),
        out_specs=P(),
    )
    got_loss, got = jax.jit(jax.value_and_grad(mapped, argnums=(0, 1)))(xs, ws, xt, labels)
    want_loss, want = jax.jit(jax.value_and_grad(loss, argnums=(0, 1)))(xs, ws, xt, labels)
    np.testing.assert_allclose(float(got_loss), float(want_loss), rtol=1e-6)
    for g, w in zip(got, want, strict=True):
        np.testing.assert_allclose(np.asarray(g), np.asarray(w), rtol=1e-5, atol=1e-5 * float(jnp.max(jnp.abs(w))))
