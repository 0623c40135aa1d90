"""One benchmark case — a (problem, implementation) pair — measured in its own process.

``python -m bench`` runs every case as ``python -m bench.suite CASE_JSON RESULT_PATH`` so
that the device's cumulative ``peak_bytes_in_use`` belongs to that case alone, and so that an
out-of-memory, a crash or a hang costs one row, not the run. The worker writes one JSON object
(the measured part of a row) to ``RESULT_PATH``; :mod:`bench.__main__` adds the run metadata.

Implementations (all on the same inputs and hyper-parameters, generated from the same seed):

* ``matmul-floor``: the four matmuls alone — teacher logits x_t W_t, student logits x_s W_s,
  grad_x = G W_sᵀ and grad_W = x_sᵀ G with a random (N, V) G in the activation dtype — each one
  plain XLA dot with bf16 operands and float32 accumulation, as in the fused path (but unchunked,
  so it also materializes the logits). Its forward is the two logits matmuls.
* ``matmul-floor-chunked``: the same four matmuls inside the fused path's ``lax.scan`` over
  chunks of rows (chunk size from :func:`jaxdistill.default_chunk_size` unless the problem sets
  one), with the float32 grad_W accumulator carried across chunks and no loss math: per chunk
  z_t and z_s, dZ = (z_s − z_t) cast to the activation dtype (a stand-in for the loss's dlogits
  that keeps both logits matmuls alive), grad_x = dZ W_sᵀ and grad_W += x_sᵀ dZ. Next to
  ``matmul-floor`` it prices the chunking; next to ``xla``/``pallas`` it prices the loss math.
  Its forward is the two logits matmuls per chunk and a row maximum of dZ.
* ``xla`` / ``pallas``: :func:`jaxdistill.fused_linear_jsd_loss` with that ``implementation``.
* ``reference``: :func:`jaxdistill.reference.fused_linear_jsd_loss` (materialized logits,
  ``jax.value_and_grad``).
* ``topk-k=K-xla`` / ``topk-k=K-pallas`` (``--impl topk``, K in 16, 64, 256):
  :func:`jaxdistill.fused_linear_topk_distill_loss` with that ``implementation`` (bucket tail,
  the problem's β, T and weights), value and gradients w.r.t. student hidden and weight, against
  a teacher cache made outside the timed calls by :func:`jaxdistill.teacher_topk` at k = K from
  the same teacher (hidden states and head) the dense rows read. The teacher's arrays are then
  dropped: the case holds the student's, the cache and the labels.
* ``matmul-floor-student``: the floor of the top-k rows, the student's three matmuls alone in the
  same scan over chunks as ``matmul-floor-chunked``: per chunk z_s = x_s W_s, dZ = z_s cast to the
  activation dtype, grad_x = dZ W_sᵀ, grad_W += x_sᵀ dZ. Its forward is the logits and a row maximum.
* ``matmul-teacher-logits``: the floor of ``teacher-topk``, the teacher's logits matmul alone,
  chunked the same way (a scan whose carry is the chunk's float32 logits, so that nothing but the
  matmul runs; the output is the last chunk's logits). No gradients, no separate forward.
* ``teacher-topk``: ``jax.jit`` of :func:`jaxdistill.teacher_topk` at k = 64 on the teacher
  (chunked like the loss, at the problem's T). No gradients, no separate forward.
* ``liger``: Liger-Kernel's ``LigerFusedLinearJSDLoss`` through torch (weights transposed to
  its (V, H) layout once, outside timing; inputs shared with JAX through DLPack). Same loss:
  ``weight_soft_loss``/``weight_hard_loss`` = our ``soft_weight``/``hard_weight``, both divide
  by the number of non-ignored tokens, T divides both logits for the soft part only, CE is
  untempered, M = β·P_teacher + (1−β)·Q_student. It computes its gradients inside its forward,
  so its "forward" time is that call without ``backward()``.

Measured per case: median/p10/p90 ms of value-and-gradients and of the forward alone
(after warm-up, each call timed to ``block_until_ready`` / ``torch.cuda.synchronize``),
compile seconds (trace + compile for JAX, cold: the driver's run-wide compilation cache only
ever serves the input generator and the oracle; first call minus a steady call for torch), XLA's
planned temporary bytes, the device memory the timed calls added on top of the inputs, and the
relative error of the loss and of both student gradients against the float32 reference
(``jax.default_matmul_precision("float32")``) on the same inputs, where that fits (the dense
losses only: the reference is the dense loss's, not the top-k loss's). The reference
of a problem is computed by the first worker that needs it and stored in ``Case.oracle_dir``
for the others (the driver sets it), so it runs once per problem, not once per implementation.

``interpret`` in a row: the Pallas kernel ran in Pallas interpret mode (``pallas`` and
``topk-k=K-pallas`` on a backend other than GPU, as the library does there), an emulation whose
times say nothing about the kernel's speed.
"""

