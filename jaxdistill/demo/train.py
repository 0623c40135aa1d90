"""Models, optimizer, training loops and held-out evaluation of the demo."""

from __future__ import annotations

import functools
import time

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx
from tqdm import tqdm

from jaxdistill.demo import data
from jaxdistill.demo.config import ModelSize
from jaxdistill.topk import fused_linear_topk_distill_loss
from jaxdistill.training import DistillConfig, train_step
from jaxdistill.transformer import TransformerLM


def make_model(size: ModelSize, *, vocab_size: int, max_len: int, seed: int) -> TransformerLM:
    """An untied :class:`TransformerLM` of the given size, initialized from ``seed``."""
    return TransformerLM(
        vocab_size=vocab_size,
        d_model=size.d_model,
        n_layers=size.n_layers,
        n_heads=size.n_heads,
        d_ff=size.d_ff,
        max_len=max_len,
        rngs=nnx.Rngs(seed),
    )


def count_params(model: nnx.Module) -> int:
    return sum(x.size for x in jax.tree.leaves(nnx.state(model, nnx.Param)))


def make_optimizer(model: nnx.Module, *, lr: float, steps: int) -> nnx.Optimizer:
    """AdamW (weight decay 0.01, gradient clipping at norm 1) with linear warmup (5%) and cosine decay to lr/10."""
    schedule = optax.warmup_cosine_decay_schedule(
        0.0, lr, warmup_steps=max(1, steps // 20), decay_steps=max(2, steps), end_value=lr / 10
    )
    tx = optax.chain(optax.clip_by_global_norm(1.0), optax.adamw(schedule, b2=0.98, weight_decay=0.01))
    return nnx.Optimizer(model, tx, wrt=nnx.Param)


def _cross_entropy(model, batch):
    logits = model(batch["inputs"])
    return optax.softmax_cross_entropy_with_integer_labels(logits, batch["labels"]).mean()


@nnx.jit
def ce_train_step(model, optimizer, batch):
    """One AdamW step on the plain next-token cross-entropy (materialized logits); returns ``{"loss"}``."""
    loss, grads = nnx.value_and_grad(_cross_entropy)(model, batch)
    optimizer.update(model, grads)
    return {"loss": loss}


distill_train_step = nnx.jit(train_step, static_argnames="config")


def _offline_distill_loss(student, batch, *, config: DistillConfig):
    hidden = student.hidden_states(batch["inputs"])
    head = student.lm_head
    return fused_linear_topk_distill_loss(
        hidden,
        head.weight,
        batch["teacher_ids"],
        batch["teacher_logprobs"],
        batch["labels"],
        student_bias=head.bias,
        student_weight_layout=head.layout,
        beta=config.beta,
        temperature=config.temperature,
        soft_weight=config.soft_weight,
        hard_weight=config.hard_weight,
        ignore_index=config.ignore_index,
        tail="bucket",
        return_aux=True,
    )


@nnx.jit(static_argnames="config")
def offline_distill_train_step(student, optimizer, batch, *, config: DistillConfig):
    """One AdamW step on ``soft_weight · JSD_β(P̃‖Q̃) + hard_weight · CE`` against a cached top-k teacher.

    ``batch`` adds ``teacher_ids`` and ``teacher_logprobs`` (B, L, k), the teacher's top-k of
    log softmax(z_t/T) on these inputs (:mod:`jaxdistill.demo.cache`), to ``inputs`` and
    ``labels``; the loss is :func:`jaxdistill.fused_linear_topk_distill_loss` with the bucket
    tail (P̃, Q̃: the k cached ids plus one bucket for the rest of the vocabulary) and
    ``config``'s β, T and weights. No teacher runs. Returns the metrics of
    :func:`jaxdistill.training.train_step` (``loss``, ``soft_loss``, ``hard_loss``,
    ``num_valid_tokens``).
    """
    loss_and_grads = nnx.value_and_grad(functools.partial(_offline_distill_loss, config=config), has_aux=True)
    (loss, metrics), grads = loss_and_grads(student, batch)
    optimizer.update(student, grads)
    return dict(metrics, loss=loss)


@nnx.jit
def teacher_log_probs(teacher, inputs):
    """(B, L, V) float32 log-probabilities of the frozen teacher at temperature 1."""
    return jax.nn.log_softmax(teacher(inputs))


@jax.jit
def teacher_window_sums(log_p, labels):
    """Per-window (B,) sums over the L tokens: the teacher's ``ce`` and ``accuracy``."""
    return {
        "ce": -jnp.sum(jnp.take_along_axis(log_p, labels[..., None], -1)[..., 0], -1),
        "accuracy": jnp.sum(jnp.argmax(log_p, -1) == labels, -1),
    }


@nnx.jit
def student_window_sums(student, log_p, inputs, labels):
    """Per-window (B,) sums over the L tokens: the student's ``ce``, ``kl_to_teacher``
    (KL(teacher‖student)), ``agreement`` (same top-1 token as the teacher) and ``accuracy``.

    ``log_p``: (B, L, V) teacher log-probabilities. Temperature 1, materialized logits (the
    evaluation is small).
    """
    log_q = jax.nn.log_softmax(student(inputs))
    student_top1 = jnp.argmax(log_q, -1)
    return {
        "ce": -jnp.sum(jnp.take_along_axis(log_q, labels[..., None], -1)[..., 0], -1),
        "kl_to_teacher": jnp.sum(jnp.exp(log_p) * (log_p - log_q), (-2, -1)),
        "agreement": jnp.sum(student_top1 == jnp.argmax(log_p, -1), -1),
        "accuracy": jnp.sum(student_top1 == labels, -1),
    }


def cache_teacher(teacher, inputs: np.ndarray, *, batch_size: int) -> list[jax.Array]:
    """The teacher's log-probabilities on (n, L) windows, one (B, L, V) array per batch.

    Computed once and reused by every evaluation on these windows (the teacher is frozen);
    they take n · L · V · 4 bytes (64 MB for the learning-curve windows of the cpu preset).
    """
    batches = [teacher_log_probs(teacher, inputs[i : i + batch_size]) for i in range(0, len(inputs), batch_size)]
    return jax.block_until_ready(batches)


def window_sums(
    teacher, students: dict, inputs: np.ndarray, labels: np.ndarray, *, batch_size: int, cached=None, progress=None
) -> dict[str, dict[str, np.ndarray]]:
    """Per-window sums of every metric over (n, L) held-out windows, evaluated in batches.

    The teacher runs once per batch and serves every student (or ``cached``, from
    :func:`cache_teacher` on the same windows and batch size, replaces it).

    Returns:
      ``{"teacher": {ce, accuracy}, name: {ce, kl_to_teacher, agreement, accuracy}, …}`` for
      each ``name`` of ``students``; every value an (n,) float64 array of sums over L tokens.
    """
    batches = []
    for k, start in enumerate(range(0, len(inputs), batch_size)):
        window = slice(start, start + batch_size)
        log_p = teacher_log_probs(teacher, inputs[window]) if cached is None else cached[k]
        sums = {"teacher": teacher_window_sums(log_p, labels[window])}
        for name, student in students.items():
            sums[name] = student_window_sums(student, log_p, inputs[window], labels[window])
        batches.append(sums)
        if progress is not None:
            progress.update(1)
    batches = jax.device_get(batches)
    return {
        role: {key: np.concatenate([b[role][key] for b in batches]).astype(np.float64) for key in batches[0][role]}
        for role in batches[0]
    }


def per_token(sums: dict[str, np.ndarray], tokens_per_window: int, windows: int | None = None) -> dict:
    """Per-token means of per-window sums (over the first ``windows`` windows, default all), with
    ``perplexity`` = exp(ce) and ``tokens``."""
    n = len(next(iter(sums.values()))) if windows is None else windows
    means = {key: float(np.sum(value[:n])) / (n * tokens_per_window) for key, value in sums.items()}
    means["perplexity"] = float(np.exp(means["ce"]))
    means["tokens"] = n * tokens_per_window
    return means


def block_differences(a: dict, b: dict, tokens_per_window: int, windows_per_block: int) -> dict[str, list[float]]:
    """Per-token differences b − a of every metric, one per block of ``windows_per_block``
    consecutive windows (the last block may be shorter): the samples of the noise estimate."""
    n = len(next(iter(a.values())))
    starts = range(0, n, windows_per_block)
    return {
        key: [
            float(np.sum(b[key][i : i + windows_per_block] - a[key][i : i + windows_per_block]))
            / (min(windows_per_block, n - i) * tokens_per_window)
            for i in starts
        ]
        for key in a
    }


def train(
    name: str,
    step_fn,
    tokens: np.ndarray,
    starts: np.ndarray,
    *,
    seq_len: int,
    progress: bool,
    eval_fn=None,
    eval_every: int = 0,
    batch_extras=None,
) -> dict:
    """Run ``step_fn(batch) -> metrics`` over the batches at ``starts`` (steps, B); returns the curves.

    Every ``eval_every`` steps, from the first, ``eval_fn()`` adds a held-out point:
    ``eval_fn() -> dict`` (the point after the last step is the caller's: it comes from the
    final evaluation). The progress bar shows the training cross-entropy (``hard_loss`` of a
    distillation step, ``loss`` of a CE step) and, for distillation, the soft loss. The returned
    dict has ``step`` and one list per training metric, ``eval`` (a list of ``{"step",
    **metrics}``) and ``seconds`` (wall time, compilation and evaluations included).

    ``batch_extras(step) -> dict``, if given, adds arrays to the batch of each step (the offline
    teacher's cached top-k of that batch).
    """
    begin = time.perf_counter()
    history, evals = [], []
    steps = len(starts)
    with tqdm(total=steps, desc=name, unit="step", disable=not progress, dynamic_ncols=True) as bar:
        for step in range(steps):
            if eval_fn is not None and step % eval_every == 0:
                evals.append({"step": step, **eval_fn()})
            inputs, labels = data.windows(tokens, starts[step], seq_len)
            batch = {"inputs": inputs, "labels": labels}
            if batch_extras is not None:
                batch.update(batch_extras(step))
            metrics = step_fn({key: jnp.asarray(value) for key, value in batch.items()})
            history.append(metrics)
            if step % 10 == 0 or step == steps - 1:
                shown = {"ce": f"{float(metrics.get('hard_loss', metrics['loss'])):.3f}"}
                if "soft_loss" in metrics:
                    shown["soft"] = f"{float(metrics['soft_loss']):.3f}"
                bar.set_postfix(shown)
            bar.update(1)
    history = jax.device_get(history)
    curves = {"step": list(range(1, steps + 1))}
    for key in ("loss", "soft_loss", "hard_loss"):
        if key in history[0]:
            curves[key] = [float(m[key]) for m in history]
    curves["eval"] = evals
    curves["seconds"] = time.perf_counter() - begin
    return curves
