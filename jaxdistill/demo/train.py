"""Models, optimizer, training loops and held-out evaluation of the demo."""

from __future__ import annotations

import time

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx
from tqdm import tqdm

from jaxdistill.demo import data
from jaxdistill.demo.config import ModelSize
from jaxdistill.training import train_step
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


@nnx.jit
def eval_sums(teacher, student, inputs, labels):
    """Sums over the (B, L) tokens of: student CE, KL(teacher‖student), top-1 agreement, accuracies, teacher CE.

    All at temperature 1 on materialized logits (the evaluation is small).
    """
    log_p = jax.nn.log_softmax(teacher(inputs))
    log_q = jax.nn.log_softmax(student(inputs))
    pick = labels[..., None]
    teacher_top1, student_top1 = jnp.argmax(log_p, -1), jnp.argmax(log_q, -1)
    return {
        "ce": -jnp.sum(jnp.take_along_axis(log_q, pick, -1)),
        "kl_to_teacher": jnp.sum(jnp.exp(log_p) * (log_p - log_q)),
        "agreement": jnp.sum(student_top1 == teacher_top1),
        "accuracy": jnp.sum(student_top1 == labels),
        "teacher_ce": -jnp.sum(jnp.take_along_axis(log_p, pick, -1)),
        "teacher_accuracy": jnp.sum(teacher_top1 == labels),
    }


def evaluate(teacher, student, inputs: np.ndarray, labels: np.ndarray, *, batch_size: int, progress=None):
    """Per-token held-out metrics of ``student`` and of ``teacher`` over (n, L) windows, in batches.

    Returns:
      (student, teacher) dicts. student: ``ce`` (nats/token), ``perplexity`` = exp(ce),
      ``kl_to_teacher`` (nats/token), ``agreement`` and ``accuracy`` (fractions), ``tokens``;
      teacher: ``ce``, ``perplexity``, ``accuracy``.
    """
    sums = None
    for start in range(0, len(inputs), batch_size):
        batch = eval_sums(teacher, student, inputs[start : start + batch_size], labels[start : start + batch_size])
        sums = batch if sums is None else jax.tree.map(jnp.add, sums, batch)
        if progress is not None:
            progress.update(1)
    means = {key: float(value) / labels.size for key, value in jax.device_get(sums).items()}
    teacher_metrics = {key.removeprefix("teacher_"): means.pop(key) for key in ("teacher_ce", "teacher_accuracy")}
    for metrics in (means, teacher_metrics):
        metrics["perplexity"] = float(np.exp(metrics["ce"]))
    means["tokens"] = int(labels.size)
    return means, teacher_metrics


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
) -> dict:
    """Run ``step_fn(batch) -> metrics`` over the batches at ``starts`` (steps, B); returns the curves.

    Every ``eval_every`` steps (and before the first and after the last) ``eval_fn()`` adds a
    held-out point: ``eval_fn() -> dict``. The returned dict has ``step`` and one list per
    training metric, ``eval`` (a list of ``{"step", **metrics}``) and ``seconds`` (wall time,
    compilation and evaluations included).
    """
    begin = time.perf_counter()
    history, evals = [], []
    steps = len(starts)
    with tqdm(total=steps, desc=name, unit="step", disable=not progress, dynamic_ncols=True) as bar:
        for step in range(steps):
            if eval_fn is not None and step % eval_every == 0:
                evals.append({"step": step, **eval_fn()})
            inputs, labels = data.windows(tokens, starts[step], seq_len)
            metrics = step_fn({"inputs": jnp.asarray(inputs), "labels": jnp.asarray(labels)})
            history.append(metrics)
            if step % 10 == 0 or step == steps - 1:
                bar.set_postfix(loss=f"{float(metrics['loss']):.3f}")
            bar.update(1)
        if eval_fn is not None:
            evals.append({"step": steps, **eval_fn()})
    history = jax.device_get(history)
    curves = {"step": list(range(1, steps + 1))}
    for key in ("loss", "soft_loss", "hard_loss"):
        if key in history[0]:
            curves[key] = [float(m[key]) for m in history]
    curves["eval"] = evals
    curves["seconds"] = time.perf_counter() - begin
    return curves
