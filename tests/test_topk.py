"""The offline-teacher loss (cached top-k teacher log-probs) and ``teacher_topk`` against the float64 oracle.

``fused_linear_topk_distill_loss`` is checked against ``topk_oracle.topk_distill_loss`` evaluated
in float64 (its gradients by autodiff), with the float32 budgets of the dense loss
(``test_fused.py``): 1e-5 relative on the loss, 1e-4 relative to the largest entry on each
gradient. V = 151 is prime: no block size divides it. ``teacher_topk`` is checked against
lax.top_k of the full log_softmax(z_t/T). The shard_map test runs this file as a worker
(``python tests/test_topk.py shard-map``) with 2 simulated CPU devices.
"""

from __future__ import annotations

import dataclasses
import functools
import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from topk_oracle import (
    TopKProblem,
    assert_topk_matches,
    compile_cached,
    full_teacher_logprobs64,
    lax_topk_f32,
    make_topk_problem,
    oracle64,
)

import jaxdistill
from jaxdistill import fused_linear_topk_distill_loss, teacher_topk

F32_LOSS_RTOL = 1e-5
F32_GRAD_RTOL = 1e-4
VOCAB = 151
TEMPERATURE = 2.0
GRAD_NAMES = ("student_hidden", "student_weight", "student_bias")


def relative_error(actual, expected) -> float:
    """max |actual − expected| / max(max |expected|, tiny), in float64 (as in helpers.py)."""
    actual = np.asarray(jnp.asarray(actual, jnp.float32), np.float64)
    expected = np.asarray(expected, np.float64)
    return float(np.max(np.abs(actual - expected)) / max(np.max(np.abs(expected)), 1e-30))


HYPER = ("beta", "temperature", "soft_weight", "hard_weight")


DEFAULTS = dict(implementation="xla", chunk_size=8, tail="bucket", reduction="mean")


_COMPILED: dict = {}


def _value_and_grads(xs, ws, bs, ids, logprobs, labels, where, cotangent, traced, *, static):
    def scalar(xs, ws, bs):
        loss = fused_linear_topk_distill_loss(
            xs, ws, ids, logprobs, labels, student_bias=bs, where=where, **dict(static), **traced
        )
        return cotangent * loss

    return jax.value_and_grad(scalar, argnums=(0, 1, 2))(xs, ws, bs)


def fused_value_and_grads(p: TopKProblem, cotangent=1.0, *, where=None, traced_hyper=False, **options):
    """The fused loss and its gradients w.r.t. the student arguments, jitted.

    Compiled once per shapes and options (``compile_cached``: the same HLO, without LLVM's
    optimizations on CPU, for compile time). ``traced_hyper``: β, T and the weights are traced
    arguments (β's branch then chosen at run time), so problems of one shape share a compile
    whatever their values.
    """
    options = DEFAULTS | options
    traced = {name: jnp.float32(options.pop(name)) for name in HYPER if traced_hyper and name in options}
    args = (
        p.student_hidden,
        p.student_weight,
        p.student_bias,
        p.teacher_ids,
        p.teacher_logprobs,
        p.labels,
        where,
        jnp.float32(cotangent),
        traced,
    )
    return compile_cached(_COMPILED, _value_and_grads, tuple(sorted(options.items())), *args)


def check_f32(p: TopKProblem, *, cotangent=1.0, implementation="xla", chunk_size=8, traced_hyper=False, **options):
    """Loss within 1e-5 and gradients within 1e-4 of the float64 oracle."""
    loss, grads = fused_value_and_grads(
        p, cotangent, implementation=implementation, chunk_size=chunk_size, traced_hyper=traced_hyper, **options
    )
    want = oracle64(p, cotangent, **options)
    assert np.isfinite(want.loss)
    assert loss.dtype == jnp.float32
    assert np.isfinite(float(loss)), float(loss)
    np.testing.assert_allclose(float(loss), want.loss, rtol=F32_LOSS_RTOL, atol=1e-7)
    for name, got, w in zip(GRAD_NAMES, grads, want.grads, strict=True):
        if w is None:
            assert got is None, name
            continue
        assert got.dtype == jnp.float32 and got.shape == w.shape, name
        err = relative_error(got, w)
        assert err < F32_GRAD_RTOL, (name, err)
    return want


# --- accuracy against the oracle -------------------------------------------------------------------

# (k, tail, β) with β known at trace time: every (tail, β) at k = 7.
XLA_CASES = [(7, tail, beta) for tail in ("bucket", "renormalize") for beta in (0.0, 0.5, 1.0)]
# k = 1 and k = 64: β traced, so one compile covers β ∈ {0, 0.5, 1}.
XLA_K_CASES = [(1, "bucket"), (64, "bucket"), (64, "renormalize")]
PALLAS_CASES = [(7, "bucket", 0.0), (64, "bucket", 0.5), (7, "renormalize", 1.0)]


def case_id(case):
    k, tail, beta = case
    return f"k={k}-{tail}-beta={beta}"


def standard_problem(seed, **overrides) -> TopKProblem:
    """29 rows (chunks of 8: a ragged last one), H = 16, V = 151, k = 7, T = 2, 20 % ignored.

    The tests below that pass traced hyper-parameters all use this shape, so they share compiles.
    """
    return make_topk_problem(**dict(n=29, vocab=VOCAB, k=7, temperature=TEMPERATURE, seed=seed) | overrides)


@pytest.mark.parametrize("case", XLA_CASES, ids=case_id)
def test_xla_matches_oracle(case):
    """β known at trace time, T = 2, soft and hard parts, ignored rows, a ragged last chunk."""
    k, tail, beta = case
    p = standard_problem(seed=k, k=k)
    assert 0 < int(np.sum(p.valid)) < 29
    check_f32(p, beta=beta, temperature=TEMPERATURE, soft_weight=0.8, hard_weight=0.3, tail=tail)


@pytest.mark.parametrize("k, tail", XLA_K_CASES, ids=lambda x: str(x))
def test_xla_matches_oracle_other_k(k, tail):
    p = standard_problem(seed=k, k=k)
    for beta in (0.0, 0.5, 1.0):
        check_f32(p, beta=beta, temperature=TEMPERATURE, soft_weight=0.8, hard_weight=0.3, tail=tail, traced_hyper=True)