from __future__ import annotations

import functools
import json
import math
import os
import platform
import sys
import time
import traceback

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax

import jaxdistill
from bench import common
from bench.cases import (
    IGNORE_INDEX,
    STUDENT_FLOOR,
    TEACHER_FLOOR,
    TEACHER_TOPK,
    TOPK_TEACHER_K,
    Case,
    Problem,
    is_oom,
    library_implementation,
    matmul_heads,
    topk_of,
)
from jaxdistill import reference

LOGIT_STD = 2.0  # weights are drawn so that logits have about this standard deviation
SLAB_ELEMENTS = 1 << 24  # inputs are drawn in row slabs of at most this many elements
F32_REFERENCE_NV_BUFFERS = 8  # rough count of (N, V) float32 buffers the oracle needs


class PlannedOOM(Exception):
    """XLA plans more memory than the device has free: reported as an OOM row, not run."""


def percentiles_ms(seconds: list[float]) -> dict:
    """Median, p10 and p90 of call times, in milliseconds."""
    p10, median, p90 = np.percentile(np.asarray(seconds) * 1e3, [10, 50, 90])
    return {"median": float(median), "p10": float(p10), "p90": float(p90)}


# ---------------------------------------------------------------------------------------------
# Inputs (the same seed gives the same arrays in every worker)

INPUT_NAMES = ("student_hidden", "student_weight", "teacher_hidden", "teacher_weight")


def make_inputs(problem: Problem, *, with_dlogits: bool = False, shardings: dict | None = None) -> dict:
    """Random inputs: x ~ N(0, 1), W ~ N(0, LOGIT_STD²/H), labels with ignored rows.

    One jitted program draws them slab by slab into its outputs (a loop over row slabs), so
    that the random-number temporaries stay small next to the inputs and the device's peak
    memory reflects the benchmark, not the set-up. The benchmark suite and the data-parallel
    benchmark (:mod:`bench.multi_gpu`, which passes ``shardings``) both draw with it.

    Args:
      problem: shapes, dtype, ignored fraction and seed.
      with_dlogits: also draw the matmul floor's (N, V) dlogits.
      shardings: optional ``{name: jax.sharding.Sharding}`` of every output (e.g. rows sharded
        over a mesh, weights replicated); None puts them on the default device.

    Returns:
      dict with student_hidden (N, Hs), student_weight (Hs, V), teacher_hidden (N, Ht),
      teacher_weight (Ht, V) in ``problem.dtype``, labels (N,) int32 (IGNORE_INDEX where
      ignored) and, when ``with_dlogits``, dlogits (N, V) for the matmul floor.
    """
    draw = jax.jit(functools.partial(_draw_inputs, problem, with_dlogits), out_shardings=shardings)
    return jax.block_until_ready(draw())


def _draw_inputs(problem: Problem, with_dlogits: bool) -> dict:
    p = problem
    keys = jax.random.split(jax.random.key(p.seed, impl="rbg"), 7)
    specs = {
        "student_hidden": ((p.n, p.hidden_student), 1.0),
        "student_weight": ((p.hidden_student, p.vocab), LOGIT_STD / math.sqrt(p.hidden_student)),
        "teacher_hidden": ((p.n, p.hidden_teacher), 1.0),
        "teacher_weight": ((p.hidden_teacher, p.vocab), LOGIT_STD / math.sqrt(p.hidden_teacher)),
        "dlogits": ((p.n, p.vocab), 1.0 / math.sqrt(p.vocab)),
    }
    if not with_dlogits:
        del specs["dlogits"]
    inputs = {name: _normal(keys[i], shape, scale, p.dtype) for i, (name, (shape, scale)) in enumerate(specs.items())}
    labels = jax.random.randint(keys[5], (p.n,), 0, p.vocab, jnp.int32)
    ignored = jax.random.uniform(keys[6], (p.n,)) < p.ignore_fraction
    inputs["labels"] = jnp.where(ignored, IGNORE_INDEX, labels)
    return inputs


