"""Float64 oracle of the offline-teacher (cached top-k) distillation loss, and top-k teacher inputs.

Written from the definitions of ``jaxdistill.fused_linear_topk_distill_loss`` and
``jaxdistill.teacher_topk`` alone; it imports nothing of jaxdistill. With Q = softmax(z_s/T)
over the full vocabulary, P_i = exp(teacher_logprobs_i) and the teacher ids ``ids``:

- ``tail="bucket"``: P̃ = (P_1..P_k, 1 − Σ P_i) and Q̃ = (Q_{id_1}..Q_{id_k}, Σ_{v ∉ ids} Q_v), a
  teacher tail at or below δ_k = (k + 1)·2⁻²³ (float32 rounding) taken as min(δ_k, Q_tail);
- ``tail="renormalize"``: P̂ = P / Σ P and Q̂ = Q_ids / Σ Q_ids;

soft = JSD_β(teacher, student) (β = 0: KL(P‖Q), β = 1: KL(Q‖P), else β·KL(P‖M) + (1−β)·KL(Q‖M)
with M = βP + (1−β)Q; a bucket of probability 0 contributes 0), hard = −log softmax(z_s)[y],
loss = Σ_valid (soft_weight·soft + hard_weight·CE) / max(1, #valid) ("mean") or the sum.

Everything is evaluated from log-probabilities in the dtype of the inputs: called on float64
arrays under ``jax.enable_x64`` (:func:`oracle64`) it is the float64 oracle, its gradients by
plain autodiff; on float32 arrays it is the plain float32 unfused computation, and on bfloat16
arrays the naive bf16 one (the GPU tests' error budgets).
"""

from __future__ import annotations

import dataclasses
import functools
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

IGNORE = -100
TAILS = ("bucket", "renormalize")


@dataclasses.dataclass
class TopKProblem:
    """One top-k distillation problem: the student's arrays, the cached teacher, the labels.

    The teacher's head (``teacher_hidden`` @ ``teacher_weight`` + ``teacher_bias``) is kept for the
    ``teacher_topk`` tests; ``teacher_ids`` / ``teacher_logprobs`` are its exact top-k of
    log_softmax(z_t/T) at ``temperature`` (computed in float64, logprobs rounded to float32).
    """

    student_hidden: jax.Array
    student_weight: jax.Array
    student_bias: jax.Array | None
    teacher_ids: jax.Array
    teacher_logprobs: jax.Array
    labels: jax.Array
    teacher_hidden: jax.Array
    teacher_weight: jax.Array
    teacher_bias: jax.Array | None
    temperature: float

    def astype(self, dtype):
        """The floating student arrays (and the teacher head) cast to ``dtype``; ids, labels and logprobs kept."""
        cast = lambda x: None if x is None else x.astype(dtype)  # noqa: E731
        return dataclasses.replace(
            self,
            student_hidden=cast(self.student_hidden),
            student_weight=cast(self.student_weight),
            student_bias=cast(self.student_bias),
            teacher_hidden=cast(self.teacher_hidden),
            teacher_weight=cast(self.teacher_weight),
            teacher_bias=cast(self.teacher_bias),
        )

    @property
    def valid(self) -> np.ndarray:
        return np.asarray(self.labels) != IGNORE


# --- inputs --------------------------------------------------------------------------------------


def full_teacher_logprobs64(teacher_hidden, teacher_weight, teacher_bias=None, temperature=1.0, layout="hv"):
    """(..., V) float64 numpy log_softmax(z_t / T), z_t from the float64 upcast of the inputs."""
    with jax.enable_x64(True):
        f64 = lambda a: None if a is None else jnp.asarray(a, jnp.float64)  # noqa: E731
        return np.asarray(
            _full_logprobs(f64(teacher_hidden), f64(teacher_weight), f64(teacher_bias), f64(temperature), layout=layout)
        )


@functools.partial(jax.jit, static_argnames="layout")
def _full_logprobs(xt, wt, bt, temperature, *, layout):
    z = xt @ (wt if layout == "hv" else wt.T)
    if bt is not None:
        z = z + bt
    return jax.nn.log_softmax(z / temperature, axis=-1)


def topk64(teacher_hidden, teacher_weight, k, *, teacher_bias=None, temperature=1.0, layout="hv"):
    """The exact top-k of log_softmax(z_t/T) in float64: (ids int32, logprobs float64), descending."""
    full = full_teacher_logprobs64(teacher_hidden, teacher_weight, teacher_bias, temperature, layout)
    order = np.argsort(-full, axis=-1, kind="stable")[..., :k]
    return order.astype(np.int32), np.take_along_axis(full, order, axis=-1)


