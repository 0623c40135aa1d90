"""The demo's phases: data → teacher → (top-k cache) → CE-only student → distilled student(s) → held-out
evaluation → report."""

from __future__ import annotations

import contextlib
import dataclasses
import functools
import hashlib
import pathlib
import sys
import tempfile
import time

import flax
import jax
import numpy as np
import optax
import tokenizers
from tqdm import tqdm

from jaxdistill.demo import cache, data, report
from jaxdistill.demo.config import CACHE_NAME, DemoConfig, build_parser, parse_config
from jaxdistill.demo.train import (
    block_differences,
    cache_teacher,
    ce_train_step,
    count_params,
    distill_train_step,
    make_model,
    make_optimizer,
    offline_distill_train_step,
    per_token,
    train,
    window_sums,
)
from jaxdistill.fused import resolve_implementation
from jaxdistill.training import DistillConfig


def prepare_data(config: DemoConfig):
    """Corpus, tokenizer and token streams (a three-step progress bar); returns (train, heldout, stats, tokenizer)."""
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
    return train_tokens, heldout_tokens, stats, tokenizer


def cache_identity(config: DemoConfig, *, tokenizer, train_tokens, starts, teacher) -> dict:
    """What a top-k teacher cache of this run holds: the header's ``identity`` (see :mod:`jaxdistill.demo.cache`).

    The settings that shape the teacher and the training stream, and hashes of the tokenizer, of
    the stream's windows (the tokens and the batch starts) and of the trained teacher's parameters.
    """
    return {
        "preset": config.preset,
        "corpus": config.corpus,
        "seed": config.seed,
        "tokenizer_sha256": hashlib.sha256(tokenizer.to_str().encode()).hexdigest(),
        "train_stream_sha256": cache.sha256_of_arrays(train_tokens, starts, np.asarray(config.seq_len)),
        "teacher": {
            "d_model": config.teacher.d_model,
            "n_layers": config.teacher.n_layers,
            "steps": config.teacher_steps,
            "lr": config.teacher_lr,
            "params_sha256": cache.params_sha256(teacher),
        },
    }


