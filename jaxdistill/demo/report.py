"""The demo's report: ``metrics.json``, ``summary.md`` and ``curves.png``, published atomically.

:func:`write_report` writes everything into a fresh hidden directory next to the target and
renames it into place only when every file is complete, so an interrupted run leaves either
the previous report or none, never a half-written one. With ``--teacher offline`` the report
also compares the offline-distilled student with the CE-only and the online-distilled ones
(:func:`compare_offline`), and the top-k cache can be moved into the report directory with it.
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
# The student labels when the report has an offline-distilled student too.
STUDENTS_OFFLINE = {
    "student_ce": "CE-only student",
    "student_distilled": "online-distilled student",
    "student_offline": "offline-distilled student",
}
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
# Where the offline-distilled student lands in held-out cross-entropy (see :func:`placement`).
PLACEMENTS = {
    "better_than_online": "better than both the CE-only and the online-distilled students",
    "level_with_online": "better than the CE-only student and within noise of the online-distilled one",
    "between": "between the CE-only and the online-distilled students",
    "level_with_ce_only": "within noise of the CE-only student",
    "worse_than_ce_only": "worse than the CE-only student",
    "no_estimate": "not placed (too few held-out blocks to estimate the noise)",
}
# "Between CE-only and online distillation, or better".
PLACED_BETWEEN_OR_BETTER = ("between", "level_with_online", "better_than_online")
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


def compare_pair(
    heldout: dict, block_differences: dict[str, list[float]], *, base: tuple[str, str], other: tuple[str, str]
) -> dict:
    """For each compared metric: both students' values, their difference, its noise and the verdict.

    ``base`` and ``other`` are (role in ``heldout``, name in the result) pairs; each entry holds
    the two values under their names, ``"{other}_minus_{base}"``, ``relative_change`` (relative to
    base), the fields of :func:`noise` and ``verdict``: ``"better"`` or ``"worse"`` (for
    ``other``) only when the difference exceeds the noise threshold, else ``"within_noise"``
    (``"no_estimate"`` without a threshold); perplexity, exp(cross-entropy), takes the verdict
    of the cross-entropy.

    Args:
      heldout: per-token metrics of both roles.
      block_differences: metric → per-block differences other − base (no perplexity).
    """
    (base_role, base_name), (other_role, other_name) = base, other
    comparison = {}
    for key, _, lower_is_better in COMPARED:
        base_value, other_value = heldout[base_role][key], heldout[other_role][key]
        difference = other_value - base_value
        entry = {
            base_name: base_value,
            other_name: other_value,
            f"{other_name}_minus_{base_name}": difference,
            "relative_change": difference / base_value if base_value else None,
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


def compare(heldout: dict, block_differences: dict[str, list[float]]) -> dict:
    """:func:`compare_pair` of the distilled student against the CE-only one.

    Entries: ``ce_only``, ``distilled``, ``distilled_minus_ce_only``, ``relative_change``, the
    noise fields and ``verdict`` (for the distilled student).

    Args:
      heldout: per-token metrics of ``student_ce`` and ``student_distilled``.
      block_differences: metric → per-block differences distilled − CE-only (no perplexity).
    """
    return compare_pair(
        heldout, block_differences, base=("student_ce", "ce_only"), other=("student_distilled", "distilled")
    )


def placement(vs_ce_only: str, vs_online: str) -> str:
    """Where the offline student lands (a key of :data:`PLACEMENTS`) from its two cross-entropy verdicts."""
    if "no_estimate" in (vs_ce_only, vs_online):
        return "no_estimate"
    if vs_ce_only != "better":
        return {"within_noise": "level_with_ce_only", "worse": "worse_than_ce_only"}[vs_ce_only]
    return {"better": "better_than_online", "within_noise": "level_with_online", "worse": "between"}[vs_online]


def compare_offline(heldout: dict, block_differences: dict[str, dict[str, list[float]]]) -> dict:
    """The offline-distilled student against the CE-only (``vs_ce_only``) and the online-distilled
    (``vs_online``) students, each a :func:`compare_pair` (names ``ce_only``/``online`` and
    ``offline``), and its ``placement`` in held-out cross-entropy (a key of :data:`PLACEMENTS`),
    with ``between_or_better``: whether that is between CE-only and online distillation or better.

    Args:
      heldout: per-token metrics of ``student_ce``, ``student_distilled`` and ``student_offline``.
      block_differences: ``{"vs_ce_only": …, "vs_online": …}``, each metric → per-block
        differences offline − the other student.
    """
    offline = ("student_offline", "offline")
    result = {
        "vs_ce_only": compare_pair(
            heldout, block_differences["vs_ce_only"], base=("student_ce", "ce_only"), other=offline
        ),
        "vs_online": compare_pair(
            heldout, block_differences["vs_online"], base=("student_distilled", "online"), other=offline
        ),
    }
    where = placement(result["vs_ce_only"]["ce"]["verdict"], result["vs_online"]["ce"]["verdict"])
    return dict(result, placement=where, between_or_better=where in PLACED_BETWEEN_OR_BETTER)


def offline_lines(metrics: dict) -> list[str]:
    """Two lines for the terminal: the cache, and the offline student's held-out cross-entropy."""
    cache, comparison = metrics["offline_cache"], metrics["comparison_offline"]
    vs_ce, vs_online = comparison["vs_ce_only"]["ce"], comparison["vs_online"]["ce"]
    return [
        f"offline teacher: top-{cache['k']} cache of {cache['positions']:,} positions, "
        f"{cache['bytes'] / 1e6:.1f} MB on disk, built in {cache['build_seconds']:.1f} s ({cache['directory']})",
        f"held-out CE: offline-distilled {format_value('ce', vs_ce['offline'])}, "
        f"{format_value('ce', vs_ce['offline_minus_ce_only'], signed=True)} vs CE-only "
        f"(noise threshold {format_noise('ce', vs_ce)}), "
        f"{format_value('ce', vs_online['offline_minus_online'], signed=True)} vs online "
        f"(noise threshold {format_noise('ce', vs_online)}): {PLACEMENTS[comparison['placement']]}",
    ]