def make_topk_problem(
    n=29,
    hs=16,
    ht=24,
    vocab=151,
    k=7,
    *,
    temperature=2.0,
    dtype=jnp.float32,
    logit_scale=1.0,
    bias=True,
    ignored_fraction=0.2,
    lead_shape=None,
    label_in_ids=None,
    neg_inf_entries=0,
    seed=0,
) -> TopKProblem:
    """A realistic cached teacher: the true top-k of a random teacher head, and a random student.

    Args:
      n, hs, ht, vocab, k: rows, student and teacher hidden sizes, vocabulary, cached entries.
      temperature: the distillation temperature the teacher's log-probs are made at.
      logit_scale: standard deviation of the logits (both heads; biases add half of it).
      ignored_fraction: fraction of rows whose label is −100.
      lead_shape: leading dims instead of (n,).
      label_in_ids: None (labels uniform over V), True (each label is one of its row's ids),
        False (no label is one of its row's ids).
      neg_inf_entries: the last ``neg_inf_entries`` log-probs of every row are −inf (a teacher that
        cached fewer than k entries, padded with distinct ids of probability 0).
      seed: PRNG seed.
    """
    rng = np.random.default_rng(seed)
    lead = (n,) if lead_shape is None else tuple(lead_shape)
    normal = lambda *shape: rng.standard_normal(shape, np.float32)  # noqa: E731
    xs, xt = normal(*lead, hs), normal(*lead, ht)
    ws = normal(hs, vocab) * (logit_scale / np.sqrt(hs))
    wt = normal(ht, vocab) * (logit_scale / np.sqrt(ht))
    bs = normal(vocab) * (0.5 * logit_scale) if bias else None
    bt = normal(vocab) * (0.5 * logit_scale) if bias else None
    cast = lambda x: None if x is None else jnp.asarray(x, dtype)  # noqa: E731
    xs, xt, ws, wt, bs, bt = map(cast, (xs, xt, ws, wt, bs, bt))

    ids, logprobs = topk64(xt, wt, k, teacher_bias=bt, temperature=temperature)
    labels = rng.integers(0, vocab, lead)
    if label_in_ids is True:
        labels = np.take_along_axis(ids, rng.integers(0, k, lead)[..., None], axis=-1)[..., 0]
    elif label_in_ids is False:
        scores = rng.random(lead + (vocab,))
        np.put_along_axis(scores, ids.astype(np.int64), -1.0, axis=-1)
        labels = np.argmax(scores, axis=-1)  # a random column outside the ids
    ignored = rng.random(lead) < ignored_fraction
    labels = np.where(ignored, IGNORE, labels).astype(np.int32)
    logprobs = logprobs.astype(np.float32)
    if neg_inf_entries:
        logprobs[..., k - neg_inf_entries :] = -np.inf
    return TopKProblem(
        student_hidden=xs,
        student_weight=ws,
        student_bias=bs,
        teacher_ids=jnp.asarray(ids),
        teacher_logprobs=jnp.asarray(logprobs),
        labels=jnp.asarray(labels),
        teacher_hidden=xt,
        teacher_weight=wt,
        teacher_bias=bt,
        temperature=float(temperature),
    )


# --- the loss from its definition ----------------------------------------------------------------


def _plogratio(w, log_w, log_other):
    """w·(log w − log other), 0 where w = 0 whatever the logs are; safe to differentiate."""
    positive = w > 0
    diff = jnp.where(positive, log_w, 0) - jnp.where(positive, log_other, 0)
    return jnp.where(positive, w * diff, 0)


def beta_kind(beta) -> str:
    """ "forward" (β = 0 exactly), "reverse" (β = 1 exactly) or "mixture"."""
    beta = float(beta)
    return "forward" if beta == 0.0 else "reverse" if beta == 1.0 else "mixture"


