"""The demo's report: ``metrics.json``, ``summary.md`` and ``curves.png``, published atomically.

:func:`write_report` writes everything into a fresh hidden directory next to the target and
renames it into place only when every file is complete, so an interrupted run leaves either
the previous report or none, never a half-written one.
"""

from __future__ import annotations

import contextlib
import json
import os
import pathlib
import shutil
import tempfile

import numpy as np
from matplotlib.figure import Figure

STUDENTS = {"student_ce": "CE-only student", "student_distilled": "distilled student"}
# (metric, label, lower is better)
COMPARED = [
    ("ce", "held-out cross-entropy", True),
    ("perplexity", "held-out perplexity", True),
    ("kl_to_teacher", "KL(teacher‖student) on held-out text", True),
    ("agreement", "top-1 agreement with the teacher", False),
    ("accuracy", "next-token accuracy", False),
]
FRACTIONS = ("agreement", "accuracy")
VERDICTS = {
    "better": "distilled better",
    "worse": "distilled worse",
    "within_noise": "within noise",
    "no_estimate": "noise not estimated (fewer than 2 held-out blocks)",
}
# Two-sided 95% quantiles of Student's t with 1 … 30 degrees of freedom.
_T95 = (12.71, 4.30, 3.18, 2.78, 2.57, 2.45, 2.36, 2.31, 2.26, 2.23, 2.20, 2.18, 2.16, 2.14, 2.13)
_T95 += (2.12, 2.11, 2.10, 2.09, 2.09, 2.08, 2.07, 2.07, 2.06, 2.06, 2.06, 2.05, 2.05, 2.05, 2.04)


def t95(degrees_of_freedom: int) -> float:
    """The two-sided 95% quantile of Student's t (within 0.005 beyond the table: 1.96 + 2.4/df)."""
    if degrees_of_freedom <= len(_T95):
        return _T95[degrees_of_freedom - 1]
    return 1.96 + 2.4 / degrees_of_freedom


def noise(block_differences: list[float]) -> dict:
    """Standard error of the mean per-block difference and the 95% noise threshold.

    The held-out windows are split into blocks of consecutive text; each block gives one paired
    difference (distilled − CE-only, same text for both students). The threshold is
    t95(blocks − 1) × standard error: a difference within it is not told apart from the
    noise of which held-out text was drawn. Blocks of nearby text are not fully independent,
    so this is an estimate, not a guarantee.
    """
    samples = np.asarray(block_differences, dtype=np.float64)
    if samples.size < 2:
        return {"blocks": int(samples.size), "standard_error": None, "threshold": None}
    standard_error = float(np.std(samples, ddof=1) / np.sqrt(samples.size))
    return {
        "blocks": int(samples.size),
        "standard_error": standard_error,
        "threshold": t95(samples.size - 1) * standard_error,
    }


def compare(heldout: dict, block_differences: dict[str, list[float]]) -> dict:
    """For each compared metric: both values, distilled − CE-only, its noise and the verdict.

    ``verdict`` is ``"better"`` or ``"worse"`` (for the distilled student) only when the
    difference exceeds the noise threshold of :func:`noise`, else ``"within_noise"``;
    perplexity, exp(cross-entropy), takes the verdict of the cross-entropy.

    Args:
      heldout: per-token metrics of ``student_ce`` and ``student_distilled``.
      block_differences: metric → per-block differences distilled − CE-only (no perplexity).
    """
    comparison = {}
    for key, _, lower_is_better in COMPARED:
        ce_only, distilled = heldout["student_ce"][key], heldout["student_distilled"][key]
        difference = distilled - ce_only
        entry = {
            "ce_only": ce_only,
            "distilled": distilled,
            "distilled_minus_ce_only": difference,
            "relative_change": difference / ce_only if ce_only else None,
        }
        if key == "perplexity":
            entry["verdict"] = comparison["ce"]["verdict"]
        else:
            entry.update(noise(block_differences[key]))
            if entry["threshold"] is None:
                entry["verdict"] = "no_estimate"
            elif abs(difference) <= entry["threshold"]:
                entry["verdict"] = "within_noise"
            else:
                entry["verdict"] = "better" if (difference < 0) == lower_is_better else "worse"
        comparison[key] = entry
    return comparison


def format_noise(key: str, entry: dict) -> str:
    """The noise threshold of a compared metric in its unit, e.g. ``"±0.0251 nats/token"``."""
    if entry.get("threshold") is None:
        return "no noise estimate"
    return "±" + format_value(key, entry["threshold"], signed=True).removeprefix("+")


def format_value(key: str, value: float, *, signed: bool = False) -> str:
    """A metric value (or a signed difference) with its unit."""
    sign = "+" if signed else ""
    if key in FRACTIONS:
        return f"{100 * value:{sign}.2f}" + (" points" if signed else "%")
    if key == "perplexity":
        return f"{value:{sign}.2f}"
    return f"{value:{sign}.4f} nats/token"


