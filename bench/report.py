"""Benchmark output: the JSONL rows, the markdown table and the PNG plots (matplotlib, Agg)."""

from __future__ import annotations

import json
import math
from pathlib import Path

from bench.cases import STUDENT_FLOOR, TEACHER_FLOOR, TOPK_TARGETS, own_floor

ROWS_FILE = "rows.jsonl"
TABLE_FILE = "results.md"
TIME_PLOT_FILE = "time.png"
MEMORY_PLOT_FILE = "memory.png"


def read_rows(out_dir: Path) -> list[dict]:
    path = Path(out_dir) / ROWS_FILE
    if not path.exists():
        return []
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def append_row(out_dir: Path, row: dict) -> None:
    """Appends one row and flushes it to disk (a killed run keeps every finished row)."""
    with open(Path(out_dir) / ROWS_FILE, "a") as f:
        f.write(json.dumps(row) + "\n")
        f.flush()


def _group_key(row: dict) -> str:
    """Rows of the same problem (everything in the config, β included, but nothing about the implementation)."""
    return json.dumps(row["config"], sort_keys=True)


def floor_medians(rows: list[dict], impl: str = "matmul-floor") -> dict[str, float]:
    """Median value-and-grad ms of the ``impl`` row (a floor) of each problem (the last one wins)."""
    return {_group_key(r): r["vg_ms"]["median"] for r in rows if r["impl"] == impl and r["status"] == "ok"}


def ratio_to_floor(row: dict, floors: dict[str, float]) -> float | None:
    floor = floors.get(_group_key(row))
    if row["status"] != "ok" or floor is None:
        return None
    return row["vg_ms"]["median"] / floor


def own_floors(rows: list[dict]) -> dict[str, dict[str, float]]:
    """:func:`floor_medians` of each floor a top-k row is reported against (:func:`bench.cases.own_floor`)."""
    return {impl: floor_medians(rows, impl=impl) for impl in (STUDENT_FLOOR, TEACHER_FLOOR)}


def ratio_to_own_floor(row: dict, floors: dict[str, dict[str, float]]) -> float | None:
    """A top-k row's median over its own floor's (``floors``: :func:`own_floors`), or None."""
    floor = own_floor(row["impl"])
    return None if floor is None else ratio_to_floor(row, floors[floor])


def target_lines(rows: list[dict]) -> list[str]:
    """The top-k acceptance ratios found in ``rows`` (one setting's section), one line each:
    ``topk-k=64-*`` over ``matmul-floor-student`` and ``teacher-topk`` over ``matmul-teacher-logits``."""
    lines = []
    for impl, floor, limit in TOPK_TARGETS:
        floors = floor_medians(rows, impl=floor)
        for row in rows:
            if row["impl"] == impl and (ratio := ratio_to_floor(row, floors)) is not None:
                verdict = "met" if ratio <= limit else "not met"
                config = row["config"]
                lines.append(
                    f"- {config['preset']}, N = {config['n']}: {impl_label(row)} / {floor} = {ratio:.3f} "
                    f"(target ≤ {limit:g}: {verdict})"
                )
    return lines


# Config fields that make a problem's shape (the rows of one table section and the points of one
# plot line differ in these); every other field is a setting shared by a section.
SHAPE_FIELDS = ("preset", "n", "hidden_teacher", "hidden_student", "vocab")


def _settings(row: dict) -> str:
    return json.dumps({k: v for k, v in row["config"].items() if k not in SHAPE_FIELDS}, sort_keys=True)


def sections(rows: list[dict]) -> list[tuple[str, list[dict]]]:
    """The rows split by settings (β, T, weights, dtype, ...), in order of first appearance, each
    with its label: ``β = 0.5``, plus any other setting that differs between sections."""
    groups: dict[str, list[dict]] = {}
    for row in rows:
        groups.setdefault(_settings(row), []).append(row)
    settings = [json.loads(key) for key in groups]
    varying = [k for k in settings[0] if k != "beta" and len({json.dumps(s.get(k)) for s in settings}) > 1]
    labels = [", ".join([f"β = {s['beta']:g}"] + [f"{k} = {s.get(k)}" for k in varying]) for s in settings]
    return list(zip(labels, groups.values(), strict=True))


def impl_label(row: dict) -> str:
    """The implementation's name, marked where it ran in Pallas interpret mode (an emulation)."""
    return f"{row['impl']} (interpret)" if row.get("interpret") else row["impl"]