def divergence_rows(log_p, log_q, beta, kind=None):
    """JSD_β per row between the teacher (log P) and the student (log Q), both (..., m) log-probs.

    ``kind``: "forward" (KL(P‖Q)), "reverse" (KL(Q‖P)), "mixture" (β·KL(P‖M) + (1−β)·KL(Q‖M),
    M = βP + (1−β)Q), or "traced": the branch from β's value at run time (β = 0 and β = 1 exactly
    are the KL endpoints; only the selected branch is evaluated, so its gradient is clean). None:
    from a concrete β (:func:`beta_kind`).
    """
    kind = beta_kind(beta) if kind is None else kind
    p, q = jnp.exp(log_p), jnp.exp(log_q)

    def forward(beta):
        return jnp.sum(_plogratio(p, log_p, log_q), axis=-1)

    def reverse(beta):
        return jnp.sum(_plogratio(q, log_q, log_p), axis=-1)

    def mixture(beta):
        log_m = jnp.logaddexp(jnp.log(beta) + log_p, jnp.log1p(-beta) + log_q)
        return beta * jnp.sum(_plogratio(p, log_p, log_m), axis=-1) + (1 - beta) * jnp.sum(
            _plogratio(q, log_q, log_m), axis=-1
        )

    beta = jnp.asarray(beta, log_p.dtype)
    if kind == "traced":
        branch = jnp.where(beta == 0, 0, jnp.where(beta == 1, 2, 1))
        return jax.lax.switch(branch, (forward, mixture, reverse), beta)
    return {"forward": forward, "mixture": mixture, "reverse": reverse}[kind](beta)


def _id_mask(ids, vocab):
    """(N, V) bool: column v is one of the row's ids (ids (N, k) in [0, V))."""
    rows = jnp.arange(ids.shape[0])[:, None]
    return jnp.zeros((ids.shape[0], vocab), bool).at[rows, ids].set(True)


def _bad_ids(ids, vocab):
    """(N,) bool: an id outside [0, V) or an id repeated within the row."""
    out = jnp.any((ids < 0) | (ids >= vocab), axis=-1)
    s = jnp.sort(ids, axis=-1)
    repeated = jnp.any(s[:, 1:] == s[:, :-1], axis=-1) if ids.shape[-1] > 1 else jnp.zeros(ids.shape[:1], bool)
    return out | repeated


