"""``pallas_kernels.fastmath``: float32 expm1 and log1p from exp2 and multiply-adds.

Against float64 numpy on samples spread over each branch of the functions, in ulp of the
float32 result (values below the normal range are compared as 0: the CPU flushes them). The
bounds are those measured on the CPU plus a margin (module doc: "a few ulp"); jnp's own
expm1 / log1p on the same machine reach 5.4 / 2.5 ulp.
"""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from pallas_kernels import fastmath

LOG2E = math.log2(math.e)
EXPM1_ULP, LOG1P_ULP = 4.5, 3.0


def ulp_error(got, want) -> np.ndarray:
    """|got − want| in ulp of float32(want), want in float64; subnormal results count as 0."""
    got, want = np.asarray(got, np.float64), np.asarray(want, np.float64)
    tiny = np.abs(want) < np.finfo(np.float32).tiny
    got, want = np.where(tiny, 0.0, got), np.where(tiny, 0.0, want)
    spacing = np.spacing(np.abs(want).astype(np.float32)).astype(np.float64)
    return np.abs(got - want) / np.maximum(spacing, np.finfo(np.float32).smallest_subnormal)


def _expm1(x):
    return fastmath.expm1(x, jnp.exp2(x * LOG2E))


@pytest.mark.parametrize(
    "lo, hi", [(-0.5, 0.5), (0.5, 3.0), (-3.0, -0.5), (3.0, 88.0), (-88.0, -3.0)], ids=lambda v: str(v)
)
def test_expm1_within_a_few_ulp(lo, hi):
    x = np.random.default_rng(0).uniform(lo, hi, 200_000).astype(np.float32)
    err = ulp_error(jax.jit(_expm1)(x), np.expm1(x.astype(np.float64)))
    assert err.max() <= EXPM1_ULP, (float(err.max()), float(x[err.argmax()]))


def test_expm1_keeps_tiny_arguments_and_limits():
    tiny = np.float32([1e-30, -1e-30, 1e-8, -1e-8, 0.0])
    np.testing.assert_array_equal(np.asarray(jax.jit(_expm1)(tiny)), tiny)  # e^x − 1 = x to float32
    x = jnp.float32([-jnp.inf, jnp.inf, -100.0])
    np.testing.assert_array_equal(np.asarray(fastmath.expm1(x, jnp.exp(x))), [-1.0, np.inf, -1.0])
    assert np.isnan(float(fastmath.expm1(jnp.float32(jnp.nan), jnp.float32(jnp.nan))))


@pytest.mark.parametrize(
    "name, x",
    [
        ("near 0", lambda r: r.uniform(-0.29, 0.41, 200_000)),
        ("wide positive", lambda r: 10 ** r.uniform(-38, 38, 200_000)),
        ("small negative", lambda r: -(10 ** r.uniform(-38, math.log10(0.5), 200_000))),
    ],
    ids=lambda v: v if isinstance(v, str) else "",
)
def test_log1p_within_a_few_ulp(name, x):
    x = x(np.random.default_rng(1)).astype(np.float32)
    got = jax.jit(lambda x: fastmath.log1p(x, 1.0 + x))(x)
    err = ulp_error(got, np.log1p(x.astype(np.float64)))
    assert err.max() <= LOG1P_ULP, (name, float(err.max()), float(x[err.argmax()]))


def test_log1p_takes_the_direct_argument_below_minus_half():
    """Where x < −1/2, 1 + x comes from ``one_plus_x`` (e.g. 1 − β + β·e^d): a value that 1 + x
    would round away (here 1e-30 next to −1) is kept."""
    x = np.random.default_rng(2).uniform(-1.0, -0.5, 100_000).astype(np.float32)
    direct = (1.0 + x.astype(np.float64)).astype(np.float32)  # exact 1 + x, rounded once
    err = ulp_error(jax.jit(fastmath.log1p)(x, direct), np.log(direct.astype(np.float64)))
    assert err.max() <= LOG1P_ULP, float(err.max())
    got = float(fastmath.log1p(jnp.float32(-1.0), jnp.float32(1e-30)))
    assert abs(got - math.log(1e-30)) <= 1e-6 * abs(math.log(1e-30))
    # Above −1/2 the direct argument is not read.
    assert float(fastmath.log1p(jnp.float32(0.25), jnp.float32(123.0))) == pytest.approx(math.log1p(0.25), rel=1e-7)


def test_log1p_special_values():
    x = jnp.float32([-1.0, jnp.inf, jnp.nan, -2.0, 0.0])
    got = np.asarray(fastmath.log1p(x, 1.0 + x))
    assert got[0] == -np.inf and got[1] == np.inf and np.isnan(got[2]) and np.isnan(got[3]) and got[4] == 0.0


def test_derivatives_are_those_of_the_true_functions():
    x = jnp.float32(0.3)
    assert float(jax.grad(_expm1)(x)) == pytest.approx(math.exp(0.3), rel=1e-6)
    assert float(jax.grad(lambda x: fastmath.log1p(x, 1.0 + x))(x)) == pytest.approx(1 / 1.3, rel=1e-6)
    second = jax.grad(jax.grad(lambda x: fastmath.log1p(x, 1.0 + x)))(x)
    assert float(second) == pytest.approx(-1 / 1.3**2, rel=1e-6)
    # Below −1/2 the derivative flows through the direct argument: d/dβ log(1 − β + β·e^d).
    d = -3.0

    def log_m_over_q(beta):
        return fastmath.log1p(beta * _expm1(jnp.float32(d)), 1.0 - beta + beta * jnp.exp(jnp.float32(d)))

    beta = jnp.float32(0.9)
    want = (math.exp(d) - 1) / (1 - 0.9 + 0.9 * math.exp(d))
    assert float(jax.grad(log_m_over_q)(beta)) == pytest.approx(want, rel=1e-5)


def test_float64_evaluations_use_the_library_functions():
    with jax.enable_x64(True):
        x = jnp.float64([-0.7, -1e-12, 0.2, 5.0])
        np.testing.assert_allclose(fastmath.expm1(x, jnp.exp(x)), np.expm1(np.asarray(x)), rtol=1e-15)
        np.testing.assert_allclose(fastmath.log1p(x, 1.0 + x), np.log1p(np.asarray(x)), rtol=1e-15)
