"""The demo's phases: data → teacher → CE-only student → distilled student → held-out evaluation → report."""

from __future__ import annotations

import dataclasses
import functools
import sys
import time

import flax
import jax
import numpy as np
import optax
import tokenizers
from tqdm import tqdm

from jaxdistill.demo import data, report
from jaxdistill.demo.config import DemoConfig, build_parser, parse_config
from jaxdistill.demo.train import (
    block_differences,
    cache_teacher,
    ce_train_step,
    count_params,
    distill_train_step,
    make_model,
    make_optimizer,
    per_token,
    train,
    window_sums,
)
from jaxdistill.fused import resolve_implementation
from jaxdistill.training import DistillConfig


def prepare_data(config: DemoConfig):
    """Corpus, tokenizer and token streams (a three-step progress bar); returns (train, heldout, stats)."""
    with tqdm(total=3, desc="data", unit="phase", disable=not config.progress, dynamic_ncols=True) as bar:
        bar.set_postfix_str("reading the docs")
        corpus = data.load_corpus(config.corpus)
        bar.update(1)
        bar.set_postfix_str("training the tokenizer")
        tokenizer = data.train_tokenizer(corpus.train, config.vocab_size)
        bar.update(1)
        bar.set_postfix_str("tokenizing")
        train_tokens = data.encode(tokenizer, corpus.train)
        heldout_tokens = data.encode(tokenizer, corpus.heldout)
        bar.update(1)
    stats = dict(
        corpus.stats(),
        vocab_size=tokenizer.get_vocab_size(),
        train_tokens=len(train_tokens),
        heldout_tokens=len(heldout_tokens),
    )
    return train_tokens, heldout_tokens, stats


