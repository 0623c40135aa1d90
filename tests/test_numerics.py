"""Numerical hardening of the loss on both implementations (the kernel in interpret mode) and the
reference: β at or near the endpoints, cancellation, masked (−inf) columns, float16 gradients,
near one-hot teachers at low T, the Pallas path under ``shard_map(check_vma=True)``, second
derivatives, and the row labels every path reads.

The oracle is independent of all three: the contract of DESIGN.md §1 written out plainly in
NumPy long double (64-bit mantissa, ε ≈ 1.1e-19) from the same float32 inputs. Its plain forms
cancel like the float32 ones do, but 11 more decimal digits absorb every cancellation these tests
provoke (e.g. JSD_β at β = 1 − 1e-8 is ≈ 1e-10 with terms of ≈ 1e-8: 1e-9 relative).
"""

from __future__ import annotations

import dataclasses
import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from distill_setup import last_json_line, run_python
from helpers import make_problem, oracle64
from jax.sharding import AbstractDevice, AbstractMesh, AxisType, NamedSharding, use_abstract_mesh
from jax.sharding import PartitionSpec as P
from test_kernel import make_rows

from jaxdistill import fused, fused_linear_jsd_loss, reference, rowmath
from jaxdistill._validate import validate_and_flatten
from pallas_kernels import RowKernelConfig, distill_rows_pallas
from pallas_kernels.distill_rows import MIXTURE_JSD, REVERSE_KL, row_hyper

LD = np.longdouble
EPS32 = float(np.finfo(np.float32).eps)
LOSS_RTOL, GRAD_RTOL = 1e-5, 1e-4  # DESIGN.md §3, float32 against the oracle
FLOAT16_ROUNDINGS = 2 * 2.0**-11  # dlogits and the result, each rounded by ≤ half a float16 ulp
STUDENT_GRADS = ("student_hidden", "student_weight", "student_bias")


def _loss_fn(name):
    if name == "reference":
        return reference.fused_linear_jsd_loss
    return functools.partial(fused_linear_jsd_loss, implementation=name, chunk_size=8)


IMPLEMENTATIONS = ("xla", "pallas", "reference")


# --- the long-double oracle ----------------------------------------------------------------------


def _log_softmax(z):
    m = np.max(z, axis=-1, keepdims=True)
    m = np.where(np.isfinite(m), m, 0)
    return z - m - np.log(np.sum(np.exp(z - m), axis=-1, keepdims=True))


def _times(w, x):
    """w·x with 0 where w = 0 (0·log 0 = 0, and a masked column contributes nothing)."""
    with np.errstate(invalid="ignore"):
        return np.where(w > 0, w * np.where(w > 0, x, 0), 0)


def ld_rows(z_s, z_t, labels, beta, temperature, soft_weight=1.0, hard_weight=0.0):
    """Per-row (JSD_β, CE, dlogits) in long double; β a Python float (its exact value decides)."""
    z_s, z_t = np.asarray(z_s, LD), np.asarray(z_t, LD)
    labels = np.asarray(labels)
    with np.errstate(divide="ignore", invalid="ignore", over="ignore"):
        log_q, log_p = _log_softmax(z_s / LD(temperature)), _log_softmax(z_t / LD(temperature))
        log_u = _log_softmax(z_s)
        q, p = np.exp(log_q), np.exp(log_p)
        b = LD(beta)
        w = LD(1) - b
        if beta == 0:
            soft = np.sum(_times(p, log_p - log_q), axis=-1)
            grad = q - p
        elif beta == 1:
            soft = np.sum(_times(q, log_q - log_p), axis=-1)
            grad = _times(q, log_q - log_p - soft[:, None])
        else:
            log_m = np.logaddexp(np.log(b) + log_p, np.log(w) + log_q)
            kl_q_m = np.sum(_times(q, log_q - log_m), axis=-1)
            soft = b * np.sum(_times(p, log_p - log_m), axis=-1) + w * kl_q_m
            grad = _times(q, w * (log_q - log_m) - w * kl_q_m[:, None])
        vocab = z_s.shape[-1]
        hard = -np.take_along_axis(log_u, np.clip(labels, 0, vocab - 1)[:, None], axis=-1)[:, 0]
        onehot = np.arange(vocab)[None, :] == labels[:, None]
        dlogits = LD(soft_weight) / LD(temperature) * grad + LD(hard_weight) * (np.exp(log_u) - onehot)
    valid = labels >= 0
    return np.where(valid, soft, 0), np.where(valid, hard, 0), np.where(valid[:, None], dlogits, 0)