def student_labels(metrics: dict) -> dict[str, str]:
    """Role → label of the students in this report."""
    return STUDENTS_OFFLINE if "student_offline" in metrics["heldout"] else STUDENTS


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


def _pair_lines(comparison: dict, *, other: str, base: str, names: dict[str, str], subject: str) -> list[str]:
    """One bullet per compared metric: ``other`` against ``base`` (result names of :func:`compare_pair`)."""
    lines = []
    for key, label, lower_is_better in COMPARED:
        c = comparison[key]
        relative = "" if c["relative_change"] is None else f" ({100 * c['relative_change']:+.1f}%)"
        if key == "perplexity":
            noise_text = "verdict of the cross-entropy"
        else:
            noise_text = f"noise threshold {format_noise(key, c)}"
        verdict = {
            "better": f"{subject} is **better**",
            "worse": f"{subject} is **worse**",
            "within_noise": "**within noise**",
            "no_estimate": "**no verdict** (too few blocks to estimate the noise)",
        }[c["verdict"]]
        lines.append(
            f"- {label}: {names[other]} {format_value(key, c[other])} vs {names[base]} {format_value(key, c[base])}; "
            f"difference {format_value(key, c[f'{other}_minus_{base}'], signed=True)}{relative}, {noise_text} → "
            f"{verdict} ({'lower' if lower_is_better else 'higher'} is better)."
        )
    return lines


def _verdict_phrase(verdict: str, other: str, what: str) -> str:
    return {
        "better": f"beats {other} on {what}",
        "worse": f"is worse than {other} on {what}",
        "within_noise": f"is within noise of {other} on {what}",
        "no_estimate": f"is not compared with {other} on {what} (no noise estimate)",
    }[verdict]


