"""Float32 ``expm1`` and ``log1p`` from ``exp2``, integer bit operations and multiply-adds.

Why: inside a Pallas-Triton kernel ``jnp.log``, ``log1p``, ``expm1`` and ``exp`` lower to
libdevice calls that cost far more than ``exp2``, which maps onto the GPU's exponential unit.
Measured on the H200 (jax 0.11.2), 8 chained applications per element of a (1024, 131072)
float32 array in one Pallas kernel: multiply-add 0.46 ms, ``exp2`` 0.61 ms, ``exp`` 1.92 ms,
division 1.92 ms, ``expm1`` 4.29 ms, ``log1p`` 4.90 ms, ``log`` 4.94 ms
(``bench/results/2026-12-02-h200-fastmath/NOTES.md``). The mixture divergence needs an expm1 and two
log1p per vocabulary column; with these forms the kernel pays multiply-adds instead.

Accuracy (float32, against float64; ``tests/test_fastmath.py``):

* :func:`expm1`: x + x²·P(x) with a degree-5 P on |x| ≤ 1/2 (truncation < 1e-8 relative),
  and e^x − 1 beyond (e^x from ``exp2``, given by the caller), where |e^x − 1| ≥ 0.39·e^x keeps the
  rounding of e^x within a few ulp of the result.
* :func:`log1p`: u = 1 + x is split as 2^k·m with m ∈ [√½, √2) (exponent bits, as in musl's
  ``logf``); log u = k·ln 2 + log1p(f) with f = x itself when k = 0 (no rounding of 1 + x) and
  f = m − 1 (exact) otherwise, and log1p(f) = f + f²·S(f) with a degree-8 S (truncation
  < 1e-8 relative). A caller that has 1 + x in a form without cancellation (e.g. 1 − β + β·e^d
  where x = β·(e^d − 1) is near −1) passes it as ``one_plus_x``; it is used where x < −1/2.

Both are exact-derivative ``custom_jvp`` functions (d expm1 = e^x, d log1p = 1/(1 + x)), so
the XLA path's second derivatives through them are those of the true functions. Domain:
finite x, and a normal (or zero, or +inf) float32 1 + x; NaN propagates. Other dtypes (float64
evaluations of the same formulas in tests) use ``jnp.expm1`` and ``jnp.log1p``.
"""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp
from jax import lax

_LOG2E = math.log2(math.e)
_LN2 = math.log(2.0)

# expm1(x) = x + x²·Σ c_i x^i on |x| ≤ _EXPM1_RADIUS (weighted least-squares fit, max relative
# error 2.4e-8 of expm1(x) − x, so < 1e-8 of expm1(x)).
_EXPM1_RADIUS = 0.5
_EXPM1_COEFFICIENTS = (
    0.5000000000391224,
    0.16666667135218524,
    0.041666664309478144,
    0.008333182756880162,
    0.00138890402416018,
    0.00019961956733479495,
)
# log1p(f) = f + f²·Σ c_i f^i on f ∈ [√½ − 1, √2 − 1] (max relative error 4.7e-8 of
# log1p(f) − f, so < 1e-8 of log1p(f)).
_LOG1P_COEFFICIENTS = (
    -0.4999999764443749,
    0.3333332536690948,
    -0.25000778721145406,
    0.20001635212879082,
    -0.16627091751786352,
    0.14196168359708453,
    -0.13114077349117856,
    0.12777194055649915,
    -0.0777775624580823,
)
# Float32 bit patterns: 1.0, and √½ (the mantissa range [√½, √2) starts there).
_ONE_BITS = 0x3F800000
_SQRT_HALF_BITS = 0x3F3504F3
_MANTISSA_MASK = 0x007FFFFF


def _horner(coefficients, x):
    acc = jnp.float32(coefficients[-1])
    for c in coefficients[-2::-1]:
        acc = jnp.float32(c) + x * acc
    return acc


@jax.custom_jvp
def expm1(x, exp_x):
    """e^x − 1 of float32 x, accurate to a few ulp (see the module doc).

    ``exp_x``: e^x, e.g. ``jnp.exp2(x * log2(e))``, computed by the caller (who often needs it
    anyway); used where |x| > 1/2.
    """
    if jnp.result_type(x) != jnp.float32:  # e.g. float64 evaluations of the same formulas
        return jnp.expm1(x)
    near = jnp.abs(x) <= _EXPM1_RADIUS
    xs = jnp.where(near, x, 0.0)
    series = xs + (xs * xs) * _horner(_EXPM1_COEFFICIENTS, xs)
    return jnp.where(near, series, exp_x - 1.0)


@expm1.defjvp
def _expm1_jvp(primals, tangents):
    (x, exp_x), (dx, _) = primals, tangents  # exp_x is a function of x: its tangent is in dx
    y = expm1(x, exp_x)
    return y, (y + 1.0) * dx


def _log_normal(u, x):
    """log u for float32 u > 0 (normal, finite), with x = u − 1 exact where u ∈ [√½, √2)."""
    bits = lax.bitcast_convert_type(u, jnp.int32) + (_ONE_BITS - _SQRT_HALF_BITS)
    k = (bits >> 23) - 127  # u = 2^k·m, m ∈ [√½, √2)
    m = lax.bitcast_convert_type((bits & _MANTISSA_MASK) + _SQRT_HALF_BITS, jnp.float32)
    f = jnp.where(k == 0, x, m - 1.0)  # m − 1 is exact (Sterbenz); x avoids rounding 1 + x
    log1p_f = f + (f * f) * _horner(_LOG1P_COEFFICIENTS, f)
    return k.astype(jnp.float32) * _LN2 + log1p_f


@jax.custom_jvp
def log1p(x, one_plus_x):
    """log(1 + x) of float32 x > −1, accurate to a few ulp (see the module doc).

    ``one_plus_x``: the same 1 + x computed without cancellation, used where x < −1/2 (pass
    ``1.0 + x`` when there is none).
    """
    if jnp.result_type(x) != jnp.float32:  # e.g. float64 evaluations of the same formulas
        close = x < -0.5
        return jnp.where(close, jnp.log(jnp.where(close, one_plus_x, 1.0)), jnp.log1p(jnp.where(close, 0.0, x)))
    u = jnp.where(x < -0.5, one_plus_x, 1.0 + x)
    safe = jnp.where(u > 0.0, u, 1.0)
    safe = jnp.where(safe == jnp.inf, 1.0, safe)
    y = _log_normal(safe, jnp.where(safe == u, x, 0.0))
    y = jnp.where(u == jnp.inf, u, y)
    # (u·NaN, not a NaN constant: Triton's lowering cannot select between two scalar constants.)
    return jnp.where(u > 0.0, y, jnp.where(u == 0.0, -jnp.inf, u * jnp.nan))


@log1p.defjvp
def _log1p_jvp(primals, tangents):
    x, one_plus_x = primals
    dx, d_one_plus_x = tangents
    close = x < -0.5
    u = jnp.where(close, one_plus_x, 1.0 + x)
    return log1p(x, one_plus_x), jnp.where(close, d_one_plus_x, dx) / u