def ld_loss_and_grads(p, *, beta, temperature=1.0, soft_weight=1.0, hard_weight=0.0):
    """Mean loss and (grad_x, grad_W, grad_b) of a Problem, long double, from its float32 values."""
    f = lambda x: None if x is None else np.asarray(np.asarray(x, np.float32), LD)  # noqa: E731
    xs, ws, bs, xt, wt, bt = map(
        f, (p.student_hidden, p.student_weight, p.student_bias, p.teacher_hidden, p.teacher_weight, p.teacher_bias)
    )
    labels = np.asarray(p.labels)
    labels = np.where(labels == -100, -1, labels)
    with np.errstate(invalid="ignore"):
        z_s = xs @ ws + (0 if bs is None else bs)
        z_t = xt @ wt + (0 if bt is None else bt)
    soft, hard, dlogits = ld_rows(z_s, z_t, labels, beta, temperature, soft_weight, hard_weight)
    n = max(1, int(np.sum(labels >= 0)))
    with np.errstate(invalid="ignore"):
        loss = (LD(soft_weight) * soft.sum() + LD(hard_weight) * hard.sum()) / n
    g = dlogits / n
    return loss, (g @ ws.T, xs.T @ g, None if bs is None else g.sum(0))


def value_and_grads(loss_fn, p, **options):
    def f(xs, ws, bs):
        return loss_fn(
            xs,
            ws,
            p.teacher_hidden,
            p.teacher_weight,
            p.labels,
            student_bias=bs,
            teacher_bias=p.teacher_bias,
            **options,
        )

    return jax.jit(jax.value_and_grad(f, argnums=(0, 1, 2)))(p.student_hidden, p.student_weight, p.student_bias)


def max_error(got, want) -> float:
    return float(np.max(np.abs(np.asarray(got).astype(np.float64) - np.asarray(want, np.float64))))


def assert_matches(loss, grads, want_loss, want_grads, *, loss_rtol=LOSS_RTOL, grad_rtol=GRAD_RTOL, atol=0.0):
    """|loss − want| ≤ rtol·|want| + atol; each gradient within grad_rtol of its largest entry (+ atol)."""
    assert np.isfinite(float(loss)), float(loss)
    assert abs(float(loss) - float(want_loss)) <= loss_rtol * abs(float(want_loss)) + atol, (float(loss), want_loss)
    for name, got, want in zip(STUDENT_GRADS, grads, want_grads, strict=True):
        if want is None:
            assert got is None, name
            continue
        assert bool(jnp.all(jnp.isfinite(got))), name
        bound = grad_rtol * float(np.max(np.abs(np.asarray(want, np.float64)))) + atol
        assert max_error(got, want) <= bound, (name, max_error(got, want), bound)


def small_problem(**kwargs):
    return make_problem(**{"n": 13, "hs": 8, "ht": 12, "vocab": 37, "seed": 11, **kwargs})


# --- item 1: β that rounds to an endpoint in float32 keeps its mixture ---------------------------


@pytest.mark.parametrize("impl", IMPLEMENTATIONS)
@pytest.mark.parametrize("beta", [1 - 1e-8, 1e-40], ids=["beta=1-1e-8", "beta=1e-40"])
def test_beta_rounding_to_an_endpoint_keeps_the_mixture(impl, beta):
    """float32(1 − 1e-8) = 1 and 1e-40 is subnormal (0 where denormals flush): the branch and 1 − β
    come from the exact Python value. JSD_β at 1 − 1e-8 is ≈ 1e-8·KL(Q‖P), not KL(Q‖P); at
    1e-40 it is ≈ 1e-40·KL(P‖Q), 0 to float32, not KL(P‖Q) ≈ 0.1."""
    p = small_problem()
    options = dict(beta=beta, temperature=4.0)
    want_loss, want_grads = ld_loss_and_grads(p, **options)
    loss, grads = value_and_grads(_loss_fn(impl), p, **options)
    assert_matches(loss, grads, want_loss, want_grads, atol=1e-30)


# --- item 2: no cancellation near the endpoints ----------------------------------------------------

NEAR_ENDPOINTS = [1e-6, 1e-4, 1 - 1e-6]


