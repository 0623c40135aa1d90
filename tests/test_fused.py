"""The fused loss against the float64 reference, over the DESIGN.md §5 grid (XLA path)."""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from helpers import loss_and_grads, make_problem, naive_loss, oracle64, relative_error

from jaxdistill import fused_linear_jsd_loss, reference

F32_LOSS_RTOL = 1e-5
F32_GRAD_RTOL = 1e-4


def check_f32(p, *, cotangent=1.0, implementation="xla", chunk_size=8, **options):
    loss, grads = loss_and_grads(
        fused_linear_jsd_loss, p, cotangent, implementation=implementation, chunk_size=chunk_size, **options
    )
    want_loss, want_grads = oracle64(p, cotangent, **options)
    assert np.isfinite(float(loss))
    np.testing.assert_allclose(float(loss), want_loss, rtol=F32_LOSS_RTOL, atol=1e-7)
    for name, got, want in zip(("student_hidden", "student_weight", "student_bias"), grads, want_grads, strict=True):
        if want is None:
            assert got is None
            continue
        assert got.dtype == jnp.float32, name
        assert relative_error(got, want) < F32_GRAD_RTOL, name


# Every β (both KL endpoints and two mixtures) and every T (below, at and above 1), each β with
# two temperatures and each temperature with at least two β: T only scales the logits, so the
# full 4 × 3 product adds no code path.
BETA_TEMPERATURES = [(0.0, 0.5), (0.0, 2.0), (0.3, 1.0), (0.3, 0.5), (0.5, 2.0), (0.5, 1.0), (1.0, 0.5), (1.0, 2.0)]


@pytest.mark.parametrize("beta, temperature", BETA_TEMPERATURES, ids=lambda x: str(x))
def test_f32_matches_oracle_beta_temperature(beta, temperature):
    p = make_problem(n=37, vocab=123)  # 37 rows, chunk 8: ragged last chunk; Hs=16 ≠ Ht=24
    check_f32(p, beta=beta, temperature=temperature, soft_weight=1.0, hard_weight=0.3)


# Each weighting once; with and without biases for the mixed one (a bias only adds its gradient).
@pytest.mark.parametrize(
    "soft_weight, hard_weight, bias",
    [(1.0, 0.0, True), (0.0, 1.0, False), (0.7, 0.4, True), (0.7, 0.4, False)],
    ids=["soft-only-bias", "hard-only-no-bias", "mixed-bias", "mixed-no-bias"],
)
def test_f32_weights_and_bias(soft_weight, hard_weight, bias):
    p = make_problem(n=29, vocab=1000, bias=bias, seed=1)
    check_f32(p, beta=0.5, temperature=2.0, soft_weight=soft_weight, hard_weight=hard_weight, chunk_size=16)


@pytest.mark.parametrize("chunk_size", [1, 5, 64], ids=lambda c: f"chunk={c}")
def test_f32_chunk_sizes(chunk_size):
    p = make_problem(n=21, vocab=123, seed=2)
    check_f32(p, beta=0.3, temperature=0.5, hard_weight=0.5, chunk_size=chunk_size)


def test_f32_cotangent_sum_reduction_and_where():
    p = make_problem(n=33, vocab=123, seed=3)
    where = jnp.arange(33) % 3 != 0
    check_f32(p, cotangent=-3.7, beta=0.5, hard_weight=0.2, reduction="sum", where=where)
    check_f32(p, cotangent=2.5, beta=1.0, temperature=2.0, where=where)


def test_f32_leading_dims_are_flattened():
    p = make_problem(vocab=123, lead_shape=(3, 7), seed=4)
    check_f32(p, beta=0.5, temperature=2.0, hard_weight=0.5)


def test_f32_large_logits_and_small_temperature_are_finite_and_accurate():
    p = make_problem(n=24, vocab=123, logit_scale=1000.0, seed=5)
    for beta in (0.0, 0.5, 1.0):
        loss, grads = loss_and_grads(
            fused_linear_jsd_loss, p, beta=beta, temperature=0.05, hard_weight=0.5, implementation="xla", chunk_size=8
        )
        want_loss, want_grads = oracle64(p, beta=beta, temperature=0.05, hard_weight=0.5)
        assert np.isfinite(float(loss)) and all(bool(jnp.all(jnp.isfinite(g))) for g in grads)
        # Logits of ~2e4 after 1/T: float32 statistics are good to ~2e4·6e-8 absolute per logit.
        np.testing.assert_allclose(float(loss), want_loss, rtol=1e-4)
        for got, want in zip(grads, want_grads, strict=True):
            assert relative_error(got, want) < 1e-3