def _gb(n_bytes) -> str:
    return "" if n_bytes is None else f"{n_bytes / 1e9:.2f}"


def _num(x, fmt) -> str:
    return "" if x is None or (isinstance(x, float) and math.isnan(x)) else format(x, fmt)


COLUMNS = (
    "preset",
    "N",
    "impl",
    "status",
    "vg ms (p10–p90)",
    "fwd ms",
    "× floor",
    "× chunked",
    "× own floor",
    "TFLOP/s",
    "Mtok/s",
    "compile s",
    "XLA temp GB",
    "+peak GB",
    "loss",
    "loss err",
    "grad_x err",
    "grad_W err",
)


def table_row(
    row: dict, floors: dict[str, float], chunked_floors: dict[str, float], top_floors: dict[str, dict[str, float]]
) -> list[str]:
    config, memory, errors = row["config"], row.get("memory", {}), row.get("errors", {})
    base = [config["preset"], str(config["n"]), impl_label(row)]
    if row["status"] != "ok":
        reason = (row.get("reason") or "").replace("|", "/").replace("\n", " ")[:120]
        return base + [f"{row['status']}: {reason}" if reason else row["status"]] + [""] * (len(COLUMNS) - 4)
    vg, fwd = row["vg_ms"], row.get("fwd_ms")
    return base + [
        "ok",
        f"{vg['median']:.2f} ({vg['p10']:.2f}–{vg['p90']:.2f})",
        "" if fwd is None else f"{fwd['median']:.2f}",
        _num(ratio_to_floor(row, floors), ".2f"),
        _num(ratio_to_floor(row, chunked_floors), ".2f"),
        _num(ratio_to_own_floor(row, top_floors), ".2f"),
        _num(row.get("tflops"), ".0f" if row.get("tflops", 0) >= 10 else ".3f"),
        _num(row["tokens_per_s"] / 1e6, ".3f"),
        _num(row["compile_s"]["vg"], ".1f"),
        _gb(memory.get("xla_temp_bytes")),
        _gb(memory.get("extra_bytes")),
        _num(row.get("loss"), ".5f"),
        _num(errors.get("loss_rel"), ".1e"),
        _num(errors.get("grad_x_rel"), ".1e"),
        _num(errors.get("grad_w_rel"), ".1e"),
    ]


def markdown(rows: list[dict]) -> str:
    """The results as markdown: the run's environment, then one section per setting (β, ...) with
    its hyper-parameters and a table of one row a case."""
    if not rows:
        return "No rows.\n"
    floors, chunked_floors = floor_medians(rows), floor_medians(rows, impl="matmul-floor-chunked")
    top_floors = own_floors(rows)
    envs = [r["env"] for r in rows if r.get("env", {}).get("device")]
    env = envs[0] if envs else {}
    lines = [
        f"Device: {env.get('device', '?')} ({env.get('backend', '?')}), jax {env.get('jax', '?')}, "
        f"jaxlib {env.get('jaxlib', '?')}, date {rows[0]['date']}, git {rows[0].get('git_sha') or '?'}.",
        "vg = value and gradients (w.r.t. student hidden and weight); × floor = vg / the four matmuls; "
        "× chunked = vg / the same four matmuls in the fused path's scan over chunks (matmul-floor-chunked); "
        "TFLOP/s counts 2·N·V·(Ht+3·Hs); +peak = device memory the timed calls added on top of the inputs; "
        "errors are relative to the float32 reference on the same inputs.",
    ]
    if any(own_floor(r["impl"]) for r in rows):
        lines.append(
            "Top-k rows (offline teacher): topk-k=K-IMPL = the top-k loss against a cache made beforehand by "
            "teacher_topk at k = K; × own floor = vg / matmul-floor-student (the student's three matmuls in the "
            "scan over chunks) for them, vg / matmul-teacher-logits (the teacher's logits matmul in the scan over "
            "chunks) for teacher-topk (teacher_topk at k = 64); those two have no gradients: vg = the call, no "
            "forward. TFLOP/s counts 2·N·V·3·Hs (student-only rows) or 2·N·V·Ht (teacher-only rows); the top-k "
            "losses have no errors (the float32 reference is the dense loss's)."
        )
    if any(r.get("interpret") for r in rows):
        lines.append(
            "(interpret) = the Pallas kernel ran in Pallas interpret mode (no GPU here): an emulation, "
            "its times say nothing about the kernel's speed."
        )
    for label, section in sections(rows):
        config = section[0]["config"]
        lines += [
            "",
            f"### {label}",
            "",
            f"dtype {config['dtype']}, β = {config['beta']}, T = {config['temperature']}, "
            f"soft weight {config['soft_weight']}, hard weight {config['hard_weight']}, "
            f"ignored fraction {config['ignore_fraction']}, chunk {config['chunk_size'] or 'default'}, "
            f"{config['iters']} timed calls after {config['warmup']} warm-up.",
            "",
            "| " + " | ".join(COLUMNS) + " |",
            "|" + "|".join("---" for _ in COLUMNS) + "|",
        ]
        lines += ["| " + " | ".join(table_row(r, floors, chunked_floors, top_floors)) + " |" for r in section]
        if targets := target_lines(section):
            lines += ["", "Top-k targets (ratios of medians):", "", *targets]
    return "\n".join(lines) + "\n"