def topk_distill_loss(
    student_hidden,
    student_weight,
    teacher_ids,
    teacher_logprobs,
    labels,
    *,
    student_bias=None,
    beta=0.0,
    temperature=1.0,
    soft_weight=1.0,
    hard_weight=0.0,
    tail="bucket",
    ignore_index=IGNORE,
    where=None,
    reduction="mean",
    student_weight_layout="hv",
    return_aux=False,
    beta_kind_=None,
    compute_dtype=None,
):
    """The top-k distillation loss from its definition, unfused, in ``compute_dtype`` (default:
    the student arrays' dtype). The logits are ``matmul(x, w)`` accumulated in that dtype from
    the arrays as given: bf16 arrays with ``compute_dtype=float32`` are the dense reference's
    "float32 statistics" (``jaxdistill.reference``: bf16 operands, float32 accumulation).

    Same arguments as ``jaxdistill.fused_linear_topk_distill_loss`` (minus chunking and
    implementation options); ``beta`` must be concrete unless ``beta_kind_`` names its branch
    (:func:`beta_kind`). A valid row with a bad id (out of range or
    repeated) or a bad label makes the loss NaN; ignored rows are replaced by harmless values
    before any math, so their contents never matter.
    """
    if tail not in TAILS:
        raise ValueError(f"tail {tail!r}")
    dtype = jnp.dtype(compute_dtype) if compute_dtype is not None else jnp.result_type(student_hidden)
    w = student_weight if student_weight_layout == "hv" else student_weight.T
    hidden, vocab = w.shape
    k = teacher_ids.shape[-1]
    x = jnp.reshape(student_hidden, (-1, hidden))
    n = x.shape[0]
    ids = jnp.reshape(teacher_ids, (n, k)).astype(jnp.int32)
    lp = jnp.reshape(teacher_logprobs, (n, k)).astype(dtype)
    y = jnp.reshape(labels, (n,)).astype(jnp.int32)
    valid = y != ignore_index
    if where is not None:
        valid = valid & jnp.reshape(where, (n,))

    bad = valid & (_bad_ids(ids, vocab) | (y < 0) | (y >= vocab))
    # Ignored rows (and rows about to be poisoned) read distinct in-range ids and finite log-probs.
    clean = valid & ~bad
    ids = jnp.where(clean[:, None], ids, jnp.arange(k, dtype=jnp.int32)[None, :])
    lp = jnp.where(clean[:, None], lp, jnp.asarray(-np.log(k + 1.0), dtype))
    y = jnp.where(clean, y, 0)

    z = jnp.matmul(x, w, preferred_element_type=dtype)
    if student_bias is not None:
        z = z + student_bias.astype(dtype)
    log_q_all = jax.nn.log_softmax(z / jnp.asarray(temperature, dtype), axis=-1)
    log_q = jnp.take_along_axis(log_q_all, ids, axis=-1)
    if tail == "bucket":
        tail_mask = ~_id_mask(ids, vocab)
        log_q_tail = jax.nn.logsumexp(jnp.where(tail_mask, log_q_all, -jnp.inf), axis=-1)
        # 1 − Σ P_i = −expm1(log Σ P_i), without cancellation. At or below δ_k = (k + 1)·2⁻²³ it is
        # within the float32 rounding of the cached log-probs: the contract takes it as
        # min(δ_k, Q_tail), the student's tail capped at δ_k, without gradient.
        raw_tail = -jnp.expm1(jax.nn.logsumexp(lp, axis=-1))
        delta = (k + 1) * 2.0**-23
        p_tail = jnp.where(raw_tail > delta, raw_tail, jnp.minimum(delta, jax.lax.stop_gradient(jnp.exp(log_q_tail))))
        log_p_tail = jnp.where(p_tail > 0, jnp.log(jnp.where(p_tail > 0, p_tail, 1)), -jnp.inf)
        log_p = jnp.concatenate([lp, log_p_tail[:, None]], axis=-1)
        log_q = jnp.concatenate([log_q, log_q_tail[:, None]], axis=-1)
    else:
        log_p = lp - jax.nn.logsumexp(lp, axis=-1, keepdims=True)
        log_q = log_q - jax.nn.logsumexp(log_q, axis=-1, keepdims=True)
    soft = divergence_rows(log_p, log_q, beta, beta_kind_)
    hard = -jnp.take_along_axis(jax.nn.log_softmax(z, axis=-1), y[:, None], axis=-1)[:, 0]

    soft_sum = jnp.sum(jnp.where(valid, soft, 0))
    hard_sum = jnp.sum(jnp.where(valid, hard, 0))
    count = jnp.sum(valid.astype(jnp.int32))
    denominator = jnp.maximum(count, 1).astype(dtype) if reduction == "mean" else jnp.ones((), dtype)
    poison = jnp.where(jnp.any(bad), jnp.nan, 1.0).astype(dtype)
    loss = (soft_weight * soft_sum + hard_weight * hard_sum) * poison / denominator
    if not return_aux:
        return loss
    aux = {
        "soft_loss": jax.lax.stop_gradient(soft_sum * poison / denominator),
        "hard_loss": jax.lax.stop_gradient(hard_sum * poison / denominator),
        "num_valid_tokens": count,
    }
    return loss, aux


def topk_loss_and_grads(loss_fn, p: TopKProblem, cotangent=1.0, **options):
    """Loss and its gradients w.r.t. (student_hidden, student_weight, student_bias) of ``loss_fn``
    (the fused loss, or :func:`topk_distill_loss`) on problem ``p``."""

    def scalar(xs, ws, bs):
        return cotangent * loss_fn(xs, ws, p.teacher_ids, p.teacher_logprobs, p.labels, student_bias=bs, **options)

    return jax.value_and_grad(scalar, argnums=(0, 1, 2))(p.student_hidden, p.student_weight, p.student_bias)


class Oracle(NamedTuple):
    loss: np.ndarray
    grads: tuple  # (student_hidden, student_weight, student_bias or None), float64
    aux: dict


NUMERIC_OPTIONS = ("beta", "temperature", "soft_weight", "hard_weight")
# The oracle is compiled once per shape and option set. On CPU without LLVM's optimizations:
# the float64 arithmetic is the same, the compile about twice as fast (as in distill_setup.py's
# workers).
FAST_COMPILE = {"xla_backend_optimization_level": 0, "xla_llvm_disable_expensive_passes": True}


def compile_cached(cache: dict, fn, static, *args):
    """``fn(*args, static=static)`` through a compiled executable cached by the options and the
    arguments' shapes and dtypes (without LLVM optimizations on CPU: see FAST_COMPILE)."""
    leaves, tree = jax.tree.flatten(args)
    key = (static, tree, tuple((leaf.shape, leaf.dtype) for leaf in leaves))
    if key not in cache:
        options = FAST_COMPILE if jax.default_backend() == "cpu" else None
        lowered = jax.jit(functools.partial(fn, static=static)).lower(*args)
        cache[key] = lowered.compile(compiler_options=options)
    return cache[key](*args)


