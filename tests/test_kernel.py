"""The Pallas row kernel in interpret mode (CPU) against ``jaxdistill.rowmath.distill_rows``.

Accuracy is measured against the contract function evaluated in float64. The budget of the
float32 kernel is 1e-5 relative (losses; plus one float32 ulp of the largest loss, for rows
whose loss is exactly 0) or 1e-5 of the largest entry (dlogits), plus twice the error of the
plain float32 evaluation of the same contract function: the rounding of the scaled float32
logits themselves, which no float32 implementation avoids. bfloat16 dlogits
may additionally differ by the final rounding, half a bf16 ulp (≤ 2⁻⁸ relative).

Interpret mode checks the math only: each program sees a private, padded copy of its row, so
out-of-row loads and stores are caught by ``test_kernel_gpu.py`` (poisoned neighbours), and
Triton-only constraints (power-of-2 tiles, supported primitives) by the lowering tests here.
"""

from __future__ import annotations

import dataclasses
import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import AbstractDevice, AbstractMesh, AxisType, use_abstract_mesh

from jaxdistill import rowmath
from pallas_kernels import RowKernelConfig, default_row_kernel_config, distill_rows_pallas
from pallas_kernels import distill_rows as row_kernel
from pallas_kernels.distill_rows import _Tiling

EPS32 = float(np.finfo(np.float32).eps)
BF16_HALF_ULP = 2.0**-8  # bf16 keeps 8 significant bits: rounding moves a value by ≤ 2⁻⁸ of itself
LOSS_RTOL = 1e-5
GRAD_SCALED_ATOL = 1e-5
IGNORE = -100
ROWS = 5
MISC_SHAPE = (4, 1000)  # shared by the smaller tests so that they reuse one compiled kernel

# (β, T): T ≠ 1 everywhere, both below and above 1.
HYPERS = {"fwdKL-T1.7": (0.0, 1.7), "jsd0.3-T0.6": (0.3, 0.6), "jsd0.5-T1.7": (0.5, 1.7), "revKL-T0.6": (1.0, 0.6)}
DTYPES = {"f32": jnp.float32, "bf16": jnp.bfloat16}
# Row geometries: V < tile (one masked tile), V = k·tile (no tail), k·tile + 1 (shifted 1-lane
# tail window after several online rescales), and a large prime-ish V with the default tiling.
VOCABS = {
    "V123-one-masked-tile": (123, None),
    "V2048-no-tail": (2048, RowKernelConfig(block_v=512, num_warps=4, num_stages=1)),
    "V4097-tail1": (4097, RowKernelConfig(block_v=1024, num_warps=4, num_stages=1)),
    "V32003-default": (32003, None),
}


def make_rows(rows, vocab, *, scale=1.0, seed=0):
    """Correlated student/teacher logits of std ≈ ``scale`` with per-row offsets, and labels.

    Row 1 is ignored; row 0 has the last class as its label, row 2 the first.
    """
    k = jax.random.split(jax.random.key(seed), 5)
    offsets_s = 3.0 * scale * jax.random.normal(k[0], (rows, 1))
    offsets_t = 3.0 * scale * jax.random.normal(k[1], (rows, 1))
    student = scale * jax.random.normal(k[2], (rows, vocab)) + offsets_s
    teacher = 0.6 * (student - offsets_s) + 0.8 * scale * jax.random.normal(k[3], (rows, vocab)) + offsets_t
    labels = jax.random.randint(k[4], (rows,), 0, vocab).at[0].set(vocab - 1)
    labels = labels.at[1].set(IGNORE)
    if rows > 2:
        labels = labels.at[2].set(0)
    return student, teacher, labels


def hyper_array(beta, temperature, soft_weight=0.8, hard_weight=0.3):
    return jnp.array([beta, temperature, soft_weight, hard_weight], jnp.float32)


_contract_f64 = jax.jit(functools.partial(rowmath.distill_rows, dlogits_dtype=jnp.float64))