@pytest.mark.parametrize("case", PALLAS_CASES, ids=case_id)
def test_pallas_matches_oracle(case):
    """The Pallas path (interpret mode off-GPU): 11 rows in chunks of 4. The ignored rows hold
    garbage ids and log-probs (out of range, repeated, NaN), which must not be read."""
    k, tail, beta = case
    p = make_topk_problem(n=11, hs=8, vocab=VOCAB, k=k, temperature=TEMPERATURE, ignored_fraction=0.3, seed=10 + k)
    assert 0 < int(np.sum(p.valid)) < 11
    p = garbage_in_rows(p, np.flatnonzero(~p.valid))
    options = dict(beta=beta, temperature=TEMPERATURE, soft_weight=0.8, hard_weight=0.4, tail=tail)
    check_f32(p, implementation="pallas", chunk_size=4, **options)


def concentrated_student(p: TopKProblem, q_tail: float, seed=0) -> TopKProblem:
    """``p`` with every row caching the same k ids S (random; each row's teacher log-probs of
    them, descending) and the student's bias raising S by T·log((V − k)/(k·q_tail)): all but about
    ``q_tail`` of each row's Q = softmax(z_s/T) lies on its ids, while the teacher's tail keeps
    most of P. Shapes and dtypes are ``p``'s."""
    k = p.teacher_ids.shape[-1]
    vocab = p.student_weight.shape[1]
    ids = np.random.default_rng(seed).choice(vocab, k, replace=False)
    full = full_teacher_logprobs64(p.teacher_hidden, p.teacher_weight, p.teacher_bias, p.temperature)
    order = np.argsort(-full[:, ids], axis=-1, kind="stable")
    row_ids = ids[order]
    boost = np.zeros(vocab, np.float32)
    boost[ids] = p.temperature * np.log((vocab - k) / (k * q_tail))
    return dataclasses.replace(
        p,
        student_bias=p.student_bias + boost,
        teacher_ids=jnp.asarray(row_ids, jnp.int32),
        teacher_logprobs=jnp.asarray(np.take_along_axis(full, row_ids, axis=-1), jnp.float32),
    )


@pytest.mark.parametrize("implementation", ["xla", "pallas"])
def test_student_mass_almost_all_on_the_ids_keeps_the_tail_bucket_accurate(implementation):
    """Q_tail ≈ 1e-7 against a teacher tail P_tail > 0.5, forward KL: the loss is dominated by
    P_tail·log(P_tail/Q_tail), so Q_tail must not come from 1 − Σ Q_ids (float32 cancellation:
    an O(1) error on log Q_tail) but from the tail's own sum. Same shapes and options as the
    (k = 7, bucket, β = 0) grid cases above."""
    if implementation == "pallas":
        base = make_topk_problem(n=11, hs=8, vocab=VOCAB, k=7, temperature=TEMPERATURE, ignored_fraction=0.3, seed=5)
        options = dict(implementation="pallas", chunk_size=4, hard_weight=0.4)
    else:
        base, options = standard_problem(seed=5), dict(hard_weight=0.3)
    p = concentrated_student(base, q_tail=1e-7)
    z = np.asarray(p.student_hidden, np.float64) @ np.asarray(p.student_weight, np.float64)
    z = (z + np.asarray(p.student_bias, np.float64)) / p.temperature
    q = np.exp(z - z.max(-1, keepdims=True))
    q /= q.sum(-1, keepdims=True)
    in_ids = np.zeros(z.shape, bool)
    np.put_along_axis(in_ids, np.asarray(p.teacher_ids, np.int64), True, axis=-1)
    q_tail = np.sum(np.where(in_ids, 0.0, q), axis=-1)
    assert 1e-8 < q_tail.min() and q_tail.max() < 1e-6, (q_tail.min(), q_tail.max())
    assert np.min(1 - np.sum(np.exp(np.asarray(p.teacher_logprobs, np.float64)), -1)) > 0.5
    want = check_f32(p, beta=0.0, temperature=TEMPERATURE, soft_weight=0.8, tail="bucket", **options)
    assert want.aux["soft_loss"] > 5.0  # the tail term dominates


# The next tests pass β, T and the weights traced (standard_problem's shape): one compile per tail.
EDGE = dict(temperature=TEMPERATURE, hard_weight=0.3, traced_hyper=True)


@pytest.mark.parametrize("label_in_ids", [True, False], ids=["label-in-ids", "label-not-in-ids"])
def test_label_inside_or_outside_the_ids(label_in_ids):
    p = standard_problem(seed=3, label_in_ids=label_in_ids)
    check_f32(p, beta=0.3, **EDGE)


@pytest.mark.parametrize("tail", ["bucket", "renormalize"])
def test_zero_probability_teacher_entries(tail):
    """−inf log-probs (a teacher that cached fewer than k entries) contribute 0; finite gradients."""
    p = standard_problem(seed=6, neg_inf_entries=2)
    for beta in (0.0, 0.5):
        check_f32(p, beta=beta, tail=tail, **EDGE)


def test_teacher_mass_summing_past_one_gives_an_empty_tail_bucket():
    """Σ P_i rounds above 1: P_tail = max(0, 1 − Σ P_i) = 0, a bucket of probability 0 (no NaN)."""
    p = standard_problem(seed=7)
    w = np.random.default_rng(7).dirichlet(np.ones(7), size=29)
    logprobs = np.sort(np.log(w), axis=-1)[:, ::-1] + 1e-6  # Σ exp = 1 + 1e-6
    p = dataclasses.replace(p, teacher_logprobs=jnp.asarray(logprobs, jnp.float32))
    assert np.all(np.sum(np.exp(np.asarray(p.teacher_logprobs, np.float64)), -1) > 1)
    for beta in (0.0, 0.5):
        check_f32(p, beta=beta, tail="bucket", **EDGE)


def test_cotangent_sum_reduction_and_where():
    p = standard_problem(seed=8)
    where = jnp.arange(29) % 3 != 0
    check_f32(p, cotangent=-3.7, where=where, beta=0.5, reduction="sum", **EDGE)


@pytest.mark.parametrize("reduction", ["mean", "sum"])
def test_all_rows_ignored_gives_zero_loss_and_gradients(reduction):
    p = standard_problem(seed=13, ignored_fraction=1.0)
    loss, grads = fused_value_and_grads(
        p, beta=0.5, temperature=TEMPERATURE, hard_weight=1.0, reduction=reduction, traced_hyper=True, chunk_size=8
    )
    assert float(loss) == 0.0
    for g in grads:
        assert bool(jnp.all(g == 0))