@pytest.mark.parametrize("impl", IMPLEMENTATIONS)
@pytest.mark.parametrize("beta", NEAR_ENDPOINTS, ids=lambda b: f"beta={b:.6g}")
def test_float32_accuracy_near_the_endpoints(impl, beta):
    """T = 4, soft loss only: log Q − log M used to cancel (84–98 % off at β = 1e-6 on the XLA path)."""
    p = small_problem(seed=12)
    options = dict(beta=beta, temperature=4.0)
    want_loss, want_grads = ld_loss_and_grads(p, **options)
    loss, grads = value_and_grads(_loss_fn(impl), p, **options)
    assert_matches(loss, grads, want_loss, want_grads)


@pytest.mark.parametrize("beta", [1e-6, 1 - 1e-6, 1 - 1e-8], ids=lambda b: f"beta={b:.8g}")
def test_float64_reference_is_a_sharp_oracle_near_the_endpoints(beta):
    """The suite's oracle (the reference upcast to float64) agrees with long double to 1e-10."""
    p = small_problem(seed=12)
    options = dict(beta=beta, temperature=4.0, hard_weight=0.3)
    want_loss, want_grads = ld_loss_and_grads(p, **options)
    loss, grads = oracle64(p, **options)
    assert_matches(loss, grads, want_loss, want_grads, loss_rtol=1e-10, grad_rtol=1e-10)


# --- item 3: masked (−inf / finfo.min) columns ------------------------------------------------------

MASKED = np.array([0, 5, 17, 36])  # the first and the last column among them


def mask_heads(p, fill, *, student=True, teacher=True):
    s = p.student_bias.at[MASKED].set(fill) if student else p.student_bias
    t = p.teacher_bias.at[MASKED].set(fill) if teacher else p.teacher_bias
    return dataclasses.replace(p, student_bias=s, teacher_bias=t)


def truncate(p):
    kept = np.setdiff1d(np.arange(p.student_weight.shape[1]), MASKED)
    remap = np.full(p.student_weight.shape[1], -100)
    remap[kept] = np.arange(kept.size)
    labels = jnp.where(p.labels < 0, -100, jnp.asarray(remap)[jnp.maximum(p.labels, 0)])
    return dataclasses.replace(
        p,
        student_weight=p.student_weight[:, kept],
        teacher_weight=p.teacher_weight[:, kept],
        student_bias=p.student_bias[kept],
        teacher_bias=p.teacher_bias[kept],
        labels=labels,
    ), kept


# −inf at every branch; finfo.min (the same in the stats pass every branch shares) at one.
BOTH_MASKED = {"-inf-fwdKL": (-np.inf, 0.0), "-inf-jsd0.5": (-np.inf, 0.5), "-inf-revKL": (-np.inf, 1.0)}
BOTH_MASKED["finfo.min-jsd0.5"] = (float(np.finfo(np.float32).min), 0.5)


@pytest.mark.parametrize("impl", IMPLEMENTATIONS)
@pytest.mark.parametrize("mask, beta", BOTH_MASKED.values(), ids=BOTH_MASKED.keys())
def test_columns_masked_in_both_heads_are_the_truncated_vocabulary(impl, mask, beta):
    """Loss and gradients equal those of the vocabulary without the masked columns, whose weight and
    bias gradients are exactly 0; with the soft loss and CE-only. T = 0.5: (z − m)·log2(e)/T
    overflows to −inf for a finfo.min logit. Labels never point at a masked column."""
    base = small_problem(seed=13)
    base = dataclasses.replace(base, labels=jnp.where(jnp.isin(base.labels, MASKED), 3, base.labels))
    p = mask_heads(base, mask)
    short, kept = truncate(base)
    for soft_weight, hard_weight in ((1.0, 0.5), (0.0, 1.0)):
        options = dict(beta=beta, temperature=0.5, soft_weight=soft_weight, hard_weight=hard_weight)
        want_loss, want_grads = ld_loss_and_grads(short, **options)
        loss, (g_x, g_w, g_b) = value_and_grads(_loss_fn(impl), p, **options)
        assert_matches(loss, (g_x, g_w[:, kept], g_b[kept]), want_loss, want_grads)
        assert not np.any(np.asarray(g_w)[:, MASKED]) and not np.any(np.asarray(g_b)[MASKED])