def oracle64(student, teacher, labels, hyper):
    """The contract function in float64, as numpy arrays."""
    with jax.enable_x64(True):
        return tuple(np.asarray(x) for x in _contract_f64(*_as_f64(student, teacher, labels, hyper)))


def _as_f64(student, teacher, labels, hyper):
    return student.astype(jnp.float64), teacher.astype(jnp.float64), labels, hyper.astype(jnp.float64)


@functools.partial(jax.jit, static_argnames="dlogits_dtype")
def plain_f32(student, teacher, labels, hyper, *, dlogits_dtype=jnp.float32):
    """The contract function in float32 (XLA): its error is the float32 floor of the inputs."""
    return rowmath.distill_rows(student, teacher, labels, hyper, dlogits_dtype=dlogits_dtype)


def assert_matches_contract(got, student, teacher, labels, hyper, *, rows_per_call=None):
    """Kernel outputs vs the float64 contract, within the float32 budget (module docstring).

    The oracle runs ``rows_per_call`` rows at a time and the (R, V) comparison stays on the
    device, so that real vocabularies with thousands of rows check quickly; the dlogits budget
    is per block of rows.
    """
    soft, hard, dlogits = got
    assert soft.dtype == hard.dtype == jnp.float32
    plain = plain_f32(student, teacher, labels, hyper)
    rtol = BF16_HALF_ULP if dlogits.dtype == jnp.bfloat16 else 0.0
    step = rows_per_call or student.shape[0]
    want_losses = []
    with jax.enable_x64(True):
        for r in range(0, student.shape[0], step):
            sl = slice(r, r + step)
            w_soft, w_hard, w = _contract_f64(*_as_f64(student[sl], teacher[sl], labels[sl], hyper))
            want_losses.append((np.asarray(w_soft), np.asarray(w_hard)))
            atol = GRAD_SCALED_ATOL * jnp.max(jnp.abs(w)) + 2 * jnp.max(jnp.abs(plain[2][sl] - w))
            _assert_close_on_device(dlogits[sl].astype(jnp.float64), w, labels[sl] >= 0, rtol, atol, r)
    valid = np.asarray(labels) >= 0
    for name, g, w, p in zip(("soft", "hard"), (soft, hard), zip(*want_losses, strict=True), plain[:2], strict=True):
        g, w, p = np.asarray(g, np.float64), np.concatenate(w), np.asarray(p, np.float64)
        assert np.isfinite(g).all(), name
        np.testing.assert_array_equal(g[~valid], 0.0, err_msg=f"{name}: ignored rows")
        atol = 2 * np.max(np.abs(p - w)) + EPS32 * np.max(np.abs(w))  # rows with a zero loss
        np.testing.assert_allclose(g, w, rtol=LOSS_RTOL, atol=atol, err_msg=name)


def _assert_close_on_device(got, want, valid, rtol, atol, first_row):
    """|got − want| ≤ rtol·|want| + atol everywhere, finite, and exactly 0 in ignored rows."""
    assert bool(jnp.all(jnp.isfinite(got))), f"dlogits: non-finite values in rows {first_row}+"
    assert not bool(jnp.any(jnp.where(valid[:, None], 0.0, got))), f"dlogits: ignored rows {first_row}+ not 0"
    atol = jnp.broadcast_to(atol, got.shape)
    excess = jnp.abs(got - want) - (rtol * jnp.abs(want) + atol)
    row, col = np.unravel_index(int(jnp.argmax(excess)), excess.shape)
    assert excess[row, col] <= 0, (
        f"dlogits[{first_row + row}, {col}] = {float(got[row, col])!r}, want {float(want[row, col])!r} "
        f"(rtol {rtol}, atol {float(atol[row, col]):.3g}, max |want| {float(jnp.max(jnp.abs(want))):.3g})"
    )


# float32 dlogits on every row geometry; bf16 ones (the same sweeps, another store in the
# epilogue, each geometry a compile of its own) on the 1-lane tail and the default tiling.
GEOMETRY_DTYPES = {
    f"{name}-{dtype}": (*VOCABS[name], DTYPES[dtype])
    for name in VOCABS
    for dtype in DTYPES
    if dtype == "f32" or name in ("V4097-tail1", "V32003-default")
}