def test_leading_dims_vocab_major_weight_and_no_bias():
    """(3, 7, H) hidden states with (3, 7, k) ids, a (V, H) student weight, no bias: the gradient
    comes back in the weight's (V, H) layout."""
    p = make_topk_problem(vocab=VOCAB, k=7, temperature=2.0, lead_shape=(3, 7), bias=False, seed=9)
    options = dict(beta=0.5, temperature=2.0, hard_weight=0.5, tail="bucket")

    def f(xs, ws):
        return fused_linear_topk_distill_loss(
            xs, ws, p.teacher_ids, p.teacher_logprobs, p.labels, chunk_size=8, student_weight_layout="vh", **options
        )

    loss, (g_x, g_w) = jax.jit(jax.value_and_grad(f, argnums=(0, 1)))(p.student_hidden, p.student_weight.T)
    want = oracle64(p, **options)
    np.testing.assert_allclose(float(loss), want.loss, rtol=F32_LOSS_RTOL, atol=1e-7)
    assert g_x.shape == p.student_hidden.shape and g_w.shape == (VOCAB, 16)
    assert relative_error(g_x, want.grads[0]) < F32_GRAD_RTOL
    assert relative_error(g_w.T, want.grads[1]) < F32_GRAD_RTOL


def dense_loss_numpy(p: TopKProblem, beta, temperature, hard_weight):
    """The dense loss against the teacher head (0 < β < 1), from the definitions in numpy float64."""
    f64 = lambda x: np.asarray(x, np.float64)  # noqa: E731
    z_s = f64(p.student_hidden) @ f64(p.student_weight) + f64(p.student_bias)
    z_t = f64(p.teacher_hidden) @ f64(p.teacher_weight) + f64(p.teacher_bias)

    def log_softmax(z):
        z = z - z.max(-1, keepdims=True)
        return z - np.log(np.exp(z).sum(-1, keepdims=True))

    log_q, log_p = log_softmax(z_s / temperature), log_softmax(z_t / temperature)
    q, pt = np.exp(log_q), np.exp(log_p)
    log_m = np.log(beta * pt + (1 - beta) * q)
    soft = beta * np.sum(pt * (log_p - log_m), -1) + (1 - beta) * np.sum(q * (log_q - log_m), -1)
    valid = p.valid
    labels = np.where(valid, np.asarray(p.labels), 0)
    hard = -np.take_along_axis(log_softmax(z_s), labels[:, None], -1)[:, 0]
    return float(np.sum(np.where(valid, soft + hard_weight * hard, 0)) / max(1, valid.sum()))


def test_whole_vocabulary_cached_equals_the_dense_loss():
    """With every column but one cached, the tail bucket is that column: the top-k loss is the
    dense loss against the teacher head."""
    vocab = 41
    options = dict(beta=0.5, temperature=2.0, hard_weight=0.3)
    p = make_topk_problem(n=13, vocab=vocab, k=vocab - 1, temperature=2.0, seed=10)
    want = check_f32(p, tail="bucket", chunk_size=4, **options)
    np.testing.assert_allclose(want.loss, dense_loss_numpy(p, **options), rtol=1e-6)  # the oracle itself


def test_golden_values_against_numpy():
    """2 rows × 5 classes, identity head, k = 2, computed in numpy from the definitions."""
    z_s = np.array([[1.0, -2.0, 0.5, 3.0, 0.0], [0.2, 0.1, -1.0, 2.0, -0.5]])
    ids = np.array([[2, 3], [3, 0]])
    p_ids = np.array([[0.5, 0.3], [0.6, 0.25]])
    temperature = 2.0
    q = np.exp(z_s / temperature)
    q /= q.sum(axis=1, keepdims=True)
    q_ids = np.take_along_axis(q, ids, axis=1)
    buckets = (
        np.concatenate([p_ids, 1 - p_ids.sum(1, keepdims=True)], 1),
        np.concatenate([q_ids, 1 - q_ids.sum(1, keepdims=True)], 1),
    )
    renormalized = (p_ids / p_ids.sum(1, keepdims=True), q_ids / q_ids.sum(1, keepdims=True))

    def kl(a, b):
        return np.sum(a * np.log(a / b), axis=1)

    def jsd(p, q, beta):
        if beta == 0:
            return kl(p, q)
        if beta == 1:
            return kl(q, p)
        m = beta * p + (1 - beta) * q
        return beta * kl(p, m) + (1 - beta) * kl(q, m)

    p = TopKProblem(
        student_hidden=jnp.asarray(z_s, jnp.float32),
        student_weight=jnp.eye(5, dtype=jnp.float32),
        student_bias=None,
        teacher_ids=jnp.asarray(ids, jnp.int32),
        teacher_logprobs=jnp.asarray(np.log(p_ids), jnp.float32),
        labels=jnp.array([0, 3]),
        teacher_hidden=None,
        teacher_weight=None,
        teacher_bias=None,
        temperature=temperature,
    )
    for tail, (pp, qq) in (("bucket", buckets), ("renormalize", renormalized)):
        for beta in (0.0, 0.5, 1.0):
            want = jsd(pp, qq, beta).mean()
            options = dict(beta=beta, temperature=temperature, tail=tail)
            got, _ = fused_value_and_grads(p, chunk_size=1, traced_hyper=True, **options)
            np.testing.assert_allclose(float(got), want, rtol=1e-6, err_msg=f"{tail} beta={beta}")


# --- options, jit, gradients of the weights, aux ----------------------------------------------------


def test_jit_with_traced_hyper_parameters_does_not_recompile():
    """β, T, soft_weight and hard_weight as arguments of a jitted step: one trace, one
    executable, each value matching the oracle (β = 0 and 1 select their KL branch at run time)."""
    p = standard_problem(seed=11)
    traces = []

    @jax.jit
    def step(xs, ws, beta, temperature, soft_weight, hard_weight):
        traces.append(1)
        return jax.value_and_grad(fused_linear_topk_distill_loss, argnums=(0, 1))(
            xs,
            ws,
            p.teacher_ids,
            p.teacher_logprobs,
            p.labels,
            student_bias=p.student_bias,
            beta=beta,
            temperature=temperature,
            soft_weight=soft_weight,
            hard_weight=hard_weight,
            chunk_size=8,
            implementation="xla",
        )

    hypers = [(0.0, 2.0, 1.0, 0.0), (0.3, 1.5, 0.5, 0.5), (1.0, 0.5, 1.0, 0.1)]
    results = []
    for beta, temperature, soft_weight, hard_weight in hypers:
        loss, (g_x, g_w) = step(p.student_hidden, p.student_weight, beta, temperature, soft_weight, hard_weight)
        want = oracle64(p, beta=beta, temperature=temperature, soft_weight=soft_weight, hard_weight=hard_weight)
        np.testing.assert_allclose(float(loss), want.loss, rtol=F32_LOSS_RTOL)
        assert relative_error(g_x, want.grads[0]) < F32_GRAD_RTOL
        assert relative_error(g_w, want.grads[1]) < F32_GRAD_RTOL
        results.append(float(loss))
    assert len(traces) == 1 and step._cache_size() == 1
    assert len(set(results)) == len(hypers)