def _count(n: int, noun: str) -> str:
    return f"{n} {noun}{'' if n == 1 else 's'}"


def summary_markdown(metrics: dict) -> str:
    """The human-readable summary; every comparison in it is computed from ``metrics``."""
    config, corpus, models = metrics["config"], metrics["corpus"], metrics["models"]
    heldout, comparison, timings = metrics["heldout"], metrics["comparison"], metrics["timings_s"]
    env = metrics["environment"]
    lines = [
        "# jaxdistill demo: distilling a small language model on Python's bundled documentation",
        "",
        f"Preset `{config['preset']}`, seed {config['seed']}, {env['backend']} ({env['device']}), "
        f"jax {env['jax']}, fused loss implementation `{env['fused_implementation']}`; "
        f"total time {timings['total']:.0f} s.",
        "",
        f"- **Text**: {corpus['source']} (Python {corpus['python']}): {corpus['train_chars']:,} training "
        f"characters → {corpus['train_tokens']:,} tokens; {corpus['heldout_chars']:,} held-out characters → "
        f"{corpus['heldout_tokens']:,} tokens, of which {heldout['tokens']:,} are evaluated.",
        f"- **Tokenizer**: byte-level BPE (HF `tokenizers`), {corpus['vocab_size']:,} tokens, trained on the "
        "training text only.",
    ]
    for role, label in [("teacher", "Teacher"), ("student", "Students")]:
        m = models[role]
        steps = config["teacher_steps"] if role == "teacher" else config["student_steps"]
        lines.append(
            f"- **{label}**: d_model {m['d_model']}, {_count(m['n_layers'], 'layer')}, {_count(m['n_heads'], 'head')}, "
            f"{m['params']:,} parameters; {steps} steps of {config['batch_size']} × {config['seq_len']} tokens."
        )
    lines += [
        "- **Training**: both students have identical initialization (same seed) and the same batches. "
        "The CE-only student minimizes next-token cross-entropy; the distilled student minimizes "
        f"JSD_β(teacher, student) + {config['hard_weight']} · CE with β = {config['beta']}, "
        f"T = {config['temperature']} (`jaxdistill.fused_linear_jsd_loss`, logits never materialized).",
        "",
        "## Held-out results",
        "",
        "| model | cross-entropy (nats/token) | perplexity | KL(teacher‖model) | top-1 agreement with teacher "
        "| next-token accuracy |",
        "|---|---|---|---|---|---|",
        f"| teacher | {heldout['teacher']['ce']:.4f} | {heldout['teacher']['perplexity']:.2f} | 0 | 100% "
        f"| {100 * heldout['teacher']['accuracy']:.2f}% |",
    ]
    for role, label in STUDENTS.items():
        h = heldout[role]
        lines.append(
            f"| {label} | {h['ce']:.4f} | {h['perplexity']:.2f} | {h['kl_to_teacher']:.4f} "
            f"| {100 * h['agreement']:.2f}% | {100 * h['accuracy']:.2f}% |"
        )
    blocks = metrics["heldout_blocks"]
    n_blocks = comparison["ce"].get("blocks", 0)
    lines += [
        "",
        "## Distilled vs CE-only student",
        "",
        f"Noise: the held-out windows form {_count(n_blocks, 'block')} of {blocks['tokens_per_block']:,} "
        "consecutive tokens; each block gives one paired difference (distilled − CE-only, same text). A "
        "difference is called better or worse only beyond the noise threshold t₉₅ × (standard error of the "
        "mean block difference), a 95% interval; within it the two students are not told apart. Blocks of "
        "nearby text are not fully independent, so the threshold is an estimate.",
        "",
    ]
    for key, label, lower_is_better in COMPARED:
        c = comparison[key]
        relative = "" if c["relative_change"] is None else f" ({100 * c['relative_change']:+.1f}%)"
        if key == "perplexity":
            noise_text = "verdict of the cross-entropy"
        else:
            noise_text = f"noise threshold {format_noise(key, c)}"
        verdict = {
            "better": "the distilled student is **better**",
            "worse": "the distilled student is **worse**",
            "within_noise": "**within noise**",
            "no_estimate": "**no verdict** (too few blocks to estimate the noise)",
        }[c["verdict"]]
        lines.append(
            f"- {label}: distilled {format_value(key, c['distilled'])} vs CE-only {format_value(key, c['ce_only'])}; "
            f"difference {format_value(key, c['distilled_minus_ce_only'], signed=True)}{relative}, {noise_text} → "
            f"{verdict} ({'lower' if lower_is_better else 'higher'} is better)."
        )

    def verdict_phrase(key, other, what):
        return {
            "better": f"beats {other} on {what}",
            "worse": f"is worse than {other} on {what}",
            "within_noise": f"is within noise of {other} on {what}",
            "no_estimate": f"is not compared with {other} on {what} (no noise estimate)",
        }[comparison[key]["verdict"]]

    lines += [
        "",
        "**Verdict** (from the numbers above): the distilled student "
        f"{verdict_phrase('ce', 'the CE-only student', 'held-out cross-entropy')} and "
        f"{verdict_phrase('agreement', 'it', 'top-1 agreement with the teacher')}.",
        "",
        "## Time",
        "",
        "| phase (compilation and curve evaluations included) | seconds |",
        "|---|---|",
    ]
    lines += [f"| {phase} | {seconds:.1f} |" for phase, seconds in timings.items()]
    lines += ["", "Learning curves: `curves.png`; every number: `metrics.json`.", ""]
    return "\n".join(lines)


