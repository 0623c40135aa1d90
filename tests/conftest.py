"""Shared test setup: the `gpu` marker skips where there is no GPU; float32 matmuls at full precision;
CPU programs compiled without LLVM's optimizations."""

import importlib.util
import os

# The suite compiles hundreds of small programs and runs each a few times: on the CPU, LLVM's
# optimizations take about a third of the test time and buy nothing at these sizes. Without them
# the HLO (which the tests inspect) and its float arithmetic are unchanged; the worker
# interpreters (distill_setup.worker_env) and the top-k tests' compiles (topk_oracle) already run
# so. Set before jax parses XLA_FLAGS; left alone where a CUDA plugin is installed.
CPU_FAST_COMPILE_FLAGS = "--xla_backend_optimization_level=0 --xla_llvm_disable_expensive_passes=true"
if not any(importlib.util.find_spec(f"jax_cuda{v}_plugin") for v in (12, 13)):
    os.environ["XLA_FLAGS"] = f"{os.environ.get('XLA_FLAGS', '')} {CPU_FAST_COMPILE_FLAGS}".strip()

import jax  # noqa: E402
import pytest  # noqa: E402

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