def test_return_aux_weight_gradients_and_zero_teacher_gradient():
    """aux = soft_loss, hard_loss, num_valid_tokens; d/d(soft_weight) = soft_loss and
    d/d(hard_weight) = hard_loss exactly; the teacher's log-probs get zeros; the aux parts carry no
    gradient (added to the loss, they leave the weight gradient the oracle's)."""
    p = standard_problem(seed=12)
    options = dict(beta=0.5, temperature=2.0, tail="bucket", chunk_size=7)

    def f(soft_weight, hard_weight, logprobs, ws):
        loss, aux = fused_linear_topk_distill_loss(
            p.student_hidden,
            ws,
            p.teacher_ids,
            logprobs,
            p.labels,
            student_bias=p.student_bias,
            soft_weight=soft_weight,
            hard_weight=hard_weight,
            return_aux=True,
            **options,
        )
        return loss + aux["soft_loss"] + aux["hard_loss"], (loss, aux)

    grads, (loss, aux) = jax.jit(jax.grad(f, argnums=(0, 1, 2, 3), has_aux=True))(
        0.7, 0.4, p.teacher_logprobs, p.student_weight
    )
    g_soft, g_hard, g_logprobs, g_w = grads
    want = oracle64(p, beta=0.5, temperature=2.0, soft_weight=0.7, hard_weight=0.4, tail="bucket")
    assert set(aux) == {"soft_loss", "hard_loss", "num_valid_tokens"}
    assert int(aux["num_valid_tokens"]) == int(np.sum(p.valid)) == int(want.aux["num_valid_tokens"])
    np.testing.assert_allclose(float(loss), want.loss, rtol=F32_LOSS_RTOL)
    np.testing.assert_allclose(float(aux["soft_loss"]), want.aux["soft_loss"], rtol=F32_LOSS_RTOL)
    np.testing.assert_allclose(float(aux["hard_loss"]), want.aux["hard_loss"], rtol=F32_LOSS_RTOL)
    np.testing.assert_allclose(float(g_soft), float(aux["soft_loss"]), rtol=1e-6)
    np.testing.assert_allclose(float(g_hard), float(aux["hard_loss"]), rtol=1e-6)
    assert g_logprobs.shape == p.teacher_logprobs.shape and bool(jnp.all(g_logprobs == 0))
    assert relative_error(g_w, want.grads[1]) < F32_GRAD_RTOL


# --- bad ids, ignored rows, errors ------------------------------------------------------------------


def garbage_in_rows(p: TopKProblem, rows) -> TopKProblem:
    """Out-of-range, negative and repeated ids and NaN/±inf/huge log-probs in ``rows``."""
    ids = np.array(p.teacher_ids)
    logprobs = np.array(p.teacher_logprobs)
    fills = [(10**6, np.nan), (-5, np.inf), (3, -np.inf), (VOCAB, 1e30)]
    for i, row in enumerate(rows):
        bad_id, bad_lp = fills[i % len(fills)]
        ids[row, :] = bad_id  # all equal: repeated, and out of range for most fills
        ids[row, 0] = -(10**6)
        logprobs[row, :] = bad_lp
    return dataclasses.replace(p, teacher_ids=jnp.asarray(ids), teacher_logprobs=jnp.asarray(logprobs))


def eager_loss(p: TopKProblem, where=None):
    """The loss called outside jit (concrete ids), with the options of ``EDGE`` and β = 0.5."""
    where = jnp.ones(p.labels.shape, bool) if where is None else where
    return fused_linear_topk_distill_loss(
        p.student_hidden,
        p.student_weight,
        p.teacher_ids,
        p.teacher_logprobs,
        p.labels,
        student_bias=p.student_bias,
        where=where,
        beta=0.5,
        temperature=TEMPERATURE,
        hard_weight=0.3,
    )


def test_ignored_and_masked_rows_are_not_read():
    """Rows with label = ignore_index, and rows masked by ``where``, may hold any ids and
    log-probs (out of range, repeated, NaN): the loss and gradients are the clean problem's, and
    concrete garbage there raises nothing. (The Pallas grid above has garbage in its ignored rows.)"""
    p = standard_problem(seed=14)
    where = jnp.arange(29) % 5 != 2
    masked = np.flatnonzero(~p.valid | ~np.asarray(where))
    assert len(masked) >= 6
    dirty = garbage_in_rows(p, masked)
    # Concrete ids (no jit): the repeated-ids check runs, and must skip these rows.
    eager = eager_loss(dirty, where)
    want = check_f32(dirty, where=where, beta=0.5, reduction="sum", **EDGE)  # the oracle never reads those rows
    clean = oracle64(p, where=where, beta=0.5, temperature=TEMPERATURE, hard_weight=0.3, reduction="sum")
    np.testing.assert_allclose(want.loss, clean.loss, rtol=1e-12)
    np.testing.assert_allclose(float(eager), want.loss / int(want.aux["num_valid_tokens"]), rtol=F32_LOSS_RTOL)


def test_out_of_range_id_in_a_valid_row_gives_nan():
    p = standard_problem(seed=15, ignored_fraction=0.0)
    for bad in (VOCAB, 10**6, -1):
        q = dataclasses.replace(p, teacher_ids=p.teacher_ids.at[4, 3].set(bad))
        loss, _ = fused_value_and_grads(q, beta=0.5, **EDGE, chunk_size=8)
        assert np.isnan(float(loss)), bad
    assert np.isnan(float(eager_loss(q)))


def test_repeated_ids_raise_when_concrete_and_give_nan_when_traced():
    p = standard_problem(seed=16, ignored_fraction=0.0)
    q = dataclasses.replace(p, teacher_ids=p.teacher_ids.at[6, 5].set(p.teacher_ids[6, 1]))
    with pytest.raises(ValueError, match=r"teacher_ids|repeat|duplicate"):
        eager_loss(q)
    loss, _ = fused_value_and_grads(q, beta=0.5, **EDGE, chunk_size=8)
    assert np.isnan(float(loss))
    loss, _ = fused_value_and_grads(p, beta=0.5, **EDGE, chunk_size=8)
    assert np.isfinite(float(loss))


