"""Tiny student/teacher transformers, batches and a subprocess launcher shared by the integration tests.

Imported by the tests and by ``distributed_worker.py`` (which runs in a subprocess with several
simulated CPU devices). Models are built inside ``nnx.jit``: one compile instead of one per
eager initializer op, which keeps the tests fast on a small CPU.
"""

from __future__ import annotations

import json
import os
import pathlib
import subprocess
import sys

import jax
import numpy as np
import optax
from flax import nnx

from jaxdistill.training import DistillConfig
from jaxdistill.transformer import TransformerLM

REPO_ROOT = pathlib.Path(__file__).resolve().parents[1]
VOCAB, SEQ_LEN = 97, 8
STUDENT = dict(vocab_size=VOCAB, d_model=16, n_layers=2, n_heads=2, d_ff=32, max_len=SEQ_LEN)
TEACHER = dict(vocab_size=VOCAB, d_model=24, n_layers=1, n_heads=2, d_ff=48, max_len=SEQ_LEN)
# chunk_size 4 < tokens per device: several chunks per device, and a ragged last one on some.
CONFIG = DistillConfig(beta=0.3, temperature=2.0, soft_weight=1.0, hard_weight=0.5, chunk_size=4)


def make_models(
    *, tie_student=True, student_bias=True, tie_teacher=False, teacher_bias=False, tx=None, seed=0, vocab=VOCAB
):
    """(student, teacher, optimizer): a 2-layer d=16 student, a 1-layer d=24 teacher, an nnx.Optimizer."""
    tx = optax.sgd(1.0) if tx is None else tx

    @nnx.jit
    def create():
        rngs = nnx.Rngs(seed)
        sizes = dict(vocab_size=vocab)
        student = TransformerLM(**STUDENT | sizes, tie_embeddings=tie_student, head_bias=student_bias, rngs=rngs)
        teacher = TransformerLM(**TEACHER | sizes, tie_embeddings=tie_teacher, head_bias=teacher_bias, rngs=rngs)
        if student_bias:  # a non-zero bias, so its gradient path is exercised at non-trivial values
            bias = student.head_bias if tie_student else student.head.bias
            bias[...] = 0.1 * jax.random.normal(rngs.params(), bias.shape)
        return student, teacher, nnx.Optimizer(student, tx, wrt=nnx.Param)

    return create()


def make_batch(batch_size=8, *, seed=0, ignore_index=-100, vocab=VOCAB):
    """{"inputs", "labels"} int32 (batch_size, SEQ_LEN) numpy arrays.

    Split over 4 devices (2 rows each) the devices hold 6, 9, 14 and 16 valid tokens (and
    over 2 processes 15 and 30), so a per-device mean would differ from the global one.
    """
    rng = np.random.default_rng(seed)
    inputs = rng.integers(0, vocab, (batch_size, SEQ_LEN), dtype=np.int32)
    labels = np.concatenate([inputs[:, 1:], rng.integers(0, vocab, (batch_size, 1), dtype=np.int32)], axis=1)
    valid = np.ones((batch_size, SEQ_LEN), bool)
    if batch_size == 8:
        valid[0, 3:] = False  # rows 0-1: 3 + 3 valid
        valid[1, :5] = False
        valid[2, ::2] = False  # rows 2-3: 4 + 5 valid
        valid[3, 5:] = False
        valid[4, 7] = False  # rows 4-5: 7 + 7 valid
        valid[5, 0] = False
    labels = np.where(valid, labels, ignore_index).astype(np.int32)
    return {"inputs": inputs, "labels": labels}


def worker_env(devices: int) -> dict:
    """Environment of a worker interpreter with ``devices`` simulated CPU devices.

    jax reads the device count once per process, so anything needing several devices runs in
    its own interpreter and the flag never reaches the test process. LLVM optimizations are
    off (the HLO, which the tests inspect, is unchanged) to halve the compile time.
    """
    env = dict(os.environ)
    flags = f"--xla_force_host_platform_device_count={devices} --xla_backend_optimization_level=0"
    env["XLA_FLAGS"] = f"{env.get('XLA_FLAGS', '')} {flags}".strip()
    env["JAX_PLATFORMS"] = "cpu"
    env["PYTHONPATH"] = os.pathsep.join(p for p in (str(REPO_ROOT), env.get("PYTHONPATH")) if p)
    return env


def python_command(*args) -> list[str]:
    """``python -W error ARGS``: workers treat warnings as errors, like the test suite."""
    return [sys.executable, "-W", "error", *args]


def run_python(*args, devices: int, timeout: float = 300):
    """Run ``python -W error ARGS`` from the repo root in a worker environment (see :func:`worker_env`)."""
    return subprocess.run(
        python_command(*args),
        cwd=REPO_ROOT,
        env=worker_env(devices),
        capture_output=True,
        text=True,
        timeout=timeout,
    )


def last_json_line(stdout: str):
    """The JSON object printed on the last line of a worker's stdout."""
    return json.loads(stdout.strip().splitlines()[-1])