@pytest.mark.parametrize("reduction", ["mean", "sum"])
def test_all_tokens_ignored_gives_zero_loss_and_grads(reduction):
    p = make_problem(n=12, vocab=123, ignored_fraction=1.0)
    loss, grads = loss_and_grads(
        fused_linear_jsd_loss, p, beta=0.5, hard_weight=1.0, reduction=reduction, implementation="xla", chunk_size=5
    )
    assert float(loss) == 0.0
    for g in grads:
        assert bool(jnp.all(g == 0.0))


# The contract rounds dlogits to bf16 before the gradient matmuls and the result to bf16 at the
# end: two roundings of at most half a bf16 ulp (2^-9 relative) each.
BF16_ROUNDINGS = 2 * 2.0**-9


def check_bf16(p, *, implementation="xla", chunk_size=16, **options):
    """bf16 error against the f64 oracle: no worse than the naive unfused bf16 computation, and
    within the float32-statistics reference's error plus the two mandated bf16 roundings."""
    want_loss, want_grads = oracle64(p, **options)  # the oracle sees the same bf16-rounded inputs
    got_loss, got_grads = loss_and_grads(
        fused_linear_jsd_loss, p, implementation=implementation, chunk_size=chunk_size, **options
    )
    ref_loss, ref_grads = loss_and_grads(reference.fused_linear_jsd_loss, p, **options)
    naive_loss_value, naive_grads = loss_and_grads(naive_loss, p, **options)
    assert got_loss.dtype == jnp.float32
    assert relative_error(got_loss, want_loss) <= relative_error(ref_loss, want_loss) + 1e-6
    assert relative_error(got_loss, want_loss) <= relative_error(naive_loss_value, want_loss)
    for name, got, ref, naive, want in zip(
        ("student_hidden", "student_weight", "student_bias"), got_grads, ref_grads, naive_grads, want_grads, strict=True
    ):
        assert got.dtype == jnp.bfloat16, name
        err = relative_error(got, want)
        assert err <= relative_error(naive, want) + 2.0**-10, name  # "plus a small tolerance"
        assert err <= relative_error(ref, want) + BF16_ROUNDINGS, name


# Every β once at V = 123, and the forward-KL and mixture branches again at V = 1000.
@pytest.mark.parametrize(
    "vocab, beta", [(123, 0.0), (123, 0.5), (123, 1.0), (1000, 0.0), (1000, 0.5)], ids=lambda x: str(x)
)
def test_bf16_within_the_unfused_bf16_error_budget(beta, vocab):
    p = make_problem(n=40, vocab=vocab, seed=6).astype(jnp.bfloat16)
    check_bf16(p, beta=beta, temperature=2.0, hard_weight=0.5)


# Every β in both dtypes, one tile (V = 123) in float32, several with a 1-lane tail (V = 4097) in
# bfloat16, and the default tiling of a large vocabulary (V = 32003) once per dtype. The kernel's
# own grid (test_kernel.py: every β × vocabulary × dtype × logit scale) covers the rest of the
# cross product at the row level; here the driver around it is checked.
PALLAS_CASES = [
    (123, 0.0, "float32"),
    (123, 0.5, "float32"),
    (123, 1.0, "float32"),
    (4097, 0.0, "bfloat16"),
    (4097, 0.5, "bfloat16"),
    (4097, 1.0, "bfloat16"),
    (32003, 0.5, "float32"),
    (32003, 0.0, "bfloat16"),
]


@pytest.mark.parametrize("vocab, beta, dtype", PALLAS_CASES, ids=lambda x: str(x))
def test_pallas_implementation_matches_oracle(vocab, beta, dtype):
    """The whole loss through the Pallas kernel (interpret mode off-GPU): 11 rows in chunks of 4."""
    p = make_problem(n=11, hs=8, ht=12, vocab=vocab, ignored_fraction=0.3, seed=vocab)
    options = dict(beta=beta, temperature=0.7, soft_weight=0.8, hard_weight=0.4, implementation="pallas", chunk_size=4)
    if dtype == "float32":
        check_f32(p, **options)
    else:
        check_bf16(p.astype(jnp.bfloat16), **options)