_ORACLES: dict = {}


def oracle64(p: TopKProblem, cotangent=1.0, **options) -> Oracle:
    """:func:`topk_distill_loss` on the float64 upcast of ``p``: loss, gradients (autodiff) and aux.

    β, T and the weights are run-time arguments (β's branch is chosen from its exact value), so
    one compile serves every value.
    """
    options = {"beta": 0.0, "temperature": 1.0, "soft_weight": 1.0, "hard_weight": 0.0} | options
    numeric = {name: float(options.pop(name)) for name in NUMERIC_OPTIONS}
    where = options.pop("where", None)
    where = jnp.ones(p.labels.shape, bool) if where is None else jnp.asarray(where)
    reduction = options.pop("reduction", "mean")
    assert reduction in ("mean", "sum"), reduction
    # One compile per shape and tail: the sum over valid rows, divided below for "mean".
    static = tuple(sorted(options.items())) + (("beta_kind_", "traced"), ("reduction", "sum"))
    with jax.enable_x64(True):
        q = dataclasses.replace(p, teacher_hidden=None, teacher_weight=None, teacher_bias=None).astype(jnp.float64)
        args = (
            q.student_hidden,
            q.student_weight,
            q.student_bias,
            q.teacher_ids,
            jnp.asarray(p.teacher_logprobs, jnp.float64),
            q.labels,
            where,
            jnp.asarray(cotangent, jnp.float64),
            {name: jnp.asarray(v, jnp.float64) for name, v in numeric.items()},
        )
        loss, grads, aux = compile_cached(_ORACLES, _value_grads_aux, static, *args)
    scale = 1.0 / max(1, int(aux["num_valid_tokens"])) if reduction == "mean" else 1.0
    return Oracle(
        np.asarray(loss) * scale,
        tuple(None if g is None else np.asarray(g) * scale for g in grads),
        {
            "soft_loss": np.asarray(aux["soft_loss"]) * scale,
            "hard_loss": np.asarray(aux["hard_loss"]) * scale,
            "num_valid_tokens": np.asarray(aux["num_valid_tokens"]),
        },
    )


def _value_grads_aux(xs, ws, bs, ids, logprobs, labels, where, cotangent, numeric, *, static):
    """One evaluation of the oracle: (loss, (g_x, g_w, g_b), aux)."""
    options = dict(static) | numeric

    def scalar(xs, ws, bs):
        loss, aux = topk_distill_loss(
            xs, ws, ids, logprobs, labels, student_bias=bs, where=where, return_aux=True, **options
        )
        return cotangent * loss, aux

    (loss, aux), grads = jax.value_and_grad(scalar, argnums=(0, 1, 2), has_aux=True)(xs, ws, bs)
    return loss, grads, aux


def oracle64_chunked(p: TopKProblem, rows_per_call=128, **options) -> Oracle:
    """:func:`oracle64` of a "sum" loss summed over blocks of rows (bounded float64 temporaries at
    real vocabularies), then reduced as ``options["reduction"]`` asks. No ``where`` option."""
    reduction = options.pop("reduction", "mean")
    lead = p.labels.shape
    flat = dataclasses.replace(
        p,
        student_hidden=p.student_hidden.reshape(-1, p.student_hidden.shape[-1]),
        teacher_ids=p.teacher_ids.reshape(-1, p.teacher_ids.shape[-1]),
        teacher_logprobs=p.teacher_logprobs.reshape(-1, p.teacher_logprobs.shape[-1]),
        labels=p.labels.reshape(-1),
        teacher_hidden=None,
        teacher_weight=None,
        teacher_bias=None,
    )
    n = flat.labels.shape[0]
    loss, soft, hard, count = 0.0, 0.0, 0.0, 0
    grad_x, grad_w, grad_b = [], 0.0, 0.0
    for start in range(0, n, rows_per_call):
        rows = slice(start, min(n, start + rows_per_call))
        block = dataclasses.replace(
            flat,
            student_hidden=flat.student_hidden[rows],
            teacher_ids=flat.teacher_ids[rows],
            teacher_logprobs=flat.teacher_logprobs[rows],
            labels=flat.labels[rows],
        )
        o = oracle64(block, **options, reduction="sum")
        loss, soft, hard = loss + o.loss, soft + o.aux["soft_loss"], hard + o.aux["hard_loss"]
        count += int(o.aux["num_valid_tokens"])
        grad_x.append(o.grads[0])
        grad_w = grad_w + o.grads[1]
        grad_b = None if o.grads[2] is None else grad_b + o.grads[2]
    scale = 1.0 / max(1, count) if reduction == "mean" else 1.0
    grads = (
        np.concatenate(grad_x).reshape(lead + (-1,)) * scale,
        grad_w * scale,
        None if grad_b is None else grad_b * scale,
    )
    aux = {"soft_loss": soft * scale, "hard_loss": hard * scale, "num_valid_tokens": np.asarray(count)}
    return Oracle(np.asarray(loss * scale), grads, aux)