ONE_SIDED = {
    "teacher-masked-fwdKL": ("teacher", 0.0, "finite"),  # P = 0 where masked: finite
    "teacher-masked-jsd0.3": ("teacher", 0.3, "finite"),
    "student-masked-jsd0.3": ("student", 0.3, "finite"),
    "student-masked-revKL": ("student", 1.0, "finite"),  # Q = 0 where masked: finite
    "teacher-masked-revKL": ("teacher", 1.0, "inf"),  # Q > 0 where P = 0: KL(Q‖P) = +inf
    "student-masked-fwdKL": ("student", 0.0, "inf"),  # P > 0 where Q = 0: KL(P‖Q) = +inf
}


@pytest.mark.parametrize("impl", IMPLEMENTATIONS)
@pytest.mark.parametrize("side, beta, expect", ONE_SIDED.values(), ids=ONE_SIDED.keys())
def test_columns_masked_in_one_head(impl, side, beta, expect):
    """Finite where the math is finite (matching the oracle), +inf (not NaN) where it is +inf."""
    base = small_problem(seed=14)
    base = dataclasses.replace(base, labels=jnp.where(jnp.isin(base.labels, MASKED), 3, base.labels))
    p = mask_heads(base, -np.inf, student=side == "student", teacher=side == "teacher")
    options = dict(beta=beta, temperature=0.5, hard_weight=0.5)
    if expect == "inf":
        loss = _loss_fn(impl)(*_arrays(p), student_bias=p.student_bias, teacher_bias=p.teacher_bias, **options)
        assert float(loss) == np.inf
        return
    want_loss, want_grads = ld_loss_and_grads(p, **options)
    loss, grads = value_and_grads(_loss_fn(impl), p, **options)
    assert_matches(loss, grads, want_loss, want_grads)


def _arrays(p):
    return p.student_hidden, p.student_weight, p.teacher_hidden, p.teacher_weight, p.labels


# --- item 5: float16 dlogits are scaled before they are rounded -------------------------------------


@pytest.mark.parametrize("impl", IMPLEMENTATIONS)
def test_float16_gradients_do_not_overflow(impl):
    """Reverse KL at T = 0.25 with a teacher logit gap of 3e4 and student hidden states of 1e-3:
    the unscaled dlogits (≈ 1e5 in the teacher's column) overflow float16, the scaled ones (÷ N)
    do not. (No student bias: its gradient, the mean of those dlogits, is itself past float16.)"""
    n, hidden, vocab = 16, 4, 5
    k = jax.random.split(jax.random.key(0), 5)
    p = make_problem(n=n, hs=hidden, ht=hidden, vocab=vocab, ignored_fraction=0.0, bias=False, seed=0)
    p = dataclasses.replace(
        p,
        student_hidden=1e-3 * jax.random.normal(k[0], (n, hidden)),
        student_weight=jax.random.normal(k[1], (hidden, vocab)),
        teacher_hidden=jax.random.normal(k[2], (n, hidden)),
        teacher_weight=jax.random.normal(k[3], (hidden, vocab)),
        student_bias=None,
        teacher_bias=jnp.zeros((vocab,)).at[0].set(3e4),
        labels=jax.random.randint(k[4], (n,), 0, vocab),
    ).astype(jnp.float16)
    options = dict(beta=1.0, temperature=0.25)
    want_loss, want_grads = ld_loss_and_grads(p, **options)
    loss, grads = value_and_grads(_loss_fn(impl), p, **options)
    assert grads[0].dtype == grads[1].dtype == jnp.float16
    assert_matches(loss, grads, want_loss, want_grads, grad_rtol=FLOAT16_ROUNDINGS)


# --- item 6: reverse KL with a near one-hot teacher at low T ----------------------------------------

# (teacher logit gap, logit scale): the gap grows 100×; at scale 3 more rows are near one-hot.
GAPS = {"gap3e2": (3e2, 1.0), "gap3e3": (3e3, 1.0), "gap3e4": (3e4, 1.0), "gap3e4-scale3": (3e4, 3.0)}


def gap_rows(gap, scale, seed=1):
    """8 rows × 1000 columns of std ≈ ``scale`` (row 1 ignored), teacher logit ``gap`` in column 7."""
    student, teacher, labels = make_rows(8, 1000, scale=scale, seed=seed)
    return student, teacher.at[:, 7].set(gap), labels