def _normal(key, shape, scale, dtype):
    """N(0, scale²) of a 2-D ``shape`` in ``dtype``, drawn in row slabs of ≤ SLAB_ELEMENTS (traced)."""
    rows, cols = shape
    slab_rows = max(1, min(rows, SLAB_ELEMENTS // cols))
    n_full, tail = divmod(rows, slab_rows)

    def slab(index, n_rows):
        return (jax.random.normal(jax.random.fold_in(key, index), (n_rows, cols)) * scale).astype(dtype)

    def body(index, out):
        return lax.dynamic_update_slice(out, slab(index, slab_rows), (index * slab_rows, 0))

    out = lax.fori_loop(0, n_full, body, jnp.zeros(shape, dtype))
    if tail:
        out = lax.dynamic_update_slice(out, slab(n_full, tail), (n_full * slab_rows, 0))
    return out


# ---------------------------------------------------------------------------------------------
# The JAX implementations: (value-and-grad fn, forward fn, their args)


def matmul_floor_fns(inputs):
    """The four plain dots (bf16 operands, float32 accumulation) and the forward's two."""

    def logits(x_s, w_s, x_t, w_t):
        z_t = jnp.matmul(x_t, w_t, preferred_element_type=jnp.float32)
        z_s = jnp.matmul(x_s, w_s, preferred_element_type=jnp.float32)
        return z_t, z_s

    def four(x_s, w_s, x_t, w_t, g):
        z_t, z_s = logits(x_s, w_s, x_t, w_t)
        grad_x = lax.dot_general(g, w_s, (((1,), (1,)), ((), ())), preferred_element_type=jnp.float32)
        grad_w = lax.dot_general(x_s, g, (((0,), (0,)), ((), ())), preferred_element_type=jnp.float32)
        return z_t, z_s, grad_x, grad_w

    args = tuple(inputs[k] for k in INPUT_NAMES)
    return four, logits, args + (inputs["dlogits"],), args


def chunk_rows(problem: Problem) -> int:
    """Rows per chunk of the chunked implementations: the problem's, else the library's default."""
    chunk = problem.chunk_size or jaxdistill.default_chunk_size(problem.vocab)
    return max(1, min(chunk, problem.n))  # as jaxdistill.fused does


def _chunked(x, chunk: int):
    """(N, ...) → (⌈N/C⌉, C, ...), the last chunk padded with zeros (as jaxdistill.fused does)."""
    n_chunks = -(-x.shape[0] // chunk)
    pad = n_chunks * chunk - x.shape[0]
    if pad:
        x = jnp.pad(x, [(0, pad)] + [(0, 0)] * (x.ndim - 1))
    return x.reshape((n_chunks, chunk) + x.shape[1:])


def _dot(a, b, a_dim: int, b_dim: int):
    """Σ over a's ``a_dim`` and b's ``b_dim``, float32 accumulation (the fused path's contraction)."""
    return lax.dot_general(a, b, (((a_dim,), (b_dim,)), ((), ())), preferred_element_type=jnp.float32)


def matmul_floor_chunked_fns(problem: Problem, inputs, *, teacher: bool = True):
    """The four dots in the fused path's scan over chunks, with a stand-in dZ and no loss math.

    Per chunk of C rows: z_t = x_t W_t and z_s = x_s W_s (float32), dZ = (z_s − z_t) in the
    activation dtype, grad_x = dZ W_sᵀ (a scan output, float32) and grad_W += x_sᵀ dZ (float32
    carry). dZ depends on both logits and feeds both gradient dots, so no dot can be dropped.
    The forward is the two logits dots per chunk and the row maximum of dZ.

    ``teacher=False`` (``matmul-floor-student``, the top-k loss's floor): the student's three dots
    alone, dZ = z_s in the activation dtype; the functions then take (x_s, W_s) only.
    """
    chunk = chunk_rows(problem)

    def chunk_logits(x_s_c, w_s, *teacher_c):
        z = _dot(x_s_c, w_s, 1, 0)
        if teacher_c:
            x_t_c, w_t = teacher_c
            z = z - _dot(x_t_c, w_t, 1, 0)
        return z.astype(x_s_c.dtype)

    def chunks(x_s, *teacher_args):  # the scan's per-chunk inputs: x_s and x_t (if any) in chunks
        return tuple(_chunked(x, chunk) for x in (x_s, *teacher_args[:1]))

    def four(x_s, w_s, *teacher_args):
        n, hidden = x_s.shape

        def body(grad_w, chunk_inputs):
            x_s_c, *x_t_c = chunk_inputs
            dz = chunk_logits(x_s_c, w_s, *x_t_c, *teacher_args[1:])
            return grad_w + _dot(x_s_c, dz, 0, 0), _dot(dz, w_s, 1, 1)

        init = jnp.zeros(w_s.shape, jnp.float32)
        grad_w, grad_x = lax.scan(body, init, chunks(x_s, *teacher_args))
        return grad_x.reshape(-1, hidden)[:n], grad_w

    def forward(x_s, w_s, *teacher_args):
        def body(carry, chunk_inputs):
            x_s_c, *x_t_c = chunk_inputs
            return carry, jnp.max(chunk_logits(x_s_c, w_s, *x_t_c, *teacher_args[1:]), axis=1)

        _, row_max = lax.scan(body, None, chunks(x_s, *teacher_args))
        return row_max.reshape(-1)[: x_s.shape[0]]

    args = tuple(inputs[k] for k in (INPUT_NAMES if teacher else INPUT_NAMES[:2]))
    return four, forward, args, args


def teacher_logits_fns(problem: Problem, inputs):
    """``matmul-teacher-logits``: the teacher's logits dot alone, in the scan over chunks of
    :func:`jaxdistill.teacher_topk` (same chunk size). The scan's carry is the chunk's float32
    logits, replaced by every chunk's dot and returned for the last one: no other work, no (N, V)
    output, and every chunk's dot stays (a loop's carry is not dead code). No gradient, no forward."""
    chunk = chunk_rows(problem)

    def logits(x_t, w_t):
        def body(_, x_t_c):
            return _dot(x_t_c, w_t, 1, 0), None

        last, _ = lax.scan(body, jnp.zeros((chunk, w_t.shape[1]), jnp.float32), _chunked(x_t, chunk))
        return last

    return logits, None, (inputs["teacher_hidden"], inputs["teacher_weight"]), None


def teacher_topk_call(problem: Problem, k: int):
    """:func:`jaxdistill.teacher_topk` at k on (teacher hidden, teacher head), at the problem's T
    and chunk size: the ``teacher-topk`` row, and the maker of the top-k rows' teacher cache."""
    return functools.partial(
        jaxdistill.teacher_topk, k=k, temperature=problem.temperature, chunk_size=problem.chunk_size
    )


def teacher_topk_fns(problem: Problem, inputs):
    """``teacher-topk``: the cache's maker at k = TOPK_TEACHER_K. No gradient, no forward."""
    args = (inputs["teacher_hidden"], inputs["teacher_weight"])
    return teacher_topk_call(problem, TOPK_TEACHER_K), None, args, None


TOPK_INPUT_NAMES = ("student_hidden", "student_weight", "teacher_ids", "teacher_logprobs", "labels")


def topk_loss_fns(impl: str, problem: Problem, inputs):
    """value_and_grad (w.r.t. student hidden and weight) and forward of ``topk-k=K-IMPL``."""
    kwargs = problem.loss_kwargs()
    implementation = library_implementation(impl)

    def loss(x_s, w_s, ids, logprobs, y):
        return jaxdistill.fused_linear_topk_distill_loss(
            x_s, w_s, ids, logprobs, y, implementation=implementation, chunk_size=problem.chunk_size, **kwargs
        )

    args = tuple(inputs[k] for k in TOPK_INPUT_NAMES)
    return jax.value_and_grad(loss, argnums=(0, 1)), loss, args, args


def loss_fns(impl: str, problem: Problem, inputs):
    """value_and_grad (w.r.t. student hidden and weight) and forward of one loss implementation."""
    kwargs = problem.loss_kwargs()
    if impl == "reference":

        def loss(x_s, w_s, x_t, w_t, y):
            return reference.fused_linear_jsd_loss(x_s, w_s, x_t, w_t, y, **kwargs)

    else:

        def loss(x_s, w_s, x_t, w_t, y):
            return jaxdistill.fused_linear_jsd_loss(
                x_s, w_s, x_t, w_t, y, implementation=impl, chunk_size=problem.chunk_size, **kwargs
            )

    args = tuple(inputs[k] for k in INPUT_NAMES) + (inputs["labels"],)
    return jax.value_and_grad(loss, argnums=(0, 1)), loss, args, args


def memory_stats() -> dict | None:
    """Memory stats of JAX's device allocator, or None where the backend has none (CPU)."""
    return jax.devices()[0].memory_stats() or None


def compile_checked(fn, args):
    """jit + lower + compile; raises PlannedOOM when XLA's plan exceeds the free device memory.

    Returns:
      (compiled, seconds spent tracing and compiling, memory analysis or None).
    """
    start = time.perf_counter()
    compiled = jax.jit(fn).lower(*args).compile()
    seconds = time.perf_counter() - start
    analysis = compiled.memory_analysis()
    stats = memory_stats()
    if analysis is not None and stats and "bytes_limit" in stats:
        needed = analysis.temp_size_in_bytes + analysis.output_size_in_bytes
        free = stats["bytes_limit"] - stats["bytes_in_use"]
        if needed > free:
            raise PlannedOOM(f"XLA plans {needed / 1e9:.1f} GB of temporaries and outputs, {free / 1e9:.1f} GB free")
    return compiled, seconds, analysis


def time_calls(call, *, warmup: int, iters: int, sync=jax.block_until_ready):
    """Times ``call()`` ``iters`` times after ``warmup`` calls; returns (seconds, last result).

    The previous result is dropped before each call, so at most one set of outputs is alive.
    ``sync(result)`` waits for the device.
    """
    for _ in range(warmup):
        sync(call())
    seconds, result = [], None
    for _ in range(iters):
        result = None
        start = time.perf_counter()
        result = call()
        sync(result)
        seconds.append(time.perf_counter() - start)
    return seconds, result


def time_forward_then_value_and_grad(fwd_call, vg_call, *, warmup: int, iters: int, sync=jax.block_until_ready):
    """Times the forward, then value-and-grad, with :func:`time_calls` (same warm-up and count).

    No forward output is alive once the value-and-grad calls start, so the device never holds
    two calls' outputs (the matmul floor's two (N, V) float32 logits would otherwise be held
    twice, which is what made it run out of memory at N = 65536 on the H200), and the measured
    peak is that of one call.

    Returns:
      (forward seconds, value-and-grad seconds, the last value-and-grad result).
    """
    fwd_seconds = time_calls(fwd_call, warmup=warmup, iters=iters, sync=sync)[0]
    vg_seconds, result = time_calls(vg_call, warmup=warmup, iters=iters, sync=sync)
    return fwd_seconds, vg_seconds, result


def case_inputs(case: Case) -> dict:
    """The arrays a case reads: :func:`make_inputs`' (the same in every case of a problem), with
    the teacher of the ``topk-k=K-*`` rows replaced by its cache (``teacher_ids``,
    ``teacher_logprobs``, made by :func:`teacher_topk_call` at K, outside any timing) and the head
    a row does not use dropped (so that ``input_bytes`` and the device memory are the row's own)."""
    inputs = make_inputs(case.problem, with_dlogits=case.impl == "matmul-floor")
    if (k := topk_of(case.impl)) is not None:
        cache = jax.jit(teacher_topk_call(case.problem, k))(inputs["teacher_hidden"], inputs["teacher_weight"])
        inputs = {**inputs, "teacher_ids": cache.ids, "teacher_logprobs": cache.logprobs}
        inputs = {name: inputs[name] for name in TOPK_INPUT_NAMES}
    teacher, student = matmul_heads(case.impl)
    unused = (() if teacher else ("teacher_hidden", "teacher_weight")) + (
        () if student else ("student_hidden", "student_weight", "labels")
    )
    return jax.block_until_ready({name: x for name, x in inputs.items() if name not in unused})


def case_fns(case: Case, inputs):
    """(value-and-grad fn, forward fn or None, their args) of a JAX case."""
    impl, problem = case.impl, case.problem
    if impl == "matmul-floor":
        return matmul_floor_fns(inputs)
    if impl == "matmul-floor-chunked":
        return matmul_floor_chunked_fns(problem, inputs)
    if impl == STUDENT_FLOOR:
        return matmul_floor_chunked_fns(problem, inputs, teacher=False)
    if impl == TEACHER_FLOOR:
        return teacher_logits_fns(problem, inputs)
    if impl == TEACHER_TOPK:
        return teacher_topk_fns(problem, inputs)
    if topk_of(impl) is not None:
        return topk_loss_fns(impl, problem, inputs)
    return loss_fns(impl, problem, inputs)


def measure_jax(case: Case, row: dict, inputs):
    """Times and sizes one JAX implementation; returns its (loss, grad_x, grad_W (Hs, V)) or None.

    Rows without gradients (``matmul-teacher-logits``, ``teacher-topk``) time their one call as
    ``vg_ms`` and have ``fwd_ms`` None.
    """
    vg_fn, fwd_fn, vg_args, fwd_args = case_fns(case, inputs)
    vg, vg_compile_s, analysis = compile_checked(vg_fn, vg_args)
    fwd, fwd_compile_s = compile_checked(fwd_fn, fwd_args)[:2] if fwd_fn is not None else (None, None)
    row["compile_s"] = {"vg": vg_compile_s, "fwd": fwd_compile_s}
    memory = row["memory"]
    if analysis is not None:
        memory["xla_temp_bytes"] = int(analysis.temp_size_in_bytes)
        memory["xla_output_bytes"] = int(analysis.output_size_in_bytes)

    before = memory_stats()
    if fwd is None:
        fwd_seconds = None
        vg_seconds, result = time_calls(lambda: vg(*vg_args), warmup=case.warmup, iters=case.iters)
    else:
        fwd_seconds, vg_seconds, result = time_forward_then_value_and_grad(
            lambda: fwd(*fwd_args), lambda: vg(*vg_args), warmup=case.warmup, iters=case.iters
        )
    after = memory_stats()
    row["vg_ms"] = percentiles_ms(vg_seconds)
    row["fwd_ms"] = None if fwd_seconds is None else percentiles_ms(fwd_seconds)
    if before and after and "peak_bytes_in_use" in after:
        memory.update(
            source="jax peak_bytes_in_use",
            baseline_bytes=int(before["bytes_in_use"]),
            peak_bytes=int(after["peak_bytes_in_use"]),
            extra_bytes=int(after["peak_bytes_in_use"] - before["bytes_in_use"]),
        )
        if after["peak_bytes_in_use"] <= before["peak_bytes_in_use"]:
            memory["note"] = "upper bound: the process peak was set before the timed calls (compilation)"
    if library_implementation(case.impl) is None and case.impl != "reference":
        return None  # the floors and teacher-topk: no loss
    loss, (grad_x, grad_w) = result
    return loss, grad_x, grad_w


# ---------------------------------------------------------------------------------------------
# Liger-Kernel (torch)


def measure_liger(case: Case, row: dict, inputs):
    """Times Liger-Kernel's LigerFusedLinearJSDLoss on the same arrays (shared through DLPack).

    Returns its (loss, grad_x, grad_W (Hs, V)) as JAX arrays.
    """
    import torch

    result = _measure_liger(case, row, inputs)
    if torch.cuda.is_available():
        torch.cuda.empty_cache()  # torch's cached blocks go back before JAX runs the oracle
    return result


def _measure_liger(case: Case, row: dict, inputs):
    import torch
    from liger_kernel.chunked_loss import LigerFusedLinearJSDLoss

    p = case.problem
    on_gpu = jax.default_backend() == "gpu" and torch.cuda.is_available()
    peer = dict(
        weight_hard_loss=p.hard_weight,
        weight_soft_loss=p.soft_weight,
        beta=p.beta,
        ignore_index=IGNORE_INDEX,
        temperature=p.temperature,
        compiled=on_gpu,  # torch.compile, Liger's default; it needs a GPU toolchain
        chunk_size=p.chunk_size or 1024,
    )
    row["peer"] = {"name": "liger_kernel.chunked_loss.LigerFusedLinearJSDLoss", **peer}
    loss_fn = LigerFusedLinearJSDLoss(**peer)

    x_s = torch.from_dlpack(inputs["student_hidden"]).detach().requires_grad_(True)
    x_t = torch.from_dlpack(inputs["teacher_hidden"])
    # Liger's weights are (V, H): transposed once here, outside timing and memory accounting.
    w_s = torch.from_dlpack(inputs["student_weight"]).t().contiguous().requires_grad_(True)
    w_t = torch.from_dlpack(inputs["teacher_weight"]).t().contiguous()
    labels = torch.from_dlpack(inputs["labels"]).long()

    def sync(_=None):
        if on_gpu:
            torch.cuda.synchronize()

    def value_and_grad():
        x_s.grad = w_s.grad = None
        loss = loss_fn(x_s, w_s, x_t, w_t, labels)
        loss.backward()
        return loss

    def forward():  # gradients are computed inside Liger's forward; only backward() is left out
        x_s.grad = w_s.grad = None  # drop the last value-and-grad call's gradients (one call's outputs alive)
        return loss_fn(x_s, w_s, x_t, w_t, labels)

    sync()
    if on_gpu:
        torch.cuda.reset_peak_memory_stats()
        baseline = torch.cuda.memory_allocated()
    start = time.perf_counter()
    sync(value_and_grad())
    first_call_s = time.perf_counter() - start
    fwd_seconds, vg_seconds, loss = time_forward_then_value_and_grad(
        forward, value_and_grad, warmup=case.warmup, iters=case.iters, sync=sync
    )
    row["vg_ms"], row["fwd_ms"] = percentiles_ms(vg_seconds), percentiles_ms(fwd_seconds)
    row["compile_s"] = {"vg": max(0.0, first_call_s - row["vg_ms"]["median"] / 1e3), "fwd": None}
    if on_gpu:
        peak = torch.cuda.max_memory_allocated()
        row["memory"].update(
            source="torch max_memory_allocated",
            baseline_bytes=int(baseline),
            peak_bytes=int(peak),
            extra_bytes=int(peak - baseline),
        )
    sync()
    return (
        jnp.asarray(loss.detach().float().cpu().numpy()),
        jax.dlpack.from_dlpack(x_s.grad.detach().contiguous()),
        jax.dlpack.from_dlpack(w_s.grad.detach().t().contiguous()),
    )


# ---------------------------------------------------------------------------------------------
# Accuracy against the float32 reference


def reference_errors(case: Case, inputs, got) -> dict:
    """Relative errors of (loss, grad_x, grad_W) against the float32 reference on the same inputs.

    ‖got − ref‖ / ‖ref‖ (Frobenius; |·| for the loss), the reference run on the inputs upcast to
    float32 with float32 matmuls (:func:`float32_oracle`). Returns ``{"note": why}`` where it is
    not computed.
    """
    if case.problem.n > case.error_max_n:
        return {"note": f"not computed: N > --error-max-n {case.error_max_n}"}
    oracle = float32_oracle(case, inputs)
    if "note" in oracle:
        return oracle
    loss_, grad_x, grad_w = got
    return {
        "loss_rel": float(_relative_error(loss_, oracle["loss"])),
        "grad_x_rel": float(_relative_error(grad_x, oracle["grad_x"])),
        "grad_w_rel": float(_relative_error(grad_w, oracle["grad_w"])),
        "reference_loss": float(oracle["loss"]),
    }


ORACLE_KEYS = ("loss", "grad_x", "grad_w")


def oracle_path(oracle_dir: str, problem: Problem) -> str:
    """Where the float32 oracle of ``problem`` is stored in a run's ``oracle_dir``."""
    return os.path.join(oracle_dir, problem.key() + ".npz")


def float32_oracle(case: Case, inputs) -> dict:
    """The float32 reference's ``{"loss", "grad_x", "grad_w"}`` on the case's inputs, or ``{"note": why not}``.

    With ``case.oracle_dir`` set (the driver sets it), the first worker of a problem computes
    it and stores it there, and the problem's other workers read it back: one oracle per
    problem. Every worker draws the same inputs from the problem's seed, so stored and
    recomputed oracles are the same arrays. A worker that cannot compute it (memory) leaves
    nothing behind; the next one tries again.
    """
    path = None if case.oracle_dir is None else oracle_path(case.oracle_dir, case.problem)
    if path is not None and os.path.exists(path):
        with np.load(path) as stored:
            oracle = {k: jnp.asarray(stored[k]) for k in ORACLE_KEYS}
        print(f"float32 oracle: read {path}", flush=True)
        return oracle
    oracle = compute_float32_oracle(case.problem, inputs)
    if path is not None and "note" not in oracle:
        partial = path + ".partial"
        with open(partial, "wb") as f:  # a file object: np.savez adds no suffix
            np.savez(f, **{k: np.asarray(v) for k, v in oracle.items()})
        os.replace(partial, path)  # readers see the whole file or none
        print(f"float32 oracle: computed, stored {path}", flush=True)
    return oracle


def compute_float32_oracle(problem: Problem, inputs) -> dict:
    """The float32 reference's loss and student gradients (see :func:`float32_oracle`)."""
    p = problem
    stats = memory_stats()
    estimate = F32_REFERENCE_NV_BUFFERS * 4 * p.n * p.vocab
    if stats and "bytes_limit" in stats and estimate > stats["bytes_limit"] - stats["bytes_in_use"]:
        return {"note": f"not computed: the float32 reference needs ~{estimate / 1e9:.0f} GB"}

    def loss(x_s, w_s, x_t, w_t, y):
        return reference.fused_linear_jsd_loss(x_s, w_s, x_t, w_t, y, **p.loss_kwargs())

    args = tuple(inputs[k].astype(jnp.float32) for k in INPUT_NAMES) + (inputs["labels"],)
    try:
        with jax.default_matmul_precision("float32"):
            compiled, _, _ = compile_checked(jax.value_and_grad(loss, argnums=(0, 1)), args)
            ref_loss, (ref_grad_x, ref_grad_w) = compiled(*args)
    except Exception as error:
        if not is_oom(error):
            raise
        return {"note": "not computed: the float32 reference ran out of memory"}
    return {"loss": ref_loss, "grad_x": ref_grad_x, "grad_w": ref_grad_w}


@jax.jit
def _relative_error(got, want):
    got, want = got.astype(jnp.float32), want.astype(jnp.float32)
    return jnp.linalg.norm((got - want).ravel()) / jnp.linalg.norm(want.ravel())


# ---------------------------------------------------------------------------------------------
# The worker


def interpret_mode(impl: str) -> bool:
    """Whether ``impl`` runs a Pallas kernel in interpret mode here: ``pallas`` and
    ``topk-k=K-pallas`` off a GPU backend, where the library interprets its kernels (its
    ``FusedPlan.interpret``)."""
    return library_implementation(impl) == "pallas" and jax.default_backend() != "gpu"


def run_case(case: Case) -> dict:
    """Measures one case; every outcome (OOM, missing peer, error) becomes a row, never a raise."""
    env = {"python": platform.python_version()}
    row: dict = {"status": "ok", "reason": None, "env": env, "memory": {}, "errors": {}}
    try:
        if case.impl == "liger":
            env.update(torch=common.package_version("torch"), liger_kernel=common.package_version("liger-kernel"))
            try:
                import liger_kernel.chunked_loss  # noqa: F401
                import torch  # noqa: F401
            except Exception as error:  # any import failure means the peer cannot run here
                row.update(status="skipped", reason=f"liger-kernel does not import: {type(error).__name__}: {error}")
                return row
        env.update(
            device=jax.devices()[0].device_kind,
            backend=jax.default_backend(),
            jax=jax.__version__,
            jaxlib=common.package_version("jaxlib"),
        )
        row["interpret"] = interpret_mode(case.impl)
        inputs = case_inputs(case)
        row["memory"]["input_bytes"] = int(sum(x.nbytes for x in inputs.values()))
        measure = measure_liger if case.impl == "liger" else measure_jax
        got = measure(case, row, inputs)
        seconds = row["vg_ms"]["median"] / 1e3
        row["tflops"] = case.problem.flops(case.impl) / seconds / 1e12
        row["tokens_per_s"] = case.problem.n / seconds
        if got is not None:
            row["loss"] = float(got[0])
            if topk_of(case.impl) is None:
                row["errors"] = reference_errors(case, inputs, got)
            else:
                row["errors"] = {"note": "not computed: the float32 reference is the dense loss's"}
    except Exception as error:  # the row records it
        row["status"] = "OOM" if is_oom(error) else "error"
        row["reason"] = f"{type(error).__name__}: {str(error)[:800]}"
        if row["status"] == "error":
            traceback.print_exc()
    return row


def main(argv: list[str]) -> int:
    """``python -m bench.suite CASE_JSON RESULT_PATH``: measure one case, write its row."""
    case_json, result_path = argv
    row = run_case(Case.from_json(case_json))
    with open(result_path, "w") as f:
        json.dump(row, f)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