def run(config: DemoConfig, *, trained: dict | None = None, cache_dir: pathlib.Path | None = None) -> dict:
    """Run every phase and return the metrics dict of the report (not yet written).

    ``trained``: if given, a dict that receives the trained models (``teacher``, ``student_ce``,
    ``student_distilled``, with ``--teacher offline`` also ``student_offline``) and the final
    evaluation's held-out windows (``heldout_inputs``, ``heldout_labels``), for callers that
    measure them further.

    ``cache_dir``: with ``config.teacher_mode == "offline"``, where the top-k teacher cache is
    written (default: ``config.cache_dir``; if that is None too, a temporary directory removed
    on return).
    """
    if config.teacher_mode == "offline" and cache_dir is None and config.cache_dir is None:
        with tempfile.TemporaryDirectory(prefix="jaxdistill-topk-") as scratch:
            return run(config, trained=trained, cache_dir=pathlib.Path(scratch) / CACHE_NAME)
    cache_dir = cache_dir if cache_dir is not None else config.cache_dir
    begin = time.perf_counter()
    timings = {}
    train_tokens, heldout_tokens, corpus_stats, tokenizer = prepare_data(config)
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

    roles = [("student_ce", "student (CE only)"), ("student_distilled", "student (distilled)")]
    offline = None
    if config.teacher_mode == "offline":
        # The teacher's top-k over the distilled student's batches (same windows, same order, at
        # the distillation temperature), written to disk and read back through the header check.
        identity = cache_identity(
            config, tokenizer=tokenizer, train_tokens=train_tokens, starts=student_starts, teacher=teacher
        )
        begin_cache = time.perf_counter()
        topk_cache = cache.build(
            cache_dir,
            teacher,
            train_tokens,
            student_starts,
            seq_len=config.seq_len,
            k=config.topk,
            temperature=config.temperature,
            identity=identity,
            progress=config.progress,
        )
        timings["teacher_topk_cache"] = time.perf_counter() - begin_cache
        sizes = topk_cache.file_sizes()
        offline = {
            "directory": str(cache_dir),
            "k": config.topk,
            "temperature": config.temperature,
            "tail": "bucket",
            "shape": topk_cache.header["fields"]["ids"]["shape"],
            "positions": int(np.prod(topk_cache.ids.shape[:-1])),
            "files": sizes,
            "bytes": sum(sizes.values()),
            "build_seconds": timings["teacher_topk_cache"],
            "mean_topk_mass": topk_cache.mean_mass(),
            "git_sha": topk_cache.header["git_sha"],
        }
        roles.append(("student_offline", f"student (offline top-{config.topk})"))

    students = {}
    for role, desc in roles:
        student = make_model(config.student, seed=config.seed + 1, **model_kwargs)  # identical init for all
        optimizer = make_optimizer(student, lr=config.student_lr, steps=config.student_steps)
        extras = None
        if role == "student_ce":
            step_fn = functools.partial(ce_train_step, student, optimizer)
        elif role == "student_distilled":
            step_fn = functools.partial(distill_train_step, student, teacher, optimizer, config=loss_config)
        else:  # the same loss settings, against the cache: no teacher runs
            step_fn = functools.partial(offline_distill_train_step, student, optimizer, config=loss_config)
            extras = topk_cache.batch
        curves[role] = train(
            desc,
            step_fn,
            train_tokens,
            student_starts,
            seq_len=config.seq_len,
            progress=config.progress,
            eval_fn=functools.partial(curve_point, student, curve_teacher),
            eval_every=config.eval_every,
            batch_extras=extras,
        )
        timings[role] = curves[role]["seconds"]
        students[role] = student
    del curve_teacher

    # One pass over the held-out windows: the teacher once per batch, every student on its output.
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
    blocks = functools.partial(block_differences, tokens_per_window=config.seq_len, windows_per_block=config.batch_size)
    noise = {
        "windows_per_block": config.batch_size,
        "tokens_per_block": config.batch_size * config.seq_len,
        "differences": blocks(sums["student_ce"], sums["student_distilled"]),
    }
    if offline is not None:
        noise["differences_offline"] = {
            "vs_ce_only": blocks(sums["student_ce"], sums["student_offline"]),
            "vs_online": blocks(sums["student_distilled"], sums["student_offline"]),
        }
    timings["heldout_eval"] = time.perf_counter() - begin_eval
    timings["total"] = time.perf_counter() - begin
    if trained is not None:
        trained.update(teacher=teacher, **students, heldout_inputs=inputs, heldout_labels=labels)

    device = jax.devices()[0]
    metrics = {
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
    if offline is not None:
        metrics["offline_cache"] = offline
        metrics["comparison_offline"] = report.compare_offline(heldout, noise["differences_offline"])
    return metrics


def main(argv: list[str] | None = None) -> int:
    """``python -m jaxdistill.demo [flags]``: run the demo and write its report; returns the exit status."""
    config = parse_config(argv)
    try:
        with contextlib.ExitStack() as stack:
            cache_dir, move_in = config.cache_dir, {}
            if config.teacher_mode == "offline" and cache_dir is None:
                # The default cache goes inside the report directory: it is built next to it and
                # moved in with the report's other files, so an interrupted run changes nothing.
                config.out.parent.mkdir(parents=True, exist_ok=True)
                scratch = stack.enter_context(
                    tempfile.TemporaryDirectory(prefix=f".{config.out.name}.cache-", dir=config.out.parent)
                )
                cache_dir = pathlib.Path(scratch) / CACHE_NAME
                move_in = {CACHE_NAME: cache_dir}
            metrics = run(config, cache_dir=cache_dir)
            if move_in:
                metrics["offline_cache"]["directory"] = str(config.out / CACHE_NAME)
            out = report.write_report(metrics, config.out, move_in=move_in)
    except data.CorpusTooShortError as error:
        build_parser().error(str(error))
    except cache.CacheMismatchError as error:
        print(f"error: {error}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print(f"\ninterrupted: {config.out} was not written or changed", file=sys.stderr)
        return 130
    files = "summary.md, metrics.json, curves.png" + (f", {CACHE_NAME}/" if move_in else "")
    print(f"report: {out}/{files} ({metrics['timings_s']['total']:.0f} s)")
    comparison = metrics["comparison"]
    for key, label in [("ce", "held-out CE"), ("agreement", "top-1 agreement with teacher")]:
        c = comparison[key]
        print(
            f"{label}: CE-only {report.format_value(key, c['ce_only'])}, distilled "
            f"{report.format_value(key, c['distilled'])}, difference "
            f"{report.format_value(key, c['distilled_minus_ce_only'], signed=True)} "
            f"(noise threshold {report.format_noise(key, c)}): {report.VERDICTS[c['verdict']]}"
        )
    if "comparison_offline" in metrics:
        for line in report.offline_lines(metrics):
            print(line)
    return 0