@pytest.mark.parametrize("gap, scale", GAPS.values(), ids=GAPS.keys())
def test_reverse_kl_kernel_error_does_not_grow_with_the_teacher_gap(gap, scale):
    """T = 0.05, KL ≈ gap/T ≈ 6e5 at gap 3e4: the kernel's dlogits stay within 1e-5 of the largest
    entry (it was 1.8 % off: Q ⊙ (log Q − log P − KL) cancelled at the student's arg-max)."""
    student, teacher, labels = gap_rows(gap, scale)
    config = RowKernelConfig(block_v=256, num_warps=4, num_stages=1)  # 4 tiles: the pivot moves
    got = distill_rows_pallas(
        student, teacher, labels, row_hyper(1.0, 0.05, 1.0, 0.0), dlogits_dtype=jnp.float32, config=config
    )
    want = ld_rows(student, teacher, labels, 1.0, 0.05)
    np.testing.assert_allclose(np.asarray(got[0], np.float64), want[0].astype(np.float64), rtol=LOSS_RTOL)
    assert max_error(got[2], want[2]) <= 1e-5 * float(np.max(np.abs(want[2].astype(np.float64))))


@pytest.mark.parametrize("gap, scale", GAPS.values(), ids=GAPS.keys())
def test_reverse_kl_xla_error_bound_with_a_teacher_gap(gap, scale):
    """The XLA path stores logits relative to their row maxima in float32 (stage 1), so each
    z_t − max z_t is rounded to ε·gap: the pinned bound per row r is

        max_j |dlogits error| ≤ 1e-5·max |dlogits| + ε·(range z_t,r / T)·(soft_weight / T)·(1 − max_j Q_rj),

    which vanishes as the student becomes one-hot (the plain form was off by ε·KL·w/T exactly
    there: up to 3.7e5 times this bound)."""
    student, teacher, labels = gap_rows(gap, scale)
    temperature = 0.05
    _, _, got = rowmath.distill_rows(
        student, teacher, labels, row_hyper(1.0, temperature, 1.0, 0.0), dlogits_dtype=jnp.float32
    )
    soft, _, want = ld_rows(student, teacher, labels, 1.0, temperature)
    want = want.astype(np.float64)
    q = np.exp(_log_softmax(np.asarray(student, LD) / LD(temperature))).astype(np.float64)
    t = np.asarray(teacher, np.float64)
    unit = EPS32 * (t.max(1) - t.min(1)) / temperature / temperature * (1 - q.max(1))
    errors = np.max(np.abs(np.asarray(got, np.float64) - want), axis=1)
    bound = 1e-5 * np.max(np.abs(want)) + unit
    assert np.all(errors <= bound), (errors / bound).max()


def test_reverse_kl_near_one_hot_teacher_end_to_end_on_the_pallas_path():
    """The whole loss (Pallas path) with a teacher logit of 3e4 at T = 0.05, students near one-hot
    (logits of std 3): float32 accuracy (the kernel's gradients were 0.3 % off)."""
    p = make_problem(n=16, vocab=123, logit_scale=3.0, ignored_fraction=0.0, seed=0)
    p = dataclasses.replace(p, teacher_bias=p.teacher_bias.at[7].set(3e4))
    options = dict(beta=1.0, temperature=0.05)
    want_loss, want_grads = ld_loss_and_grads(p, **options)
    loss, grads = value_and_grads(_loss_fn("pallas"), p, **options)
    assert_matches(loss, grads, want_loss, want_grads)


# --- row level: the kernel with the exact branch and 1 − β --------------------------------------------


@pytest.mark.parametrize("beta", [1 - 1e-8, 1e-6, 1 - 1e-6], ids=lambda b: f"beta={b:.8g}")
def test_kernel_with_exact_branch_and_one_minus_beta(beta):
    """The row kernel given ``row_hyper(..., one_minus_beta=exact, branch=MIXTURE_JSD)``."""
    student, teacher, labels = make_rows(5, 300, scale=2.0, seed=3)
    hyper = row_hyper(beta, 4.0, 1.0, 0.3, one_minus_beta=1.0 - beta, branch=MIXTURE_JSD)
    soft, hard, dlogits = distill_rows_pallas(student, teacher, labels, hyper, dlogits_dtype=jnp.float32)
    want = ld_rows(student, teacher, labels, beta, 4.0, 1.0, 0.3)
    np.testing.assert_allclose(np.asarray(soft, np.float64), want[0].astype(np.float64), rtol=LOSS_RTOL)
    assert max_error(dlogits, want[2]) <= 1e-5 * float(np.max(np.abs(want[2].astype(np.float64))))