# --- teacher_topk ------------------------------------------------------------------------------------


def assert_topk_matches(got_ids, got_logprobs, full_logprobs, k, *, atol):
    """``(got_ids, got_logprobs)`` is the top-k of ``full_logprobs`` (..., V), up to near-ties.

    - ids are int32, distinct per row and in range; log-probs float32 and non-increasing;
    - each returned log-prob is the reference log-prob of its id, within ``atol``;
    - the returned log-probs are the reference's k largest, in order, within ``atol``;
    - each id equals the reference's id at that rank unless the reference has another value
      within ``2·atol`` of it (a near-tie, where the rounding of either side may swap the order).
    """
    got_ids, got_logprobs = np.asarray(got_ids), np.asarray(got_logprobs)
    full = np.asarray(full_logprobs, np.float64)
    vocab = full.shape[-1]
    assert got_ids.shape == got_logprobs.shape == full.shape[:-1] + (k,)
    assert got_ids.dtype == np.int32, got_ids.dtype
    assert got_logprobs.dtype == np.float32, got_logprobs.dtype
    got_ids = got_ids.reshape(-1, k)
    got_lp = got_logprobs.reshape(-1, k).astype(np.float64)
    full = full.reshape(-1, vocab)
    assert np.all((got_ids >= 0) & (got_ids < vocab))
    assert np.all(np.diff(np.sort(got_ids, axis=-1), axis=-1) > 0), "repeated ids"
    assert np.all(np.diff(got_lp, axis=-1) <= 0), "log-probs not descending"
    np.testing.assert_allclose(got_lp, np.take_along_axis(full, got_ids, axis=-1), rtol=0, atol=atol)
    # The reference's k + 1 largest, in order (argpartition first: V may be 10^5 wide).
    top = min(k + 1, vocab)
    candidates = np.argpartition(-full, top - 1, axis=-1)[:, :top] if top < vocab else np.arange(vocab)[None]
    candidates = np.broadcast_to(candidates, (full.shape[0], top))
    within = np.argsort(-np.take_along_axis(full, candidates, axis=-1), axis=-1, kind="stable")
    order = np.take_along_axis(candidates, within, axis=-1)
    want_ids = order[:, :k]
    want_lp = np.take_along_axis(full, want_ids, axis=-1)
    np.testing.assert_allclose(got_lp, want_lp, rtol=0, atol=atol)
    sorted_full = np.take_along_axis(full, order, axis=-1)
    if k == vocab:
        sorted_full = np.concatenate([sorted_full, np.full((full.shape[0], 1), -np.inf)], axis=-1)
    gaps = -np.diff(sorted_full, axis=-1)  # (rows, k): gap between rank j and j + 1
    gap_before = np.concatenate([np.full((full.shape[0], 1), np.inf), gaps[:, :-1]], axis=-1)
    isolated = np.minimum(gaps, gap_before) > 2 * atol
    mismatched = isolated & (got_ids != want_ids)
    assert not mismatched.any(), f"{int(mismatched.sum())} ids differ from the reference's away from near-ties"
    return int((~isolated).sum())


@functools.partial(jax.jit, static_argnames=("k", "layout"))
def lax_topk_f32(teacher_hidden, teacher_weight, teacher_bias, temperature, *, k, layout="hv"):
    """The plain float32 computation: lax.top_k of the full log_softmax(z_t/T) (ids int32, logprobs)."""
    contract = 0 if layout == "hv" else 1
    z = jax.lax.dot_general(
        teacher_hidden,
        teacher_weight,
        (((teacher_hidden.ndim - 1,), (contract,)), ((), ())),
        preferred_element_type=jnp.float32,
    )
    if teacher_bias is not None:
        z = z + teacher_bias.astype(jnp.float32)
    logprobs, ids = jax.lax.top_k(jax.nn.log_softmax(z / temperature, axis=-1), k)
    return ids.astype(jnp.int32), logprobs