@pytest.mark.parametrize("vocab, config, dtype", GEOMETRY_DTYPES.values(), ids=GEOMETRY_DTYPES.keys())
@pytest.mark.parametrize("beta, temperature", HYPERS.values(), ids=HYPERS.keys())
@pytest.mark.parametrize("scale", [1.0, 30.0], ids=["scale1", "scale30"])
def test_matches_contract(beta, temperature, vocab, config, dtype, scale):
    student, teacher, labels = make_rows(ROWS, vocab, scale=scale)
    hyper = hyper_array(beta, temperature)
    got = distill_rows_pallas(student, teacher, labels, hyper, dlogits_dtype=dtype, config=config)
    assert got[2].dtype == dtype and got[2].shape == student.shape
    assert_matches_contract(got, student, teacher, labels, hyper)


@pytest.mark.parametrize("reverse", [False, True], ids=["forward", "reverse"])
@pytest.mark.parametrize(("vocab", "block_v"), [(1, 4), (3, 4), (4, 4), (10, 4), (123, 32), (4097, 4096), (8192, 4096)])
def test_sweep_visits_every_column_once_in_order(vocab, block_v, reverse):
    """Each pass sees every column of [0, V) exactly once, tiles in order (right to left when reversed)."""
    tiles = []

    def record(start, cols, mask, loaded, carry):
        cols = np.asarray(cols)
        tiles.append(cols if mask is None else cols[np.asarray(mask)])
        return carry

    with jax.disable_jit():  # concrete tile indices, so the body can record them
        _Tiling(vocab, block_v).sweep(record, (), reverse=reverse)
    order = tiles[::-1] if reverse else tiles
    np.testing.assert_array_equal(np.concatenate(order), np.arange(vocab))
    assert all(len(t) for t in tiles)


@pytest.mark.parametrize(
    "soft_weight, hard_weight", [(1.0, 0.0), (0.0, 1.0), (2.5, 0.7)], ids=["soft-only", "hard-only", "both"]
)
@pytest.mark.parametrize("beta", [0.0, 0.5, 1.0], ids=["fwdKL", "jsd0.5", "revKL"])
def test_loss_weights(beta, soft_weight, hard_weight):
    student, teacher, labels = make_rows(*MISC_SHAPE, scale=2.0, seed=1)
    hyper = hyper_array(beta, 2.0, soft_weight, hard_weight)
    got = distill_rows_pallas(student, teacher, labels, hyper, dlogits_dtype=jnp.float32)
    assert_matches_contract(got, student, teacher, labels, hyper)


@pytest.mark.parametrize("beta", [0.0, 0.5, 1.0], ids=["fwdKL", "jsd0.5", "revKL"])
@pytest.mark.parametrize("scale", [1000.0, 3000.0], ids=["scale1e3", "scale3e3-logits2e4"])
def test_extreme_logits_stay_finite(beta, scale):
    """|z| up to ~2e4 with T = 0.05 (|z/T| ~ 5e5): finite, and as accurate as float32 allows,
    with no extra budget for reverse KL (its row sum is taken about a pivot, so the entry where a
    one-hot student has Q ≈ 1 no longer subtracts two numbers of the size of KL ≈ 1e4..1e5)."""
    student, teacher, labels = make_rows(ROWS, 4097, scale=scale, seed=2)
    hyper = hyper_array(beta, 0.05)
    config = RowKernelConfig(block_v=1024, num_warps=4, num_stages=1)
    got = distill_rows_pallas(student, teacher, labels, hyper, dlogits_dtype=jnp.float32, config=config)
    for x in got:
        assert np.isfinite(np.asarray(x)).all()
    assert_matches_contract(got, student, teacher, labels, hyper)