# --- item 7: the Pallas path inside shard_map(check_vma=True) --------------------------------------

ABSTRACT_GPUS = AbstractMesh(
    (4,), ("data",), (AxisType.Explicit,), abstract_device=AbstractDevice("NVIDIA H100 80GB HBM3", 4, "cuda")
)


def _abstract(shape, dtype, spec=None):
    """A ShapeDtypeStruct on the abstract mesh, rows sharded over "data" unless ``spec`` says otherwise."""
    return jax.ShapeDtypeStruct(
        shape, dtype, sharding=NamedSharding(ABSTRACT_GPUS, P("data") if spec is None else spec)
    )


def test_row_kernel_lowers_inside_shard_map_with_check_vma():
    """The kernel's outputs vary over the mesh axes of its inputs (``manual_axis_type`` on its
    out_shape): without it, pallas_call raises "manual_axis_type ... must not be None"."""

    def local(s, t, y, h):
        return distill_rows_pallas(s, t, y, h, dlogits_dtype=jnp.bfloat16, interpret=False)

    mapped = jax.shard_map(local, mesh=ABSTRACT_GPUS, in_specs=(P("data"),) * 3 + (P(),), out_specs=(P("data"),) * 3)
    logits = _abstract((16, 1000), jnp.float32)
    with use_abstract_mesh(ABSTRACT_GPUS):
        args = (logits, logits, _abstract((16,), jnp.int32), _abstract((6,), jnp.float32, P()))
        text = jax.jit(mapped).trace(*args).lower().as_text()
    assert text.count("__gpu$xla.gpu.triton") == 1


def test_pallas_loss_and_grads_lower_inside_shard_map_with_check_vma(monkeypatch):
    """The whole Pallas path (kernel compiled for the GPU, as on a GPU backend), value and
    gradients, inside shard_map with the default check_vma=True, traced on an abstract 4-GPU mesh."""
    monkeypatch.setattr(jax, "default_backend", lambda: "gpu")  # FusedPlan: no interpret mode
    n, hs, ht, vocab = 32, 16, 24, 257

    def local(xs, ws, xt, wt, labels):
        return jax.lax.psum(
            fused_linear_jsd_loss(
                xs,
                ws,
                xt,
                wt,
                labels,
                beta=0.3,
                hard_weight=0.5,
                chunk_size=4,
                axis_name="data",
                implementation="pallas",
            ),
            "data",
        )

    specs = (P("data"), P(), P("data"), P(), P("data"))
    mapped = jax.shard_map(local, mesh=ABSTRACT_GPUS, in_specs=specs, out_specs=P())
    step = jax.jit(jax.value_and_grad(mapped, argnums=(0, 1)))
    with use_abstract_mesh(ABSTRACT_GPUS):
        args = (
            _abstract((n, hs), jnp.float32),
            _abstract((hs, vocab), jnp.float32, P()),
            _abstract((n, ht), jnp.float32),
            _abstract((ht, vocab), jnp.float32, P()),
            _abstract((n,), jnp.int32),
        )
        text = step.trace(*args).lower().as_text()
    assert text.count("__gpu$xla.gpu.triton") == 1


def test_pallas_path_in_shard_map_equals_one_device():
    """At run time on 4 simulated CPU devices the kernel runs in interpret mode, which JAX 0.10.2
    cannot evaluate under check_vma=True (its HLO interpreter binds the kernel's primitives on
    values typed as varying next to its own unvarying constants: "Primitive min requires varying
    manual axes to match"; under a nested check_vma=False shard_map its while loop then rejects
    the carry, typed varying in and unvarying out). So the run uses check_vma=False; the two
    tests above cover check_vma=True up to the compiled kernel, and test_kernel_gpu.py runs it."""
    proc = run_python("tests/shard_map_vma_worker.py", "pallas", "no-check-vma", devices=4)
    assert proc.returncode == 0, proc.stderr[-6000:]
    result = last_json_line(proc.stdout)
    assert (result["devices"], result["implementation"], result["check_vma"]) == (4, "pallas", False)
    whole, sharded = result["loss"]
    assert sharded == pytest.approx(whole, rel=1e-6)
    assert max(result["grad_rel_diff"]) < 1e-5, result["grad_rel_diff"]