def _offline_section(metrics: dict) -> list[str]:
    """The offline-distilled student against the other two, and its verdict."""
    comparison = metrics["comparison_offline"]
    vs_ce, vs_online = comparison["vs_ce_only"], comparison["vs_online"]
    names = {"offline": "offline", "ce_only": "CE-only", "online": "online"}
    subject = "the offline-distilled student"
    lines = [
        "",
        "## Offline-distilled vs CE-only and online-distilled students",
        "",
        "Paired differences offline − CE-only and offline − online on the same held-out blocks, with the "
        "noise threshold defined above.",
        "",
        "Against the CE-only student:",
        "",
        *_pair_lines(vs_ce, other="offline", base="ce_only", names=names, subject=subject),
        "",
        "Against the online-distilled student:",
        "",
        *_pair_lines(vs_online, other="offline", base="online", names=names, subject=subject),
        "",
        "**Verdict (offline teacher)** (from the numbers above): in held-out cross-entropy the offline-distilled "
        f"student is {PLACEMENTS[comparison['placement']]} "
        f"({format_value('ce', vs_ce['ce']['offline'])} against {format_value('ce', vs_ce['ce']['ce_only'])} "
        f"CE-only and {format_value('ce', vs_online['ce']['online'])} online); it "
        f"{_verdict_phrase(vs_ce['agreement']['verdict'], 'the CE-only student', 'top-1 agreement with the teacher')}"
        f" and {_verdict_phrase(vs_online['agreement']['verdict'], 'the online-distilled student', 'it')}.",
    ]
    return lines


def _offline_bullets(metrics: dict) -> list[str]:
    """The offline student's loss and its teacher cache, for the setup list."""
    config, cache = metrics["config"], metrics["offline_cache"]
    steps, batch, seq_len, k = cache["shape"]
    files = " + ".join(
        f"`{name}` {size / 1e6:.1f} MB" if size >= 1e5 else f"`{name}` {size:,} bytes"
        for name, size in cache["files"].items()
    )
    return [
        "- **Offline teacher**: the offline-distilled student minimizes the same loss (same β, T, weights, "
        "steps, initialization and batches) against the teacher's cached top-k instead of the teacher's "
        f"logits: `jaxdistill.fused_linear_topk_distill_loss` with tail `{cache['tail']}` (the k cached ids "
        "plus one bucket for the rest of the vocabulary). No teacher runs during its training.",
        f"- **Top-k cache**: k = {k}, T = {config['temperature']}, {cache['positions']:,} positions ({steps} steps "
        f"× {batch} × {seq_len} tokens: the student's batches, in order); {files}; "
        f"**{cache['bytes'] / 1e6:.1f} MB on disk** ({cache['bytes']:,} bytes); built in "
        f"{cache['build_seconds']:.1f} s (teacher forward, top-k and writes, compilation included); read back "
        "through its header check."
        + (
            f" The k ids hold {100 * cache['mean_topk_mass']:.1f}% of the teacher's probability mass on average "
            "(the rest is the tail bucket)."
            if "mean_topk_mass" in cache
            else ""
        ),
    ]