def test_golden_soft_loss_against_numpy():
    """2 rows × 5 classes with identity heads, computed independently in numpy from DESIGN.md §1."""
    z_s = np.array([[1.0, -2.0, 0.5, 3.0, 0.0], [0.2, 0.1, -1.0, 2.0, -0.5]])
    z_t = np.array([[0.5, -1.0, 2.0, 1.0, -3.0], [1.5, -0.5, 0.0, 0.3, 0.8]])
    temperature = 2.0

    def softmax(z):
        e = np.exp(z - z.max(axis=1, keepdims=True))
        return e / e.sum(axis=1, keepdims=True)

    q, p = softmax(z_s / temperature), softmax(z_t / temperature)

    def kl(a, b):
        return np.sum(a * np.log(a / b), axis=1)

    expected = {0.0: kl(p, q).mean(), 1.0: kl(q, p).mean()}
    m = 0.5 * p + 0.5 * q
    expected[0.5] = (0.5 * kl(p, m) + 0.5 * kl(q, m)).mean()
    eye = jnp.eye(5, dtype=jnp.float32)
    for beta, want in expected.items():
        for loss_fn in (functools.partial(fused_linear_jsd_loss, chunk_size=1), reference.fused_linear_jsd_loss):
            got = loss_fn(
                jnp.asarray(z_s, jnp.float32),
                eye,
                jnp.asarray(z_t, jnp.float32),
                eye,
                jnp.array([0, 3]),
                beta=beta,
                temperature=temperature,
            )
            np.testing.assert_allclose(float(got), want, rtol=1e-6)


def test_return_aux_parts_and_count():
    p = make_problem(n=30, vocab=123, seed=7)
    options = dict(beta=0.5, temperature=2.0, soft_weight=0.7, hard_weight=0.4)
    loss, aux = fused_linear_jsd_loss(*positional(p), **biases(p), **options, chunk_size=7, return_aux=True)
    ref_loss, ref_aux = reference.fused_linear_jsd_loss(*positional(p), **biases(p), **options, return_aux=True)
    assert int(aux["num_valid_tokens"]) == int(jnp.sum(p.labels != -100)) == int(ref_aux["num_valid_tokens"])
    np.testing.assert_allclose(float(aux["soft_loss"]), float(ref_aux["soft_loss"]), rtol=1e-5)
    np.testing.assert_allclose(float(aux["hard_loss"]), float(ref_aux["hard_loss"]), rtol=1e-5)
    np.testing.assert_allclose(float(loss), 0.7 * float(aux["soft_loss"]) + 0.4 * float(aux["hard_loss"]), rtol=1e-5)

    # The aux parts carry no gradient.
    def soft_part(ws):
        return fused_linear_jsd_loss(
            p.student_hidden, ws, p.teacher_hidden, p.teacher_weight, p.labels, chunk_size=7, return_aux=True
        )[1]["soft_loss"]

    assert bool(jnp.all(jax.grad(soft_part)(p.student_weight) == 0))


def positional(p):
    return p.student_hidden, p.student_weight, p.teacher_hidden, p.teacher_weight, p.labels


def biases(p):
    return dict(student_bias=p.student_bias, teacher_bias=p.teacher_bias)


def test_teacher_gets_zero_gradient_and_weight_gradients_are_exact():
    p = make_problem(n=16, vocab=123, seed=8)

    def f(xt, wt, soft_weight, hard_weight):
        return fused_linear_jsd_loss(
            p.student_hidden,
            p.student_weight,
            xt,
            wt,
            p.labels,
            soft_weight=soft_weight,
            hard_weight=hard_weight,
            chunk_size=4,
        )

    g_xt, g_wt, g_soft, g_hard = jax.grad(f, argnums=(0, 1, 2, 3))(p.teacher_hidden, p.teacher_weight, 0.6, 0.3)
    assert bool(jnp.all(g_xt == 0)) and bool(jnp.all(g_wt == 0))
    _, aux = fused_linear_jsd_loss(*positional(p), chunk_size=4, return_aux=True)
    np.testing.assert_allclose(float(g_soft), float(aux["soft_loss"]), rtol=1e-6)
    np.testing.assert_allclose(float(g_hard), float(aux["hard_loss"]), rtol=1e-6)