def test_label_past_the_vocabulary_gives_nan_hard_loss():
    """A label ≥ V is flagged (NaN CE, as in the jnp contract), never read, and leaves other rows alone."""
    student, teacher, labels = make_rows(*MISC_SHAPE, scale=2.0, seed=3)
    vocab = MISC_SHAPE[1]
    hyper = hyper_array(0.5, 1.0)
    bad = labels.at[2].set(vocab)
    soft, hard, _ = distill_rows_pallas(student, teacher, bad, hyper, dlogits_dtype=jnp.float32)
    want_soft, want_hard, _ = distill_rows_pallas(student, teacher, labels, hyper, dlogits_dtype=jnp.float32)
    assert np.isnan(float(hard[2])) and np.isnan(
        float(rowmath.distill_rows(student, teacher, bad, hyper, dlogits_dtype=jnp.float32)[1][2])
    )
    others = np.arange(MISC_SHAPE[0]) != 2
    np.testing.assert_array_equal(np.asarray(hard)[others], np.asarray(want_hard)[others])
    np.testing.assert_array_equal(np.asarray(soft), np.asarray(want_soft))


def test_underflowing_probabilities():
    """Disjoint one-hot student and teacher at T = 0.05: P, Q and M underflow (0·log 0 = 0)."""
    student = jnp.full(MISC_SHAPE, -50.0).at[:, 7].set(50.0)
    teacher = jnp.full(MISC_SHAPE, -50.0).at[:, 200].set(50.0).at[3, 999].set(50.0)
    labels = jnp.array([7, 200, IGNORE, 999], jnp.int32)
    for beta in (0.0, 0.3, 1.0):
        hyper = hyper_array(beta, 0.05)
        got = distill_rows_pallas(student, teacher, labels, hyper, dlogits_dtype=jnp.float32)
        assert_matches_contract(got, student, teacher, labels, hyper)


def test_all_rows_ignored_gives_zeros():
    student, teacher, _ = make_rows(*MISC_SHAPE)
    labels = jnp.full(MISC_SHAPE[:1], IGNORE, jnp.int32)
    for dtype in DTYPES.values():
        soft, hard, dlogits = distill_rows_pallas(student, teacher, labels, hyper_array(0.5, 2.0), dlogits_dtype=dtype)
        assert not np.any(np.asarray(soft)) and not np.any(np.asarray(hard))
        assert not np.any(np.asarray(dlogits.astype(jnp.float32)))


def test_hyper_parameters_do_not_recompile():
    student, teacher, labels = make_rows(*MISC_SHAPE, seed=3)
    distill_rows_pallas(student, teacher, labels, hyper_array(0.0, 1.0), dlogits_dtype=jnp.bfloat16)
    compiled = distill_rows_pallas._cache_size()
    for beta, temperature in HYPERS.values():
        distill_rows_pallas(
            student, teacher, labels, hyper_array(beta, temperature, 0.1, 3.0), dlogits_dtype=jnp.bfloat16
        )
    assert distill_rows_pallas._cache_size() == compiled


def test_in_place_float32_dlogits_leave_the_input_intact():
    """f32 dlogits alias the student logits; without donation XLA must keep the caller's array."""
    student, teacher, labels = make_rows(*MISC_SHAPE, seed=4)
    before = np.asarray(student).copy()
    _, _, dlogits = distill_rows_pallas(student, teacher, labels, hyper_array(0.5, 1.5), dlogits_dtype=jnp.float32)
    np.testing.assert_array_equal(np.asarray(student), before)
    assert not np.array_equal(np.asarray(dlogits), before)


