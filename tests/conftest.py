"""Shared test setup: the `gpu` marker skips where there is no GPU; float32 matmuls at full precision."""

import jax
import pytest

# JAX's default float32 matmul on GPU is TF32 (about 1e-3 relative): the accuracy tests hold
# float32 to ~1e-5 against a float64 oracle, so they ask for full float32 precision.
jax.config.update("jax_default_matmul_precision", "highest")


def pytest_collection_modifyitems(config, items):
    if jax.default_backend() == "gpu":
        return
    skip = pytest.mark.skip(reason="needs a CUDA GPU")
    for item in items:
        if item.get_closest_marker("gpu"):
            item.add_marker(skip)