def plot(rows: list[dict], path: Path, *, metric: str) -> list[tuple[str, list[str]]]:
    """One panel per (settings section, preset) — a row of panels per β —, N on the x axis, one
    line per implementation; each panel's title names its preset and β.

    ``metric``: ``"time"`` (median value-and-grad ms, p10–p90 as error bars) or ``"memory"``
    (device memory the timed calls added, in GB; XLA's planned temporaries in panels where no
    row has a device measurement, e.g. on the CPU).

    Returns:
      (title, legend labels) of every panel, row by row.
    """
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    presets = list(dict.fromkeys(r["config"]["preset"] for r in rows)) or ["(no rows)"]
    grid = sections(rows) if rows else [("", [])]
    fig, axes = plt.subplots(len(grid), len(presets), figsize=(5.5 * len(presets), 4.2 * len(grid)), squeeze=False)
    drawn = []
    for panels, (label, section) in zip(axes, grid, strict=True):
        for ax, preset in zip(panels, presets, strict=True):
            panel = [r for r in section if r["status"] == "ok" and r["config"]["preset"] == preset]
            _plot_panel(ax, panel, metric)
            ax.set_title(f"{preset}, {label}" if label else preset)
            drawn.append((ax.get_title(), ax.get_legend_handles_labels()[1]))
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return drawn


def _plot_panel(ax, panel: list[dict], metric: str) -> None:
    if metric == "time":
        ylabel = "value-and-grad time (ms)"
    else:
        key = "extra_bytes" if any("extra_bytes" in r["memory"] for r in panel) else "xla_temp_bytes"
        ylabel = "device memory added (GB)" if key == "extra_bytes" else "XLA temporaries (GB)"
    for impl in dict.fromkeys(impl_label(r) for r in panel):
        points = sorted((r for r in panel if impl_label(r) == impl), key=lambda r: r["config"]["n"])
        xs = [r["config"]["n"] for r in points]
        if metric == "time":
            ys = [r["vg_ms"]["median"] for r in points]
            spread = [
                [y - r["vg_ms"]["p10"] for y, r in zip(ys, points, strict=True)],
                [r["vg_ms"]["p90"] - y for y, r in zip(ys, points, strict=True)],
            ]
            ax.errorbar(xs, ys, yerr=spread, marker="o", capsize=3, label=impl)
        else:
            xy = [
                (n, r["memory"][key] / 1e9) for n, r in zip(xs, points, strict=True) if (r["memory"].get(key) or 0) > 0
            ]
            if xy:
                ax.plot(*zip(*xy, strict=True), marker="o", label=impl)
    ax.set_xscale("log", base=2)
    sizes = sorted({r["config"]["n"] for r in panel})
    if sizes:
        ax.set_xticks(sizes, [str(n) for n in sizes])
        ax.minorticks_off()
    if ax.has_data():
        ax.set_yscale("log")
        ax.legend(fontsize=8)
    ax.set_xlabel("N (tokens)")
    ax.set_ylabel(ylabel)
    ax.grid(True, which="both", alpha=0.3)


def render(out_dir: Path) -> str:
    """Writes the markdown table and both plots from ``out_dir``'s rows; returns the markdown."""
    out_dir = Path(out_dir)
    rows = read_rows(out_dir)
    text = markdown(rows)
    (out_dir / TABLE_FILE).write_text(text)
    plot(rows, out_dir / TIME_PLOT_FILE, metric="time")
    plot(rows, out_dir / MEMORY_PLOT_FILE, metric="memory")
    return text