def test_inside_jit_and_scan():
    """The launcher composes with jit and lax.scan (the chunked driver's usage)."""
    student, teacher, labels = make_rows(2 * MISC_SHAPE[0], MISC_SHAPE[1], seed=5)
    hyper = hyper_array(0.3, 1.3)

    @jax.jit
    def chunked(s, t, y):
        def body(carry, xs):
            soft, hard, g = distill_rows_pallas(*xs, hyper, dlogits_dtype=jnp.float32)
            return carry + jnp.sum(soft) + jnp.sum(hard), g

        return jax.lax.scan(body, 0.0, (s.reshape(2, *MISC_SHAPE), t.reshape(2, *MISC_SHAPE), y.reshape(2, -1)))

    total, dlogits = chunked(student, teacher, labels)
    soft, hard, want = oracle64(student, teacher, labels, hyper)
    np.testing.assert_allclose(float(total), soft.sum() + hard.sum(), rtol=LOSS_RTOL)
    np.testing.assert_allclose(np.asarray(dlogits).reshape(want.shape), want, atol=1e-6)


# --- lowering to Triton on the CPU (catches power-of-2 and unsupported-primitive errors) --------

ABSTRACT_GPU = AbstractMesh(
    (1,), ("x",), (AxisType.Explicit,), abstract_device=AbstractDevice("NVIDIA H100 80GB HBM3", 1, "cuda")
)
LOWERINGS = {
    "V123-bf16-default": (123, jnp.bfloat16, None),
    "V32003-f32-aliased-default": (32003, jnp.float32, None),
    "V128256-bf16-8192x16w3s": (128256, jnp.bfloat16, RowKernelConfig(block_v=8192, num_warps=16, num_stages=3)),
    "V4096-bf16-no-tail": (4096, jnp.bfloat16, RowKernelConfig(block_v=2048, num_warps=8, num_stages=2)),
}


@pytest.mark.parametrize("vocab, dtype, config", LOWERINGS.values(), ids=LOWERINGS.keys())
def test_lowers_to_triton(vocab, dtype, config):
    launch = jax.jit(functools.partial(distill_rows_pallas, dlogits_dtype=dtype, config=config, interpret=False))
    logits = jax.ShapeDtypeStruct((16, vocab), jnp.float32)
    with use_abstract_mesh(ABSTRACT_GPU):
        traced = launch.trace(
            logits, logits, jax.ShapeDtypeStruct((16,), jnp.int32), jax.ShapeDtypeStruct((4,), jnp.float32)
        )
        text = traced.lower().as_text()
    assert text.count("__gpu$xla.gpu.triton") == 1
    aliased = "output_operand_aliases" in text
    assert aliased == (dtype == jnp.float32)


# --- configuration and argument validation ------------------------------------------------------


@pytest.mark.parametrize(
    "field, kwargs",
    [
        ("block_v", dict(block_v=384, num_warps=4, num_stages=1)),
        ("block_v", dict(block_v=0, num_warps=4, num_stages=1)),
        ("block_v", dict(block_v=1 << 17, num_warps=4, num_stages=1)),
        ("block_v", dict(block_v=1024.0, num_warps=4, num_stages=1)),
        ("num_warps", dict(block_v=1024, num_warps=3, num_stages=1)),
        ("num_warps", dict(block_v=1024, num_warps=64, num_stages=1)),
        ("num_warps", dict(block_v=1024, num_warps=True, num_stages=1)),
        ("num_stages", dict(block_v=1024, num_warps=4, num_stages=0)),
    ],
    ids=["block-384", "block-0", "block-2^17", "block-float", "warps-3", "warps-64", "warps-bool", "stages-0"],
)
def test_config_rejects(field, kwargs):
    with pytest.raises(ValueError, match=field):
        RowKernelConfig(**kwargs)


def test_config_is_frozen_and_hashable():
    config = RowKernelConfig(block_v=4096, num_warps=8, num_stages=2)
    with pytest.raises(dataclasses.FrozenInstanceError):
        config.block_v = 2048
    assert hash(config) == hash(RowKernelConfig(block_v=4096, num_warps=8, num_stages=2))


@pytest.mark.parametrize(
    "vocab, want",
    [(1, (1, 1)), (123, (128, 1)), (4097, (4096, 8)), (128256, (4096, 8)), (262144, (4096, 8))],
    ids=["V1", "V123", "V4097", "V128256", "V262144"],
)
def test_default_config(vocab, want):
    config = default_row_kernel_config(vocab, jnp.bfloat16)
    assert (config.block_v, config.num_warps) == want
    assert config == default_row_kernel_config(vocab, jnp.float32, "NVIDIA H200")