def summary_markdown(metrics: dict) -> str:
    """The human-readable summary; every comparison in it is computed from ``metrics``."""
    config, corpus, models = metrics["config"], metrics["corpus"], metrics["models"]
    heldout, comparison, timings = metrics["heldout"], metrics["comparison"], metrics["timings_s"]
    env = metrics["environment"]
    offline = "comparison_offline" in metrics
    labels = student_labels(metrics)
    lines = [
        "# jaxdistill demo: distilling a small language model on Python's bundled documentation",
        "",
        f"Preset `{config['preset']}`, seed {config['seed']}, {env['backend']} ({env['device']}), "
        f"jax {env['jax']}, fused loss implementation `{env['fused_implementation']}`"
        + (f", teacher `offline:{config['topk']}`" if offline else "")
        + f"; total time {timings['total']:.0f} s.",
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
        f"- **Training**: {'all three' if offline else 'both'} students have identical initialization (same seed) "
        "and the same batches. The CE-only student minimizes next-token cross-entropy; the "
        f"{'online-' if offline else ''}distilled student minimizes "
        f"JSD_β(teacher, student) + {config['hard_weight']} · CE with β = {config['beta']}, "
        f"T = {config['temperature']} (`jaxdistill.fused_linear_jsd_loss`, logits never materialized).",
    ]
    if offline:
        lines += _offline_bullets(metrics)
    lines += [
        "",
        "## Held-out results",
        "",
        "| model | cross-entropy (nats/token) | perplexity | KL(teacher‖model) | top-1 agreement with teacher "
        "| next-token accuracy |",
        "|---|---|---|---|---|---|",
        f"| teacher | {heldout['teacher']['ce']:.4f} | {heldout['teacher']['perplexity']:.2f} | 0 | 100% "
        f"| {100 * heldout['teacher']['accuracy']:.2f}% |",
    ]
    for role, label in labels.items():
        h = heldout[role]
        lines.append(
            f"| {label} | {h['ce']:.4f} | {h['perplexity']:.2f} | {h['kl_to_teacher']:.4f} "
            f"| {100 * h['agreement']:.2f}% | {100 * h['accuracy']:.2f}% |"
        )
    blocks = metrics["heldout_blocks"]
    n_blocks = comparison["ce"].get("blocks", 0)
    lines += [
        "",
        f"## {'Online-distilled' if offline else 'Distilled'} vs CE-only student",
        "",
        f"Noise: the held-out windows form {_count(n_blocks, 'block')} of {blocks['tokens_per_block']:,} "
        "consecutive tokens; each block gives one paired difference (distilled − CE-only, same text). A "
        "difference is called better or worse only beyond the noise threshold t₉₅ × (standard error of the "
        "mean block difference), a 95% interval; within it the two students are not told apart. Blocks of "
        "nearby text are not fully independent, so the threshold is an estimate.",
        "",
    ]
    lines += _pair_lines(
        comparison,
        other="distilled",
        base="ce_only",
        names={"distilled": "distilled", "ce_only": "CE-only"},
        subject="the distilled student",
    )
    lines += [
        "",
        f"**Verdict** (from the numbers above): the {'online-' if offline else ''}distilled student "
        f"{_verdict_phrase(comparison['ce']['verdict'], 'the CE-only student', 'held-out cross-entropy')} and "
        f"{_verdict_phrase(comparison['agreement']['verdict'], 'it', 'top-1 agreement with the teacher')}.",
    ]
    if offline:
        lines += _offline_section(metrics)
    lines += [
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
    colors = {
        "teacher": "black",
        "student_ce": "tab:blue",
        "student_distilled": "tab:orange",
        "student_offline": "tab:green",
    }
    labels = student_labels(metrics)

    ax = axes[0, 0]
    ax.plot(curves["teacher"]["step"], curves["teacher"]["loss"], color=colors["teacher"], lw=0.8, label="teacher CE")
    ax.plot(
        curves["student_ce"]["step"],
        curves["student_ce"]["loss"],
        color=colors["student_ce"],
        lw=0.8,
        label="CE-only CE",
    )
    soft_names = {"student_distilled": "soft loss (JSD_β)", "student_offline": "soft loss (JSD_β, top-k buckets)"}
    for role, soft_name in soft_names.items():
        if role not in curves:
            continue
        name = labels[role].removesuffix(" student")
        distilled = curves[role]
        ax.plot(distilled["step"], distilled["hard_loss"], color=colors[role], lw=0.8, label=f"{name} CE")
        ax.plot(
            distilled["step"],
            distilled["soft_loss"],
            color=colors[role],
            lw=0.8,
            ls=":",
            label=f"{name} {soft_name}",
        )
    ax.set(title="training loss (per batch)", xlabel="step", ylabel="nats/token")
    ax.legend(fontsize=8)

    panels = [
        (axes[0, 1], "ce", "held-out cross-entropy", "nats/token", metrics["heldout"]["teacher"]["ce"]),
        (axes[1, 0], "kl_to_teacher", "held-out KL(teacher‖student)", "nats/token", None),
        (axes[1, 1], "agreement", "held-out top-1 agreement with teacher", "fraction", None),
    ]
    for ax, key, title, unit, teacher_value in panels:
        for role, label in labels.items():
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


def write_report(metrics: dict, out: pathlib.Path, *, move_in: dict[str, pathlib.Path] | None = None) -> pathlib.Path:
    """Write ``metrics.json``, ``summary.md`` and ``curves.png`` into ``out`` atomically; returns ``out``.

    ``move_in``: name → path of files or directories (the top-k teacher cache) moved into the
    report directory under that name, with the report (same filesystem: a rename).
    """
    with staged_directory(out) as staging:
        (staging / "metrics.json").write_text(json.dumps(metrics, indent=2, default=_json_default) + "\n")
        (staging / "summary.md").write_text(summary_markdown(metrics))
        plot_curves(metrics, staging / "curves.png")
        for name, path in (move_in or {}).items():
            os.replace(path, staging / name)
    return pathlib.Path(out)