def test_out_of_range_label_gives_nan_loss_and_gradients():
    p = make_problem(n=10, vocab=123, ignored_fraction=0.0)
    for bad in (123, 10_000, -5):
        bad_labels = p.labels.at[4].set(bad)

        def f(ws, labels=bad_labels):
            return fused_linear_jsd_loss(p.student_hidden, ws, p.teacher_hidden, p.teacher_weight, labels, chunk_size=4)

        loss, grad = jax.value_and_grad(f)(p.student_weight)
        assert np.isnan(float(loss)) and bool(jnp.all(jnp.isnan(grad)))
        ref = reference.fused_linear_jsd_loss(
            p.student_hidden, p.student_weight, p.teacher_hidden, p.teacher_weight, bad_labels
        )
        assert np.isnan(float(ref))
    # An ignored row may hold anything.
    ok = fused_linear_jsd_loss(*positional(p)[:4], p.labels.at[4].set(-100), chunk_size=4)
    assert np.isfinite(float(ok))


def test_traced_invalid_hyper_parameters_give_nan():
    p = make_problem(n=10, vocab=123)
    f = jax.jit(lambda beta, t: fused_linear_jsd_loss(*positional(p), beta=beta, temperature=t, chunk_size=4))
    assert np.isfinite(float(f(0.5, 1.0)))
    assert np.isnan(float(f(1.5, 1.0)))
    assert np.isnan(float(f(0.5, 0.0)))
    assert np.isnan(float(f(0.5, float("inf"))))


@pytest.mark.parametrize(
    "argnums",
    [(0,), (1,), (0, 1), (2,), (0, 1, 2)],
    ids=["hidden", "weight", "hidden+weight", "bias", "all-student"],
)
def test_grad_wrt_any_subset_of_student_arguments(argnums):
    p = make_problem(n=19, vocab=123, seed=9)

    def make(loss_fn, **kw):
        def f(xs, ws, bs):
            return loss_fn(
                xs, ws, p.teacher_hidden, p.teacher_weight, p.labels, student_bias=bs, beta=0.3, hard_weight=0.5, **kw
            )

        return jax.jit(jax.grad(f, argnums=argnums))

    args = (p.student_hidden, p.student_weight, p.student_bias)
    got = make(fused_linear_jsd_loss, chunk_size=6)(*args)
    want = make(reference.fused_linear_jsd_loss)(*args)
    for g, w in zip(got, want, strict=True):
        assert relative_error(g, w) < 1e-5


def test_changing_hyper_parameters_does_not_recompile():
    p = make_problem(n=20, vocab=123)
    traces = []

    @jax.jit
    def step(xs, ws, beta, temperature, soft_weight, hard_weight):
        traces.append(1)
        return jax.value_and_grad(fused_linear_jsd_loss, argnums=(0, 1))(
            xs,
            ws,
            p.teacher_hidden,
            p.teacher_weight,
            p.labels,
            beta=beta,
            temperature=temperature,
            soft_weight=soft_weight,
            hard_weight=hard_weight,
            chunk_size=8,
        )

    results = []
    for hyper in [(0.0, 1.0, 1.0, 0.0), (0.5, 2.0, 0.5, 0.5), (1.0, 0.5, 1.0, 0.1), (0.3, 1.5, 0.2, 0.9)]:
        loss, _ = step(p.student_hidden, p.student_weight, *hyper)
        want = reference.fused_linear_jsd_loss(
            *positional(p),
            beta=hyper[0],
            temperature=hyper[1],
            soft_weight=hyper[2],
            hard_weight=hyper[3],
        )
        np.testing.assert_allclose(float(loss), float(want), rtol=1e-5)
        results.append(float(loss))
    assert len(traces) == 1
    assert step._cache_size() == 1
    assert len(set(results)) == 4  # the values really changed