def run(config: DemoConfig, *, trained: dict | None = None) -> dict:
    """Run every phase and return the metrics dict of the report (not yet written).

    ``trained``: if given, a dict that receives the trained models (``teacher``, ``student_ce``,
    ``student_distilled``) and the final evaluation's held-out windows (``heldout_inputs``,
    ``heldout_labels``), for callers that measure them further.
    """
    begin = time.perf_counter()
    timings = {}
    train_tokens, heldout_tokens, corpus_stats = prepare_data(config)
    vocab = corpus_stats["vocab_size"]
    timings["data"] = time.perf_counter() - begin

    # Every batch and evaluation window is fixed before training: the students share theirs.
    windows = dict(batch_size=config.batch_size, seq_len=config.seq_len)
    teacher_starts = data.batch_starts(len(train_tokens), steps=config.teacher_steps, seed=config.seed, **windows)
    student_starts = data.batch_starts(len(train_tokens), steps=config.student_steps, seed=config.seed + 1, **windows)
    # The curve windows are the first ones of the final evaluation's windows (both start at
    # the beginning of the held-out stream).
    curve_tokens = min(config.curve_eval_tokens, config.eval_tokens)
    curve_inputs, curve_labels = data.heldout_windows(
        heldout_tokens, config.seq_len, max(1, curve_tokens // config.seq_len)
    )
    inputs, labels = data.heldout_windows(heldout_tokens, config.seq_len, max(1, config.eval_tokens // config.seq_len))

    model_kwargs = dict(vocab_size=vocab, max_len=config.seq_len)
    teacher = make_model(config.teacher, seed=config.seed, **model_kwargs)
    optimizer = make_optimizer(teacher, lr=config.teacher_lr, steps=config.teacher_steps)
    curves = {
        "teacher": train(
            "teacher",
            functools.partial(ce_train_step, teacher, optimizer),
            train_tokens,
            teacher_starts,
            seq_len=config.seq_len,
            progress=config.progress,
        )
    }
    timings["teacher"] = curves["teacher"]["seconds"]

    # The fused loss with its default implementation: XLA on CPU, the Pallas kernel on GPU.
    loss_config = DistillConfig(
        beta=config.beta, temperature=config.temperature, soft_weight=1.0, hard_weight=config.hard_weight
    )
    # The teacher is frozen from here on: its outputs on the curve windows are computed once.
    begin_cache = time.perf_counter()
    curve_teacher = cache_teacher(teacher, curve_inputs, batch_size=config.batch_size)
    timings["teacher_curve_outputs"] = time.perf_counter() - begin_cache

    def curve_point(student, cached):
        sums = window_sums(
            teacher,
            {"student": student},
            curve_inputs,
            curve_labels,
            batch_size=config.batch_size,
            cached=cached,
        )
        return per_token(sums["student"], config.seq_len)

    students = {}
    for role, desc in [("student_ce", "student (CE only)"), ("student_distilled", "student (distilled)")]:
        student = make_model(config.student, seed=config.seed + 1, **model_kwargs)  # identical init for both
        optimizer = make_optimizer(student, lr=config.student_lr, steps=config.student_steps)
        if role == "student_ce":
            step_fn = functools.partial(ce_train_step, student, optimizer)
        else:
            step_fn = functools.partial(distill_train_step, student, teacher, optimizer, config=loss_config)
        curves[role] = train(
            desc,
            step_fn,
            train_tokens,
            student_starts,
            seq_len=config.seq_len,
            progress=config.progress,
            eval_fn=functools.partial(curve_point, student, curve_teacher),
            eval_every=config.eval_every,
        )
        timings[role] = curves[role]["seconds"]
        students[role] = student
    del curve_teacher

    # One pass over the held-out windows: the teacher once per batch, both students on its output.
    begin_eval = time.perf_counter()
    n_batches = -(-len(inputs) // config.batch_size)
    with tqdm(total=n_batches, desc="held-out eval", unit="batch", disable=not config.progress) as bar:
        sums = window_sums(teacher, students, inputs, labels, batch_size=config.batch_size, progress=bar)
    heldout = {role: per_token(role_sums, config.seq_len) for role, role_sums in sums.items()}
    del heldout["teacher"]["tokens"]
    heldout["tokens"] = int(labels.size)
    # The last point of each learning curve: the final students on the curve windows, from the same pass.
    for role in students:
        point = per_token(sums[role], config.seq_len, windows=len(curve_inputs))
        curves[role]["eval"].append({"step": config.student_steps, **point})
    noise = {
        "windows_per_block": config.batch_size,
        "tokens_per_block": config.batch_size * config.seq_len,
        "differences": block_differences(
            sums["student_ce"], sums["student_distilled"], config.seq_len, config.batch_size
        ),
    }
    timings["heldout_eval"] = time.perf_counter() - begin_eval
    timings["total"] = time.perf_counter() - begin
    if trained is not None:
        trained.update(teacher=teacher, **students, heldout_inputs=inputs, heldout_labels=labels)

    device = jax.devices()[0]
    return {
        "config": dataclasses.asdict(config),
        "environment": {
            "python": sys.version.split()[0],
            "jax": jax.__version__,
            "flax": flax.__version__,
            "optax": optax.__version__,
            "tokenizers": tokenizers.__version__,
            "numpy": np.__version__,
            "backend": jax.default_backend(),
            "device": getattr(device, "device_kind", str(device)),
            "fused_implementation": resolve_implementation(None),
        },
        "corpus": corpus_stats,
        "models": {
            "teacher": dict(
                dataclasses.asdict(config.teacher), n_heads=config.teacher.n_heads, params=count_params(teacher)
            ),
            "student": dict(
                dataclasses.asdict(config.student),
                n_heads=config.student.n_heads,
                params=count_params(students["student_ce"]),
            ),
        },
        "timings_s": timings,
        "heldout": heldout,
        "heldout_blocks": noise,
        "comparison": report.compare(heldout, noise["differences"]),
        "curves": curves,
    }


def main(argv: list[str] | None = None) -> int:
    """``python -m jaxdistill.demo [flags]``: run the demo and write its report; returns the exit status."""
    config = parse_config(argv)
    try:
        metrics = run(config)
        out = report.write_report(metrics, config.out)
    except data.CorpusTooShortError as error:
        build_parser().error(str(error))
    except KeyboardInterrupt:
        print(f"\ninterrupted: {config.out} was not written or changed", file=sys.stderr)
        return 130
    comparison = metrics["comparison"]
    print(f"report: {out}/summary.md, metrics.json, curves.png ({metrics['timings_s']['total']:.0f} s)")
    for key, label in [("ce", "held-out CE"), ("agreement", "top-1 agreement with teacher")]:
        c = comparison[key]
        print(
            f"{label}: CE-only {report.format_value(key, c['ce_only'])}, distilled "
            f"{report.format_value(key, c['distilled'])}, difference "
            f"{report.format_value(key, c['distilled_minus_ce_only'], signed=True)} "
            f"(noise threshold {report.format_noise(key, c)}): {report.VERDICTS[c['verdict']]}"
        )
    return 0
