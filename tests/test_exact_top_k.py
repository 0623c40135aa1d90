"""The two-level exact top-k of teacher_topk equals lax.top_k: values, ids and the order of ties."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxdistill.topk import exact_top_k


def rows_with_ties_and_masks(vocab, seed):
    x = np.random.default_rng(seed).normal(size=(24, vocab)).astype(np.float32)
    x[:6] = np.round(x[:6])  # many equal values, across tiles
    x[6] = 0.0  # one value everywhere
    x[7] = -np.inf
    x[7, vocab // 2] = 1.0  # one finite entry
    x[8, 10:] = -np.inf  # fewer finite entries than some k
    x[9, ::3] = np.inf
    return jnp.asarray(x)


@pytest.mark.parametrize(
    ("vocab", "k", "tile"),
    [(1000, 5, 16), (1000, 64, 8), (5003, 7, 128), (300, 3, 7), (130, 64, 2), (4096, 1, 64)],
)
def test_exact_top_k_matches_lax_top_k(vocab, k, tile):
    x = rows_with_ties_and_masks(vocab, seed=vocab + k)
    values, ids = jax.jit(exact_top_k, static_argnums=(1, 2))(x, k, tile)
    expected_values, expected_ids = jax.lax.top_k(x, k)
    np.testing.assert_array_equal(np.asarray(values), np.asarray(expected_values))
    np.testing.assert_array_equal(np.asarray(ids), np.asarray(expected_ids))


def test_exact_top_k_with_no_more_tiles_than_k_is_lax_top_k():
    x = rows_with_ties_and_masks(100, seed=1)
    values, ids = exact_top_k(x, 20, tile=8)  # 13 tiles ≤ k
    np.testing.assert_array_equal(np.asarray(ids), np.asarray(jax.lax.top_k(x, 20)[1]))
    np.testing.assert_array_equal(np.asarray(values), np.asarray(jax.lax.top_k(x, 20)[0]))