def temp_bytes(n, vocab=32000, hidden=64, chunk_size=256):
    shapes = (
        jax.ShapeDtypeStruct((n, hidden), jnp.float32),
        jax.ShapeDtypeStruct((hidden, vocab), jnp.float32),
        jax.ShapeDtypeStruct((n, hidden), jnp.float32),
        jax.ShapeDtypeStruct((hidden, vocab), jnp.float32),
        jax.ShapeDtypeStruct((n,), jnp.int32),
    )
    loss = functools.partial(fused_linear_jsd_loss, hard_weight=0.5, chunk_size=chunk_size, implementation="xla")
    compiled = jax.jit(jax.value_and_grad(loss, argnums=(0, 1))).lower(*shapes).compile()
    return compiled.memory_analysis().temp_size_in_bytes


def test_temp_memory_is_bounded_by_the_chunk_not_by_n():
    small, large = temp_bytes(2048), temp_bytes(16384)
    full_logits_f32 = 16384 * 32000 * 4
    assert large < 1.3 * small, (small, large)
    assert large < full_logits_f32 / 4, (large, full_logits_f32)


def test_default_chunk_size_heuristic():
    from jaxdistill import default_chunk_size

    assert default_chunk_size(128256) == 1024
    assert default_chunk_size(262144) == 512
    assert default_chunk_size(32000) == 4096
    assert default_chunk_size(123) == 4096
    assert default_chunk_size(10_000_000) == 16


BAD_INPUTS = {
    "beta-above-1": (dict(beta=1.5), ValueError, "beta"),
    "beta-negative": (dict(beta=-0.1), ValueError, "beta"),
    "temperature-zero": (dict(temperature=0.0), ValueError, "temperature"),
    "temperature-negative": (dict(temperature=-1.0), ValueError, "temperature"),
    "student-hidden-size": (dict(student_hidden=jnp.ones((10, 15))), ValueError, "student_hidden"),
    "teacher-hidden-size": (dict(teacher_hidden=jnp.ones((10, 23))), ValueError, "teacher_hidden"),
    "vocab-mismatch": (dict(teacher_weight=jnp.ones((24, 124))), ValueError, "vocabulary"),
    "float-labels": (dict(labels=jnp.zeros((10,), jnp.float32)), TypeError, "labels"),
    "labels-shape": (dict(labels=jnp.zeros((11,), jnp.int32)), ValueError, "labels"),
    "labels-rank": (dict(labels=jnp.zeros((2, 5), jnp.int32)), ValueError, "labels"),
    "student-bias-shape": (dict(student_bias=jnp.ones((122,))), ValueError, "student_bias"),
    "teacher-bias-shape": (dict(teacher_bias=jnp.ones((1, 123))), ValueError, "teacher_bias"),
    "weight-rank": (dict(student_weight=jnp.ones((16, 123, 1))), ValueError, "student_weight"),
    "reduction": (dict(reduction="avg"), ValueError, "reduction"),
    "implementation": (dict(implementation="cuda"), ValueError, "implementation"),
    "chunk-zero": (dict(chunk_size=0), ValueError, "chunk_size"),
    "chunk-negative": (dict(chunk_size=-4), ValueError, "chunk_size"),
    "chunk-float": (dict(chunk_size=2.5), ValueError, "chunk_size"),
    "where-shape": (dict(where=jnp.ones((9,), bool)), ValueError, "where"),
    "where-dtype": (dict(where=jnp.ones((10,), jnp.int32)), TypeError, "where"),
    "teacher-leading-dims": (dict(teacher_hidden=jnp.ones((11, 24))), ValueError, "teacher_hidden"),
    "beta-not-scalar": (dict(beta=jnp.ones((2,))), ValueError, "beta"),
    "temperature-inf": (dict(temperature=float("inf")), ValueError, "temperature"),
    "ignore-index-bool": (dict(ignore_index=True), TypeError, "ignore_index"),
    "return-aux-not-bool": (dict(return_aux="no"), TypeError, "return_aux"),
    "chunk-bool": (dict(chunk_size=True), ValueError, "chunk_size"),
    "weight-layout": (dict(student_weight_layout="kv"), ValueError, "student_weight_layout"),
    "soft-weight-not-scalar": (dict(soft_weight=jnp.ones((3,))), ValueError, "soft_weight"),
    "hard-weight-string": (dict(hard_weight="0.5x"), TypeError, "hard_weight"),
}