@pytest.mark.parametrize("args", [(0, jnp.float32), (4096, jnp.int32), (True, jnp.float32)], ids=["V0", "int", "bool"])
def test_default_config_rejects(args):
    with pytest.raises(ValueError):
        default_row_kernel_config(*args)


def test_rejects_bad_arguments():
    student, teacher, labels = make_rows(3, 50)
    hyper = hyper_array(0.5, 1.0)
    call = functools.partial(distill_rows_pallas, dlogits_dtype=jnp.float32)
    with pytest.raises(ValueError, match="must both be"):
        call(student, teacher[:, :49], labels, hyper)
    with pytest.raises(ValueError, match="float32"):
        call(student.astype(jnp.bfloat16), teacher, labels, hyper)
    with pytest.raises(ValueError, match="labels"):
        call(student, teacher, labels.astype(jnp.float32), hyper)
    with pytest.raises(ValueError, match="hyper"):
        call(student, teacher, labels, hyper[:3])


def test_zero_rows():
    empty = jnp.zeros((0, 10), jnp.float32)
    soft, hard, dlogits = distill_rows_pallas(
        empty, empty, jnp.zeros((0,), jnp.int32), hyper_array(0.5, 1.0), dlogits_dtype=jnp.bfloat16
    )
    assert soft.shape == hard.shape == (0,) and dlogits.shape == (0, 10) and dlogits.dtype == jnp.bfloat16


# --- one compiled branch (a β known at trace time) -------------------------------------------


@pytest.mark.parametrize("beta", [0.0, 0.5, 1.0], ids=lambda b: f"beta={b}")
def test_one_compiled_branch_equals_the_runtime_choice(beta):
    """``branch=`` compiles one divergence program; its result is bit-identical to the kernel
    that holds all three and picks one from the hyper-parameters."""
    student, teacher, labels = make_rows(ROWS, 300)
    hyper = row_kernel.row_hyper(beta, 1.3, 0.8, 0.3)
    branch = int(hyper[5])
    assert branch == {0.0: row_kernel.FORWARD_KL, 0.5: row_kernel.MIXTURE_JSD, 1.0: row_kernel.REVERSE_KL}[beta]
    every = distill_rows_pallas(student, teacher, labels, hyper, dlogits_dtype=jnp.float32)
    one = distill_rows_pallas(student, teacher, labels, hyper, dlogits_dtype=jnp.float32, branch=branch)
    for got, want in zip(one, every, strict=True):
        np.testing.assert_array_equal(np.asarray(got), np.asarray(want))


def test_one_compiled_branch_gives_nan_rows_for_another_branch():
    """Hyper-parameters that select a branch other than the compiled one: NaN in every valid row
    (losses and dlogits), zeros in ignored rows; never another divergence's numbers."""
    student, teacher, labels = make_rows(ROWS, 300)
    hyper = row_kernel.row_hyper(0.5, 1.3, 0.8, 0.3)  # the mixture
    soft, hard, dlogits = distill_rows_pallas(
        student, teacher, labels, hyper, dlogits_dtype=jnp.float32, branch=row_kernel.FORWARD_KL
    )
    valid = np.asarray(labels) >= 0
    assert not valid.all() and valid.any()
    for rows in (np.asarray(soft), np.asarray(hard), np.asarray(dlogits)):
        assert np.isnan(rows[valid]).all()
        assert (rows[~valid] == 0).all()


def test_unknown_branch_is_a_clear_error():
    student, teacher, labels = make_rows(ROWS, 300)
    with pytest.raises(ValueError, match="branch must be None, FORWARD_KL, MIXTURE_JSD or REVERSE_KL"):
        distill_rows_pallas(student, teacher, labels, hyper_array(0.5, 1.0), dlogits_dtype=jnp.float32, branch=3)