# --- item 8: second derivatives ---------------------------------------------------------------------


@pytest.mark.parametrize("beta", [0.3, 1.0], ids=lambda b: f"beta={b}")
def test_second_derivatives_on_the_xla_path_match_the_reference(beta):
    """Grad of grad and a Hessian-vector product w.r.t. the student hidden states and weight."""
    p = make_problem(n=10, hs=6, ht=7, vocab=23, seed=16)
    options = dict(beta=beta, temperature=1.5, soft_weight=0.8, hard_weight=0.3)
    tangent = jax.random.normal(jax.random.key(1), p.student_hidden.shape)

    @functools.partial(jax.jit, static_argnums=0)
    def derivatives(loss_fn, xs, ws, xt, wt, labels, tangent):
        def loss(xs, ws):
            return loss_fn(xs, ws, xt, wt, labels, **options)

        grad = jax.grad(loss, argnums=(0, 1))
        grad_of_grad = jax.grad(lambda xs, ws: sum(jnp.sum(g**2) for g in grad(xs, ws)), argnums=(0, 1))
        hvp = jax.jvp(lambda xs: grad(xs, ws), (xs,), (tangent,))[1]
        return (*grad_of_grad(xs, ws), *hvp)

    fused_xla = functools.partial(fused_linear_jsd_loss, implementation="xla", chunk_size=4)
    got = derivatives(fused_xla, *_arrays(p), tangent)
    with jax.enable_x64(True):
        p64 = p.astype(jnp.float64)
        want = [
            np.asarray(w)
            for w in derivatives(reference.fused_linear_jsd_loss, *_arrays(p64), tangent.astype(jnp.float64))
        ]
    for g, w in zip(got, want, strict=True):
        assert max_error(g, w) <= GRAD_RTOL * float(np.max(np.abs(w)))


def test_second_derivatives_on_the_pallas_path_raise_a_clear_error():
    p = make_problem(n=6, hs=4, ht=5, vocab=11, seed=17)

    def loss(xs):
        return fused_linear_jsd_loss(
            xs, p.student_weight, p.teacher_hidden, p.teacher_weight, p.labels, implementation="pallas", chunk_size=4
        )

    first = jax.grad(loss)(p.student_hidden)  # first derivatives are the kernel's own dlogits
    want = oracle64(dataclasses.replace(p, student_bias=None, teacher_bias=None))[1][0]
    assert max_error(first, want) <= GRAD_RTOL * float(np.max(np.abs(want)))
    message = "second derivatives are not supported on the Pallas path; use implementation='xla'"
    with pytest.raises(NotImplementedError, match=message):
        jax.grad(lambda x: jnp.sum(jax.grad(loss)(x) ** 2))(p.student_hidden)
    with pytest.raises(NotImplementedError, match=message):
        jax.hessian(loss)(p.student_hidden)


# --- item 15: one place clips the labels --------------------------------------------------------------


def test_row_labels_are_clipped_in_one_place():
    """``FlatInputs.row_labels``: what the fused path and the reference read (the loss is NaN for
    a valid label outside [0, V) through ``any_bad_label``, never an out-of-bounds read)."""
    p = small_problem()
    labels = jnp.array([0, 36, -100, 37, -5, 1000] + [3] * 7)
    flat = validate_and_flatten(
        *_arrays(p)[:4],
        labels,
        student_bias=None,
        teacher_bias=None,
        beta=0.5,
        temperature=1.0,
        soft_weight=1.0,
        hard_weight=0.0,
        ignore_index=-100,
        where=jnp.arange(13) != 12,
        reduction="mean",
    )
    np.testing.assert_array_equal(np.asarray(flat.row_labels()), [0, 36, -1, 36, 0, 36] + [3] * 6 + [-1])
    assert bool(flat.any_bad_label())


def test_kernel_hyper_carries_the_exact_branch():
    for beta, branch in ((1 - 1e-8, MIXTURE_JSD), (1e-40, MIXTURE_JSD), (1.0, REVERSE_KL), (0.0, 0)):
        hyper = fused._hyper(beta, 2.0, 1.0, 0.5, 0.25)
        got = np.asarray(rowmath.kernel_hyper(hyper, fused.divergence_of(beta)))
        np.testing.assert_array_equal(got[[1, 2, 3, 4, 5]], np.float32([1.0 - beta, 2.0, 0.25, 0.125, branch]))