@pytest.mark.parametrize("case", list(BAD_INPUTS), ids=list(BAD_INPUTS))
def test_bad_input_raises_at_trace_time_naming_the_argument(case):
    p = make_problem(n=10, vocab=123, bias=False)
    override, error, name = BAD_INPUTS[case]
    args = dict(
        student_hidden=p.student_hidden,
        student_weight=p.student_weight,
        teacher_hidden=p.teacher_hidden,
        teacher_weight=p.teacher_weight,
        labels=p.labels,
    )
    kwargs = {}
    for key, value in override.items():
        (args if key in args else kwargs)[key] = value
    positional_args = [
        args[k] for k in ("student_hidden", "student_weight", "teacher_hidden", "teacher_weight", "labels")
    ]
    with pytest.raises(error, match=name):
        jax.jit(lambda *a: fused_linear_jsd_loss(*a, **kwargs)).trace(*positional_args)
    if case not in ("implementation", "chunk-zero", "chunk-negative", "chunk-float", "chunk-bool"):
        with pytest.raises(error, match=name):
            reference.fused_linear_jsd_loss(*positional_args, **kwargs)


@pytest.mark.parametrize("layouts", [("vh", "hv"), ("hv", "vh"), ("vh", "vh")], ids=lambda x: f"{x[0]}-{x[1]}")
def test_vocab_major_weights_match_the_oracle(layouts):
    """(V, H) weights (a tied embedding) give the same loss and gradients, in their own layout."""
    student_layout, teacher_layout = layouts
    p = make_problem(n=21, vocab=123, seed=11)
    ws = p.student_weight.T if student_layout == "vh" else p.student_weight
    wt = p.teacher_weight.T if teacher_layout == "vh" else p.teacher_weight
    options = dict(beta=0.5, temperature=2.0, hard_weight=0.5)
    layout_options = dict(student_weight_layout=student_layout, teacher_weight_layout=teacher_layout)

    def f(xs, ws):
        return fused_linear_jsd_loss(
            xs, ws, p.teacher_hidden, wt, p.labels, chunk_size=8, **biases(p), **options, **layout_options
        )

    loss, (g_x, g_w) = jax.value_and_grad(f, argnums=(0, 1))(p.student_hidden, ws)
    want_loss, want_grads = oracle64(p, **options)
    np.testing.assert_allclose(float(loss), want_loss, rtol=F32_LOSS_RTOL)
    assert g_w.shape == ws.shape
    assert relative_error(g_x, want_grads[0]) < F32_GRAD_RTOL
    assert relative_error(g_w.T if student_layout == "vh" else g_w, want_grads[1]) < F32_GRAD_RTOL
    ref = reference.fused_linear_jsd_loss(
        p.student_hidden, ws, p.teacher_hidden, wt, p.labels, **biases(p), **options, **layout_options
    )
    np.testing.assert_allclose(float(ref), want_loss, rtol=F32_LOSS_RTOL)


def test_numpy_integer_chunk_size_is_accepted():
    p = make_problem(n=10, vocab=123)
    got = fused_linear_jsd_loss(*positional(p), chunk_size=np.int64(4))
    np.testing.assert_allclose(float(got), float(fused_linear_jsd_loss(*positional(p), chunk_size=4)), rtol=0)


@pytest.mark.parametrize("beta", [0.0, 0.5, 1.0], ids=lambda b: f"beta={b}")
def test_value_only_forward_runs_no_gradient_matmuls(beta):
    """A forward without gradients computes the same loss with the two logits matmuls alone."""
    p = make_problem(n=40, vocab=123, seed=11)
    loss = functools.partial(fused_linear_jsd_loss, beta=beta, hard_weight=0.5, chunk_size=16, implementation="xla")
    args = (*positional(p),)
    value = jax.jit(lambda *a: loss(*a, student_bias=p.student_bias))(*args)
    with_grads, _ = jax.value_and_grad(lambda *a: loss(*a, student_bias=p.student_bias))(*args)
    np.testing.assert_allclose(float(value), float(with_grads), rtol=1e-6)
    forward_hlo = jax.jit(loss).lower(*args).compile().as_text()
    gradient_hlo = jax.jit(jax.value_and_grad(loss, argnums=(0, 1))).lower(*args).compile().as_text()
    assert forward_hlo.count(" dot(") == 2  # student and teacher logits
    assert gradient_hlo.count(" dot(") == 4  # and grad_x, grad_W
