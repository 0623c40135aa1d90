"""bench.gradient_sparsity: the skippable-tile test on hand-built dlogits, and the measurement on small inputs."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from bench import gradient_sparsity as gs


def test_skippable_tiles_hand_built():
    # 4 rows × 12 columns in (2 × 4) tiles: 2 row blocks × 3 vocabulary blocks.
    d = np.zeros((4, 12), np.float32)
    d[0, 0] = 1.0  # row 0: its max in tile (0, 0)
    d[0, 5] = 0.5 * 2.0**-8  # below 2^-8 · 1: tile (0, 1) stays skippable for row 0
    d[1, 1] = -2.0  # row 1: |max| 2 in tile (0, 0)
    d[1, 9] = 2.0 * 2.0**-8  # exactly ε · max is not below it: tile (0, 2) not skippable
    d[2, 4] = 3.0  # row 2: tile (1, 1)
    d[2, 11] = -3.0 * 2.0**-6  # tile (1, 2): not skippable at 2^-8, skippable at 2^-4
    # row 3 is all zero (an ignored token): negligible everywhere
    tiles, row_tiles = gs.skippable_tiles(jnp.asarray(d), 2.0**-8, row_block=2, vocab_block=4)
    np.testing.assert_array_equal(np.asarray(tiles), [[False, True, False], [True, False, False]])
    np.testing.assert_array_equal(
        np.asarray(row_tiles),
        [[False, True, True], [False, True, False], [True, False, False], [True, True, True]],
    )
    tiles, _ = gs.skippable_tiles(jnp.asarray(d), 2.0**-4, row_block=2, vocab_block=4)
    np.testing.assert_array_equal(np.asarray(tiles), [[False, True, True], [True, False, True]])
    np.testing.assert_array_equal(np.asarray(gs.entries_above(jnp.asarray(d), 2.0**-8)), [1, 2, 2, 0])


def test_skippable_tiles_pads_rows_and_columns():
    d = jnp.zeros((3, 10)).at[:, 0].set(1.0)  # 3 rows (block 2), 10 columns (block 4)
    tiles, row_tiles = gs.skippable_tiles(d, 2.0**-8, row_block=2, vocab_block=4)
    assert tiles.shape == (2, 3) and row_tiles.shape == (3, 3)
    np.testing.assert_array_equal(np.asarray(tiles), [[False, True, True], [False, True, True]])


def test_measure_counts_tiles_of_library_dlogits():
    # Teacher and student put (almost) all their mass on the first 8 ids: with the soft term
    # alone (β = 0: Q − P, nonzero only there) every row's large entries lie in vocabulary
    # block 0, so all other blocks are skippable in tokenizer order.
    rows, vocab = 256, 1024
    key_s, key_t = jax.random.split(jax.random.key(0))
    far = jnp.full((rows, vocab), -1e4)
    student = far.at[:, :8].set(jax.random.normal(key_s, (rows, 8)))
    teacher = far.at[:, :8].set(jax.random.normal(key_t, (rows, 8)))
    labels = jnp.zeros((rows,), jnp.int32)
    settings = [dict(beta=0.0, weights="soft only", soft_weight=1.0, hard_weight=0.0, temperature=1.0)]
    found, summary = gs.measure([(student, teacher, labels)], settings, vocab, seed=0)
    assert summary["rows"] == rows and summary["tiles"] == 2 * 4
    by_key = {(r["order"], r["epsilon"]): r for r in found}
    for eps in gs.EPSILON_NAMES:
        assert by_key["tokenizer", eps]["skippable_tiles"] == pytest.approx(3 / 4)
        assert by_key["tokenizer", eps]["entries_above_median"] <= 8
    # a random relabelling scatters the 8 ids over the vocabulary blocks
    assert by_key["random", "2^-16"]["skippable_tiles"] < 3 / 4


def test_zipf_generator_shapes_and_calibration_fit(monkeypatch):
    monkeypatch.setattr(gs, "CLUSTER_GAMMAS", (0.0, 1.0, 4.0))  # a short grid: seconds, not minutes
    parameters = gs.generator_parameters(gs.DEFAULT_CALIBRATION, 512, "scaled")
    student, teacher, labels = gs.zipf_logits(jax.random.key(1), parameters, rows=128, vocab=512)
    assert student.shape == teacher.shape == (128, 512) and labels.shape == (128,)
    assert bool(jnp.all(jnp.isfinite(student))) and bool(jnp.all((labels >= 0) & (labels < 512)))
    np.testing.assert_allclose(np.asarray(jnp.sum(jnp.exp(teacher), axis=-1)), 1.0, rtol=1e-5)
    fit = gs.fit_calibration(student, teacher)
    assert fit["vocab"] == 512 and len(fit["alpha"]) == len(gs.QUANTILE_LEVELS)
    assert np.all(np.diff(fit["alpha"]) >= 0) and 0.5 < fit["alpha"][10] < 2.0
    assert fit["gamma"] in (0.0, 1.0, 4.0)