N_BAD, K_BAD = 10, 7
BAD_INPUTS = {
    "tail-name": (dict(tail="tails"), ValueError, "tail"),
    "tail-none": (dict(tail=None), (ValueError, TypeError), "tail"),
    "float-ids": (dict(teacher_ids=jnp.zeros((N_BAD, K_BAD), jnp.float32)), TypeError, "teacher_ids"),
    "ids-leading-dims": (dict(teacher_ids=jnp.zeros((N_BAD + 1, K_BAD), jnp.int32)), ValueError, "teacher_ids"),
    "ids-rank": (dict(teacher_ids=jnp.zeros((N_BAD,), jnp.int32)), ValueError, "teacher_ids"),
    "logprobs-k": (dict(teacher_logprobs=jnp.zeros((N_BAD, K_BAD + 1), jnp.float32)), ValueError, "teacher_logprobs"),
    "logprobs-leading-dims": (
        dict(teacher_logprobs=jnp.zeros((2, N_BAD // 2, K_BAD), jnp.float32)),
        ValueError,
        "teacher_logprobs",
    ),
    "int-logprobs": (
        dict(teacher_logprobs=jnp.zeros((N_BAD, K_BAD), jnp.int32)),
        (TypeError, ValueError),
        "teacher_logprobs",
    ),
    "k-above-vocab": (
        dict(
            teacher_ids=jnp.zeros((N_BAD, VOCAB + 1), jnp.int32),
            teacher_logprobs=jnp.zeros((N_BAD, VOCAB + 1), jnp.float32),
        ),
        ValueError,
        "",
    ),
    "beta-above-1": (dict(beta=1.5), ValueError, "beta"),
    "temperature-zero": (dict(temperature=0.0), ValueError, "temperature"),
    "hidden-size": (dict(student_hidden=jnp.ones((N_BAD, 15))), ValueError, "student_hidden"),
    "labels-shape": (dict(labels=jnp.zeros((N_BAD + 1,), jnp.int32)), ValueError, "labels"),
    "reduction": (dict(reduction="avg"), ValueError, "reduction"),
    "implementation": (dict(implementation="cuda"), ValueError, "implementation"),
    "weight-layout": (dict(student_weight_layout="kv"), ValueError, "student_weight_layout"),
}
POSITIONAL = ("student_hidden", "student_weight", "teacher_ids", "teacher_logprobs", "labels")


@pytest.mark.parametrize("case", list(BAD_INPUTS), ids=list(BAD_INPUTS))
def test_bad_input_raises_at_trace_time(case):
    p = make_topk_problem(n=N_BAD, vocab=VOCAB, k=K_BAD, bias=False, seed=17)
    override, error, name = BAD_INPUTS[case]
    args = {name: getattr(p, name) for name in POSITIONAL}
    kwargs = {}
    for key, value in override.items():
        (args if key in args else kwargs)[key] = value
    with pytest.raises(error, match=name or None):
        jax.jit(lambda *a: fused_linear_topk_distill_loss(*a, **kwargs)).trace(*(args[n] for n in POSITIONAL))


# --- memory -------------------------------------------------------------------------------------------


def loss_temp_bytes(n, vocab=32000, hidden=64, k=64, chunk_size=256):
    shapes = (
        jax.ShapeDtypeStruct((n, hidden), jnp.float32),
        jax.ShapeDtypeStruct((hidden, vocab), jnp.float32),
        jax.ShapeDtypeStruct((n, k), jnp.int32),
        jax.ShapeDtypeStruct((n, k), jnp.float32),
        jax.ShapeDtypeStruct((n,), jnp.int32),
    )
    loss = functools.partial(
        fused_linear_topk_distill_loss, beta=0.5, hard_weight=0.5, chunk_size=chunk_size, implementation="xla"
    )
    compiled = jax.jit(jax.value_and_grad(loss, argnums=(0, 1))).lower(*shapes).compile()
    return compiled.memory_analysis().temp_size_in_bytes


def test_loss_temp_memory_is_bounded_by_the_chunk_not_by_n():
    small, large = loss_temp_bytes(2048), loss_temp_bytes(16384)
    full_logits_f32 = 16384 * 32000 * 4
    assert large < 1.3 * small, (small, large)
    assert large < full_logits_f32 / 4, (large, full_logits_f32)


def topk_temp_bytes(n, vocab=32000, hidden=64, k=64, chunk_size=256):
    shapes = (jax.ShapeDtypeStruct((n, hidden), jnp.float32), jax.ShapeDtypeStruct((hidden, vocab), jnp.float32))
    fn = functools.partial(teacher_topk, k=k, temperature=2.0, chunk_size=chunk_size)
    compiled = jax.jit(fn).lower(*shapes).compile()
    return compiled.memory_analysis().temp_size_in_bytes


def test_teacher_topk_temp_memory_is_bounded_by_the_chunk_not_by_n():
    """Beyond the chunk's logits, temporaries may hold the (N, k) outputs a few times, never (N, V)."""
    k = 64
    small, large = topk_temp_bytes(2048, k=k), topk_temp_bytes(16384, k=k)
    outputs_growth = (16384 - 2048) * k * 8  # int32 ids + float32 log-probs
    full_logits_f32 = 16384 * 32000 * 4
    assert large < 1.3 * small + 2 * outputs_growth, (small, large)
    assert large < full_logits_f32 / 4, (large, full_logits_f32)


# --- teacher_topk -------------------------------------------------------------------------------------

TOPK_CASES = {
    # name: (lead, k, layout, bias, temperature, chunk_size, jit)
    "hv-bias-chunk5-jit": ((23,), 7, "hv", True, 2.0, 5, True),
    "vh-lead-dims-k64": ((3, 7), 64, "vh", False, 0.7, 4, False),
    "hv-k1-default-chunk": ((9,), 1, "hv", True, 1.0, None, True),
}


@pytest.mark.parametrize("case", TOPK_CASES.values(), ids=TOPK_CASES.keys())
def test_teacher_topk_equals_lax_top_k_of_the_full_log_softmax(case):
    lead, k, layout, bias, temperature, chunk_size, use_jit = case
    p = make_topk_problem(vocab=VOCAB, k=k, temperature=temperature, lead_shape=lead, bias=bias, seed=20 + k)
    wt = p.teacher_weight if layout == "hv" else p.teacher_weight.T
    fn = functools.partial(
        teacher_topk, k=k, teacher_bias=p.teacher_bias, temperature=temperature, weight_layout=layout
    )
    if chunk_size is not None:
        fn = functools.partial(fn, chunk_size=chunk_size)
    out = (jax.jit(fn) if use_jit else fn)(p.teacher_hidden, wt)
    ids, logprobs = out
    assert out.ids is ids and out.logprobs is logprobs  # a named tuple
    assert ids.shape == logprobs.shape == lead + (k,)
    # Against float64: ids (up to near-ties) and log-probs.
    full64 = full_teacher_logprobs64(p.teacher_hidden, p.teacher_weight, p.teacher_bias, temperature)
    near_ties = assert_topk_matches(ids, logprobs, full64, k, atol=1e-5)
    # Against lax.top_k of the plain float32 full log_softmax.
    want_ids, want_logprobs = lax_topk_f32(p.teacher_hidden, wt, p.teacher_bias, temperature, k=k, layout=layout)
    np.testing.assert_allclose(np.asarray(logprobs), np.asarray(want_logprobs), rtol=F32_LOSS_RTOL, atol=1e-6)
    assert near_ties == 0  # these seeds have no near-ties: the ids are exactly lax.top_k's
    np.testing.assert_array_equal(np.asarray(ids), np.asarray(want_ids))
    np.testing.assert_array_equal(np.asarray(ids), np.asarray(p.teacher_ids))  # the generator's cached teacher


@pytest.mark.parametrize("k", [0, -1, VOCAB + 1, 2.5, True, "3", None], ids=repr)
def test_teacher_topk_bad_k(k):
    p = make_topk_problem(n=4, vocab=VOCAB, k=1, seed=30)
    with pytest.raises((ValueError, TypeError)):
        teacher_topk(p.teacher_hidden, p.teacher_weight, k)


def test_teacher_topk_k_equal_to_vocab_is_the_sorted_log_softmax():
    p = make_topk_problem(n=5, vocab=VOCAB, k=1, seed=31)
    ids, logprobs = teacher_topk(p.teacher_hidden, p.teacher_weight, VOCAB, teacher_bias=p.teacher_bias)
    full64 = full_teacher_logprobs64(p.teacher_hidden, p.teacher_weight, p.teacher_bias, 1.0)
    assert_topk_matches(ids, logprobs, full64, VOCAB, atol=1e-5)


# --- shard_map over 2 simulated devices ----------------------------------------------------------------


def test_shard_map_over_two_devices_with_axis_name():
    """Inside shard_map (check_vma=True), tokens sharded over 2 devices with 9 and 4 valid rows:
    the psum of the returned losses (and their gradients) is the single-device mean, and the
    oracle's."""
    from distill_setup import last_json_line, run_python

    proc = run_python("tests/test_topk.py", "shard-map", devices=2)
    assert proc.returncode == 0, proc.stderr[-6000:]
    result = last_json_line(proc.stdout)
    assert result["devices"] == 2
    assert result["valid_per_device"] == [9, 4]
    assert result["num_valid_tokens"] == 13
    whole, sharded = result["loss"]
    assert sharded == pytest.approx(whole, rel=1e-6)
    assert max(result["grad_rel_diff"]) < 1e-5, result["grad_rel_diff"]
    want = oracle64(shard_map_problem(), **SHARD_MAP_OPTIONS)
    assert sharded == pytest.approx(float(want.loss), rel=F32_LOSS_RTOL)


SHARD_MAP_OPTIONS = dict(beta=0.3, temperature=2.0, hard_weight=0.5, tail="bucket")


def shard_map_problem() -> TopKProblem:
    """32 rows: device 0 gets rows 0-15 (9 valid), device 1 rows 16-31 (4 valid)."""
    p = make_topk_problem(n=32, vocab=VOCAB, k=7, temperature=2.0, ignored_fraction=0.0, seed=40)
    labels = np.asarray(p.labels).copy()
    labels[np.r_[9:16, 20:32]] = -100
    return dataclasses.replace(p, labels=jnp.asarray(labels))


def shard_map_worker() -> dict:
    """The loss and gradients on one device and inside shard_map over 2 (run in a subprocess)."""
    from jax.sharding import Mesh
    from jax.sharding import PartitionSpec as P

    jax.config.update("jax_default_matmul_precision", "highest")
    p = shard_map_problem()
    options = SHARD_MAP_OPTIONS | dict(chunk_size=5, implementation="xla")

    def loss(xs, ws, bs, ids, logprobs, labels, axis_name=None):
        return fused_linear_topk_distill_loss(
            xs, ws, ids, logprobs, labels, student_bias=bs, axis_name=axis_name, return_aux=True, **options
        )

    args = (p.student_hidden, p.student_weight, p.student_bias, p.teacher_ids, p.teacher_logprobs, p.labels)
    whole_loss, whole_grads = jax.jit(jax.value_and_grad(lambda *a: loss(*a)[0], argnums=(0, 1, 2)))(*args)
    mesh = Mesh(np.array(jax.devices()), ("data",))

    def local(*a):
        value, aux = loss(*a, axis_name="data")
        return jax.lax.psum(value, "data"), aux["num_valid_tokens"]

    mapped = jax.shard_map(
        local, mesh=mesh, in_specs=(P("data"), P(), P(), P("data"), P("data"), P("data")), out_specs=(P(), P())
    )
    (sharded_loss, count), sharded_grads = jax.jit(jax.value_and_grad(mapped, argnums=(0, 1, 2), has_aux=True))(*args)
    labels = np.asarray(p.labels)
    return {
        "devices": len(jax.devices()),
        "valid_per_device": [int(np.sum(labels[:16] != -100)), int(np.sum(labels[16:] != -100))],
        "num_valid_tokens": int(count),
        "loss": [float(whole_loss), float(sharded_loss)],
        "grad_rel_diff": [relative_error(a, b) for a, b in zip(sharded_grads, whole_grads, strict=True)],
    }


if __name__ == "__main__":
    import sys

    if sys.argv[1:] == ["shard-map"]:
        print(json.dumps(shard_map_worker()))
    else:
        raise SystemExit(f"usage: {sys.argv[0]} shard-map")


@pytest.mark.parametrize("implementation", ["xla", "pallas"])
@pytest.mark.parametrize("beta", [0.0, 0.5])
def test_bucket_with_k_equal_to_v_is_the_dense_loss(beta, implementation):
    """k = V: no tail bucket (the teacher's 1 − Σ P is only the rounding of its float32
    log-probs, which an empty student tail would make an infinite KL): the dense loss."""
    keys = jax.random.split(jax.random.key(3), 5)
    vocab = 64
    xs, ws = jax.random.normal(keys[0], (12, 16)), jax.random.normal(keys[1], (16, vocab)) / 2
    xt, wt = jax.random.normal(keys[2], (12, 24)), jax.random.normal(keys[3], (24, vocab)) / 2
    labels = jax.random.randint(keys[4], (12,), 0, vocab)
    cache = jaxdistill.teacher_topk(xt, wt, vocab, temperature=2.0)
    options = dict(beta=beta, temperature=2.0, hard_weight=0.3)

    def topk(xs, ws):
        return jaxdistill.fused_linear_topk_distill_loss(
            xs, ws, cache.ids, cache.logprobs, labels, implementation=implementation, chunk_size=5, **options
        )

    def dense(xs, ws):
        return jaxdistill.fused_linear_jsd_loss(xs, ws, xt, wt, labels, implementation="xla", **options)

    got, got_grads = jax.value_and_grad(topk, argnums=(0, 1))(xs, ws)
    want, want_grads = jax.value_and_grad(dense, argnums=(0, 1))(xs, ws)
    np.testing.assert_allclose(float(got), float(want), rtol=1e-5)
    for g, w in zip(got_grads, want_grads, strict=True):
        assert float(jnp.max(jnp.abs(g - w)) / jnp.max(jnp.abs(w))) < 1e-4


def _confident_teacher_cache(k=4, vocab=50, seed=2):
    """Rows 0–2 keep a tail of at least 1e-3; rows 3–5 hold all of P on their ids (their log-probs
    renormalized over the k ids), so 1 − Σ P of the float32 cache is rounding there (±1e-7). (A
    tail between the two, e.g. 1e-5, is ill-conditioned at β = 1: KL(Q̃‖P̃) moves by Q̃_tail/P̃_tail
    per unit of P̃_tail, and float32 resolves 1 − Σ P only to about 1e-7.)"""
    r = np.random.default_rng(seed)
    xt = jnp.asarray(r.normal(size=(6, 8)), jnp.float32)
    wt = jnp.asarray(r.normal(size=(8, vocab)), jnp.float32)
    cache = teacher_topk(xt, wt, k)
    logprobs = cache.logprobs.at[3:].set(jax.nn.log_softmax(cache.logprobs[3:], axis=-1))
    return cache._replace(logprobs=logprobs)


@pytest.mark.parametrize("implementation", ["xla", "pallas"])
@pytest.mark.parametrize("beta", [0.0, 0.5, 1.0])
def test_a_rounding_level_teacher_tail_keeps_the_loss_finite(beta, implementation):
    """Reverse KL against a teacher tail that rounds to 0 (or below) would be +inf; the tail is
    taken at its rounding resolution δ_k, and the loss and gradients are finite and match the
    oracle (which states the same rule)."""
    cache = _confident_teacher_cache()
    vocab = 50
    tail = -np.expm1(np.asarray(jax.nn.logsumexp(cache.logprobs, axis=-1), np.float64))
    assert np.all(np.abs(tail[3:]) <= (4 + 1) * 2.0**-23) and np.all(tail[:3] > 1e-3), tail
    xs = jnp.asarray(np.random.default_rng(3).normal(size=(6, vocab)), jnp.float32)
    labels = jnp.arange(6, dtype=jnp.int32)
    p = TopKProblem(
        student_hidden=xs,
        student_weight=jnp.eye(vocab, dtype=jnp.float32),
        student_bias=None,
        teacher_ids=cache.ids,
        teacher_logprobs=cache.logprobs,
        labels=labels,
        teacher_hidden=None,
        teacher_weight=None,
        teacher_bias=None,
        temperature=1.0,
    )
    want = check_f32(p, beta=beta, tail="bucket", implementation=implementation, chunk_size=4)
    assert np.isfinite(want.loss)


@pytest.mark.parametrize("implementation", ["xla", "pallas"])
@pytest.mark.parametrize("beta", [0.0, 0.5, 1.0])
def test_a_masked_vocabulary_cached_whole_is_the_truncated_loss(beta, implementation):
    """−inf bias columns in both heads and k = the unmasked count: the student has no tail, the
    teacher's 1 − Σ P is rounding, and the loss is that of the truncated vocabulary (not +inf)."""
    r = np.random.default_rng(4)
    real, vocab = 4, 16
    bias = np.zeros(vocab, np.float32)
    bias[real:] = -np.inf
    xt, wt = jnp.asarray(r.normal(size=(8, 6)), jnp.float32), jnp.asarray(r.normal(size=(6, vocab)), jnp.float32)
    xs, ws = jnp.asarray(r.normal(size=(8, 5)), jnp.float32), jnp.asarray(r.normal(size=(5, vocab)), jnp.float32)
    labels = jnp.asarray(r.integers(0, real, size=8), jnp.int32)
    cache = teacher_topk(xt, wt, real, teacher_bias=jnp.asarray(bias), temperature=2.0)
    options = dict(beta=beta, temperature=2.0, hard_weight=0.5)

    def masked(ws):
        return fused_linear_topk_distill_loss(
            xs,
            ws,
            cache.ids,
            cache.logprobs,
            labels,
            student_bias=jnp.asarray(bias),
            implementation=implementation,
            **options,
        )

    def truncated(ws):
        return jaxdistill.fused_linear_jsd_loss(
            xs, ws[:, :real], xt, wt[:, :real], labels, implementation="xla", **options
        )

    got, got_grad = jax.value_and_grad(masked)(ws)
    want, want_grad = jax.value_and_grad(truncated)(ws)
    np.testing.assert_allclose(float(got), float(want), rtol=1e-5)
    assert float(jnp.max(jnp.abs(got_grad[:, :real] - want_grad[:, :real])) / jnp.max(jnp.abs(want_grad))) < 1e-4
    assert float(jnp.max(jnp.abs(got_grad[:, real:]))) == 0.0


def test_second_derivatives_on_the_pallas_path_name_the_xla_path():
    p = make_topk_problem(n=6, vocab=30, k=3, seed=5)

    def loss(xs, implementation):
        return fused_linear_topk_distill_loss(
            xs, p.student_weight, p.teacher_ids, p.teacher_logprobs, p.labels, beta=0.5, implementation=implementation
        )

    with pytest.raises(NotImplementedError, match="implementation='xla'"):
        jax.hessian(loss)(p.student_hidden, "pallas")
    hessian = jax.jit(jax.hessian(loss), static_argnums=1)  # one compile, not one per primitive
    assert np.all(np.isfinite(np.asarray(hessian(p.student_hidden, "xla"))))


@pytest.mark.parametrize(
    "tail, logprobs",
    [
        ("bucket", np.array([[0.5, 0.3, 0.1]] * 4, np.float32)),  # probabilities, not log-probabilities
        ("bucket", np.array([[-0.1, -0.2, np.nan]] * 4, np.float32)),
        ("renormalize", np.array([[-np.inf, -np.inf, -np.inf]] * 4, np.float32)),  # nothing to renormalize
    ],
    ids=["probabilities", "nan", "renormalize-all-minus-inf"],
)
def test_cached_values_that_are_not_log_probabilities(tail, logprobs):
    """Concrete: a ValueError naming the argument; traced: a NaN loss. Ignored rows are not read."""
    xs, ws = jnp.ones((4, 5)), jnp.ones((5, 12)) / 5
    ids = jnp.asarray(np.tile(np.array([1, 4, 7], np.int32), (4, 1)))
    labels = jnp.array([1, 2, 3, 4], jnp.int32)
    with pytest.raises(ValueError, match="teacher_logprobs"):
        fused_linear_topk_distill_loss(xs, ws, ids, jnp.asarray(logprobs), labels, tail=tail)
    traced = jax.jit(lambda lp: fused_linear_topk_distill_loss(xs, ws, ids, lp, labels, tail=tail))
    assert np.isnan(float(traced(jnp.asarray(logprobs))))
    fine = np.tile(np.log(np.array([0.5, 0.3, 0.1], np.float32)), (4, 1))
    fine[0] = logprobs[0]  # only in an ignored row
    ignored_first = labels.at[0].set(-100)
    assert np.isfinite(float(fused_linear_topk_distill_loss(xs, ws, ids, jnp.asarray(fine), ignored_first, tail=tail)))


def test_teacher_topk_with_a_bad_traced_temperature_is_nan():
    xt, wt = jnp.ones((3, 4)), jnp.arange(40.0).reshape(4, 10) / 40
    for bad in (-1.0, 0.0, np.inf):
        cache = jax.jit(lambda t: teacher_topk(xt, wt, 2, temperature=t))(jnp.float32(bad))
        assert np.all(np.isnan(np.asarray(cache.logprobs))), bad


def _masked_tail_problem(mask_value, *, real=4, vocab=16, seed=6):
    """Student bias ``mask_value`` outside the first ``real`` columns; a teacher cache of exactly
    those columns, renormalized (1 − Σ P is rounding)."""
    r = np.random.default_rng(seed)
    xs = jnp.asarray(r.normal(size=(8, 5)), jnp.float32)
    ws = jnp.asarray(r.normal(size=(5, vocab)), jnp.float32)
    bias = np.zeros(vocab, np.float32)
    bias[real:] = mask_value
    ids = jnp.asarray(np.tile(np.arange(real, dtype=np.int32), (8, 1)))
    logprobs = jax.nn.log_softmax(jnp.asarray(r.normal(size=(8, real)), jnp.float32), axis=-1)
    labels = jnp.asarray(r.integers(0, real, size=8), jnp.int32)
    return xs, ws, jnp.asarray(bias), ids, logprobs, labels


@pytest.mark.parametrize("temperature", [1.0, 0.5])
@pytest.mark.parametrize("mask_value", [np.finfo(np.float32).min, -1e30], ids=["finfo-min", "minus-1e30"])
def test_tail_masks_other_than_minus_inf_weigh_nothing_on_both_paths(mask_value, temperature):
    """finfo.min (below the kernels' floor) or −1e30 masks: the loss of the −inf mask, on both
    implementations (a rounding-level teacher tail against a masked student tail is not +inf or
    a huge δ·log(δ/Q_tail))."""
    xs, ws, bias, ids, logprobs, labels = _masked_tail_problem(mask_value)
    options = dict(beta=0.0, temperature=temperature, hard_weight=0.5, chunk_size=4)
    want = float(
        fused_linear_topk_distill_loss(
            xs, ws, ids, logprobs, labels, student_bias=jnp.where(bias < 0, -jnp.inf, 0.0), **options
        )
    )
    assert np.isfinite(want)
    for implementation in ("xla", "pallas"):
        got = fused_linear_topk_distill_loss(
            xs, ws, ids, logprobs, labels, student_bias=bias, implementation=implementation, **options
        )
        np.testing.assert_allclose(float(got), want, rtol=1e-5, err_msg=implementation)


@pytest.mark.parametrize("implementation", ["xla", "pallas"])
def test_an_empty_tail_with_very_negative_logits_is_finite(implementation):
    """k = V and every logit near −200: the empty tail adds 0 to the row sums, not 0·∞."""
    xs, ws, _, _, _, labels = _masked_tail_problem(0.0, real=8, vocab=8)
    ids = jnp.asarray(np.tile(np.arange(8, dtype=np.int32), (8, 1)))
    logprobs = jax.nn.log_softmax(jnp.asarray(np.random.default_rng(7).normal(size=(8, 8)), jnp.float32), axis=-1)
    options = dict(beta=0.5, hard_weight=0.5, implementation=implementation)
    shifted = fused_linear_topk_distill_loss(
        xs, ws, ids, logprobs, labels, student_bias=jnp.full((8,), -200.0), **options
    )
    plain = fused_linear_topk_distill_loss(xs, ws, ids, logprobs, labels, **options)
    np.testing.assert_allclose(float(shifted), float(plain), rtol=1e-5)


def test_a_16_bit_cache_is_a_type_error():
    xs, ws, _, ids, logprobs, labels = _masked_tail_problem(0.0)
    with pytest.raises(TypeError, match="teacher_logprobs.*float32"):
        fused_linear_topk_distill_loss(xs, ws, ids, logprobs.astype(jnp.bfloat16), labels)


def test_out_of_range_ids_are_nan_not_reported_as_repeats():
    """Concrete ids [100, 200, 3] at V = 16 are out of range (NaN), not "repeated" after clipping."""
    xs, ws, _, ids, logprobs, labels = _masked_tail_problem(0.0)
    bad = ids.at[2, :3].set(jnp.array([100, 200, 3]))
    assert np.isnan(float(fused_linear_topk_distill_loss(xs, ws, bad, logprobs, labels)))


def test_the_dense_loss_still_requires_its_teacher():
    xs, ws, _, _, _, labels = _masked_tail_problem(0.0)
    with pytest.raises(ValueError, match="teacher_hidden.*teacher_weight.*required"):
        jaxdistill.fused_linear_jsd_loss(xs, ws, None, None, labels)