def plot_curves(metrics: dict, path: pathlib.Path) -> None:
    """2×2 learning curves: training loss, held-out CE, KL to the teacher, top-1 agreement."""
    curves = metrics["curves"]
    fig = Figure(figsize=(11, 8), layout="constrained")
    axes = fig.subplots(2, 2)
    colors = {"teacher": "black", "student_ce": "tab:blue", "student_distilled": "tab:orange"}

    ax = axes[0, 0]
    ax.plot(curves["teacher"]["step"], curves["teacher"]["loss"], color=colors["teacher"], lw=0.8, label="teacher CE")
    ax.plot(
        curves["student_ce"]["step"],
        curves["student_ce"]["loss"],
        color=colors["student_ce"],
        lw=0.8,
        label="CE-only CE",
    )
    distilled = curves["student_distilled"]
    ax.plot(distilled["step"], distilled["hard_loss"], color=colors["student_distilled"], lw=0.8, label="distilled CE")
    ax.plot(
        distilled["step"],
        distilled["soft_loss"],
        color=colors["student_distilled"],
        lw=0.8,
        ls=":",
        label="distilled soft loss (JSD_β)",
    )
    ax.set(title="training loss (per batch)", xlabel="step", ylabel="nats/token")
    ax.legend(fontsize=8)

    panels = [
        (axes[0, 1], "ce", "held-out cross-entropy", "nats/token", metrics["heldout"]["teacher"]["ce"]),
        (axes[1, 0], "kl_to_teacher", "held-out KL(teacher‖student)", "nats/token", None),
        (axes[1, 1], "agreement", "held-out top-1 agreement with teacher", "fraction", None),
    ]
    for ax, key, title, unit, teacher_value in panels:
        for role, label in STUDENTS.items():
            points = curves[role]["eval"]
            ax.plot([p["step"] for p in points], [p[key] for p in points], marker=".", color=colors[role], label=label)
        if teacher_value is not None:
            ax.axhline(teacher_value, color=colors["teacher"], ls="--", lw=0.8, label="teacher")
        ax.set(title=title, xlabel="student step", ylabel=unit)
        ax.legend(fontsize=8)
    curve_tokens = curves["student_ce"]["eval"][0]["tokens"]
    fig.suptitle(f"jaxdistill demo (held-out curves on the first {curve_tokens:,} held-out tokens)")
    fig.savefig(path, dpi=110)


def _json_default(value):
    if hasattr(value, "tolist"):
        return value.tolist()
    if isinstance(value, pathlib.Path):
        return str(value)
    raise TypeError(f"not JSON serializable: {type(value).__name__}")


@contextlib.contextmanager
def staged_directory(out: pathlib.Path):
    """Yield an empty hidden directory next to ``out``; on success it replaces ``out`` (renames), else it is removed."""
    out = pathlib.Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    staging = pathlib.Path(tempfile.mkdtemp(prefix=f".{out.name}.tmp-", dir=out.parent))
    staging.chmod(0o755)  # mkdtemp makes it private
    try:
        yield staging
        if out.exists():
            previous = pathlib.Path(tempfile.mkdtemp(prefix=f".{out.name}.old-", dir=out.parent))
            os.replace(out, previous / out.name)
            os.replace(staging, out)
            shutil.rmtree(previous)
        else:
            os.replace(staging, out)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise


def write_report(metrics: dict, out: pathlib.Path) -> pathlib.Path:
    """Write ``metrics.json``, ``summary.md`` and ``curves.png`` into ``out`` atomically; returns ``out``."""
    with staged_directory(out) as staging:
        (staging / "metrics.json").write_text(json.dumps(metrics, indent=2, default=_json_default) + "\n")
        (staging / "summary.md").write_text(summary_markdown(metrics))
        plot_curves(metrics, staging / "curves.png")
    return pathlib.Path(out)
