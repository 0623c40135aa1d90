"""Exact top-k of one chunk of teacher logits: ``lax.top_k`` next to a two-stage top-k and the matmul.

    python -m bench.topk_select --out DIR          # GPU: one 1024-row chunk at llama shapes, < 90 s
    python -m bench.topk_select --tiny --out DIR   # CPU smoke run (tiny preset shapes, k = 8)

:func:`jaxdistill.teacher_topk` spends each chunk of rows on the teacher's logits matmul, the log
normalizer and ``lax.top_k`` over the whole vocabulary; this script times those parts of one
chunk (the preset's teacher head, bf16 inputs drawn by :func:`bench.suite.make_inputs`, float32
logits), median / p10 / p90 of ``--iters`` calls after ``--warmup``:

* ``matmul``: z = x W_t, float32 out (the floor of ``teacher-topk`` in ``python -m bench``);
* ``top_k``: ``lax.top_k(z, k)`` on the float32 logits;
* ``two-stage G=…``: the exact two-stage top-k (:func:`two_stage_top_k`): the row cut into G
  groups (V padded with −inf to a multiple of G), ``lax.top_k`` within each group, then
  ``lax.top_k`` over the G·k candidates; checked equal to ``top_k`` (ids and values);
* ``approx_max_k``: ``lax.approx_max_k(z, k, recall_target=1.0)`` (its error, where it does not
  run, is recorded instead), with whether it equals ``top_k``;
* ``exact_top_k tile=…``: the library's own exact selection (:func:`jaxdistill.topk.exact_top_k`:
  the k tiles with the largest maxima, then the top-k of their entries), checked equal to ``top_k``;
* ``teacher_topk``: the library's whole chunk, ``jax.jit(teacher_topk)`` on the chunk's rows
  (matmul + log normalizer + its selection);
* ``chunk two-stage G=…``: the same chunk with the fastest exact two-stage top-k in place of
  ``lax.top_k`` (ids checked equal to ``teacher_topk``'s, log-probs' largest difference recorded).

Each row also gives its median over ``matmul``'s. Writes ``topk_select.json`` (with date, device,
jax and jaxlib versions, git sha) into ``--out`` and prints a table. Exits with status 1 when a
two-stage or ``exact_top_k`` result differs from ``lax.top_k``'s.
"""

from __future__ import annotations

import argparse
import functools
import json
import sys
import time
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax

import jaxdistill
from bench import common, suite
from bench.cases import PRESETS, Problem
from jaxdistill.topk import TOP_K_TILE, exact_top_k

FULL = dict(preset="llama", rows=1024, k=64, groups=(16, 64, 256), tile=TOP_K_TILE, warmup=2, iters=10)
TINY = dict(preset="tiny", rows=64, k=8, groups=(4, 16, 64), tile=32, warmup=1, iters=3)


def two_stage_top_k(z, k: int, groups: int):
    """Exact top-k along the last axis of (R, V) ``z`` in two stages; the same (values, ids) as
    ``lax.top_k(z, k)``, ties included (lower index first in both).

    The row is padded with −inf to G·S columns (S = ⌈V/G⌉ ≥ k) and cut into G groups of S; the
    top-k of each group, then the top-k of those G·k candidates (ordered by group, then by rank:
    by index among equal values). Every entry of the row's top-k is in its group's top-k.
    """
    rows, vocab = z.shape
    size = -(-vocab // groups)
    if size < k:
        raise ValueError(f"groups of {size} columns (V = {vocab}, G = {groups}) are smaller than k = {k}")
    padded = jnp.pad(z, ((0, 0), (0, groups * size - vocab)), constant_values=-jnp.inf)
    values, local = lax.top_k(padded.reshape(rows, groups, size), k)
    ids = local + (jnp.arange(groups, dtype=local.dtype) * size)[:, None]
    values, pick = lax.top_k(values.reshape(rows, groups * k), k)
    return values, jnp.take_along_axis(ids.reshape(rows, groups * k), pick, axis=1)


def approx_top_k(z, k: int):
    """``lax.approx_max_k`` at recall 1.0, as (values, ids)."""
    return lax.approx_max_k(z, k, recall_target=1.0)


def chunk_with(select, x, w, k: int):
    """One chunk of ``teacher_topk`` (T = 1) with ``select`` as its top-k: (ids int32, log-probs)."""
    z = jnp.matmul(x, w, preferred_element_type=jnp.float32)
    values, ids = select(z, k)
    return ids.astype(jnp.int32), values - jax.nn.logsumexp(z, axis=-1, keepdims=True)


def measure(name: str, fn, args, settings: dict, out: list, matmul_ms: float | None = None):
    """Compiles and times ``fn(*args)``; appends its row to ``out``; returns its result (None on error)."""
    row = {"name": name}
    try:
        start = time.perf_counter()
        compiled = jax.jit(fn).lower(*args).compile()
        row["compile_s"] = time.perf_counter() - start
        seconds, result = suite.time_calls(lambda: compiled(*args), warmup=settings["warmup"], iters=settings["iters"])
    except Exception as error:  # e.g. an op the backend does not run: a row, not the end of the script
        row["error"] = f"{type(error).__name__}: {str(error)[:400]}"
        out.append(row)
        return None
    row["ms"] = suite.percentiles_ms(seconds)
    row["x_matmul"] = None if matmul_ms is None else row["ms"]["median"] / matmul_ms
    out.append(row)
    return result


def same_top_k(got, want) -> bool:
    """Whether two (values, ids) results are equal, ids and values."""
    return all(np.array_equal(np.asarray(a), np.asarray(b)) for a, b in zip(got, want, strict=True))


def run(settings: dict) -> tuple[list[dict], bool]:
    """All rows of one chunk; returns (rows, whether every two-stage and exact_top_k result equals
    lax.top_k's)."""
    preset = PRESETS[settings["preset"]]
    problem = Problem(settings["preset"], settings["rows"], preset.hidden_teacher, preset.hidden_student, preset.vocab)
    inputs = suite.make_inputs(problem)
    x, w, k = inputs["teacher_hidden"], inputs["teacher_weight"], settings["k"]
    rows: list[dict] = []
    z = measure("matmul", lambda x, w: jnp.matmul(x, w, preferred_element_type=jnp.float32), (x, w), settings, rows)
    if z is None:
        raise RuntimeError(f"the matmul does not run: {rows[0]['error']}")
    matmul_ms = rows[0]["ms"]["median"]
    rows[0]["x_matmul"] = 1.0
    timed = functools.partial(measure, settings=settings, out=rows, matmul_ms=matmul_ms)

    want = timed("top_k", lambda z: lax.top_k(z, k), (z,))
    if want is None:
        raise RuntimeError(f"lax.top_k does not run: {rows[-1]['error']}")
    exact = True
    best = None  # (median ms, G) of the fastest exact two-stage top-k
    for groups in settings["groups"]:
        got = timed(f"two-stage G={groups}", functools.partial(two_stage_top_k, k=k, groups=groups), (z,))
        equal = got is not None and same_top_k(got, want)
        exact &= equal
        if got is None:
            continue
        rows[-1]["equal_to_top_k"] = equal
        if equal and (best is None or rows[-1]["ms"]["median"] < best[0]):
            best = (rows[-1]["ms"]["median"], groups)
    got = timed("approx_max_k", functools.partial(approx_top_k, k=k), (z,))
    if got is not None:
        rows[-1]["equal_to_top_k"] = same_top_k(got, want)
    tile = settings["tile"]
    got = timed(f"exact_top_k tile={tile}", functools.partial(exact_top_k, k=k, tile=tile), (z,))
    exact &= got is not None and same_top_k(got, want)
    if got is not None:
        rows[-1]["equal_to_top_k"] = same_top_k(got, want)
    del z, want, got

    library = timed("teacher_topk", functools.partial(jaxdistill.teacher_topk, k=k, chunk_size=x.shape[0]), (x, w))
    if best is not None:
        select = functools.partial(two_stage_top_k, groups=best[1])
        got = timed(f"chunk two-stage G={best[1]}", functools.partial(chunk_with, select, k=k), (x, w))
        if got is not None and library is not None:
            rows[-1]["ids_equal_to_teacher_topk"] = bool(np.array_equal(np.asarray(got[0]), np.asarray(library.ids)))
            rows[-1]["max_logprob_diff"] = float(np.max(np.abs(np.asarray(got[1]) - np.asarray(library.logprobs))))
    return rows, exact


def table(rows: list[dict]) -> str:
    lines = ["| row | ms (p10–p90) | × matmul | compile s | equal |", "|---|---|---|---|---|"]
    for row in rows:
        if "error" in row:
            lines.append(f"| {row['name']} | error: {row['error'][:100].replace('|', '/')} | | | |")
            continue
        ms = row["ms"]
        equal = row.get("equal_to_top_k", row.get("ids_equal_to_teacher_topk"))
        lines.append(
            f"| {row['name']} | {ms['median']:.3f} ({ms['p10']:.3f}–{ms['p90']:.3f}) | {row['x_matmul']:.3f} | "
            f"{row['compile_s']:.1f} | {'' if equal is None else equal} |"
        )
    return "\n".join(lines)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m bench.topk_select", description=__doc__.split("\n")[0], formatter_class=common.HelpFormatter
    )
    parser.add_argument("--out", type=Path, required=True, help="directory for topk_select.json (created)")
    parser.add_argument(
        "--tiny",
        action="store_true",
        help="the CPU smoke run: tiny preset (Ht 64, V 1000), 64 rows, k 8, G 4 16 64, tile 32, 1 warm-up, "
        "3 timed calls (default: llama, Ht 4096, V 128256, 1024 rows, k 64, G 16 64 256, the library's tile, "
        "2 warm-ups, 10 timed calls)",
    )
    parser.add_argument("--rows", type=int, default=None, help="rows of the chunk (default: 1024, or 64 with --tiny)")
    parser.add_argument("--k", type=int, default=None, help="k (default: 64, or 8 with --tiny)")
    parser.add_argument(
        "--groups", type=int, nargs="+", default=None, help="G of the two-stage rows (default: 16 64 256, or 4 16 64)"
    )
    parser.add_argument(
        "--tile",
        type=int,
        default=None,
        help=f"tile of the exact_top_k row (default: the library's, {TOP_K_TILE}, or 32 with --tiny)",
    )
    parser.add_argument("--warmup", type=int, default=None, help="untimed calls per row (default: 2, or 1 with --tiny)")
    parser.add_argument("--iters", type=int, default=None, help="timed calls per row (default: 10, or 3 with --tiny)")
    common.add_git_sha_flag(parser)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    settings = dict(TINY if args.tiny else FULL)
    for name in ("rows", "k", "groups", "tile", "warmup", "iters"):
        if getattr(args, name) is not None:
            settings[name] = tuple(args.groups) if name == "groups" else getattr(args, name)
    args.out.mkdir(parents=True, exist_ok=True)
    start = time.perf_counter()
    rows, exact = run(settings)
    preset = PRESETS[settings["preset"]]
    result = {
        "date": common.utc_now(),
        "git_sha": args.git_sha or common.git_sha(),
        "device": jax.devices()[0].device_kind,
        "backend": jax.default_backend(),
        "jax_version": jax.__version__,
        "jaxlib_version": common.package_version("jaxlib"),
        "argv": sys.argv[1:] if argv is None else argv,
        "config": {**settings, "hidden": preset.hidden_teacher, "vocab": preset.vocab, "dtype": "bfloat16"},
        "exact": exact,  # every two-stage and exact_top_k result equals lax.top_k's
        "wall_s": time.perf_counter() - start,
        "rows": rows,
    }
    (args.out / "topk_select.json").write_text(json.dumps(result, indent=1))
    print(
        f"{result['device']}, jax {jax.__version__}: {settings['rows']} rows, H {preset.hidden_teacher}, "
        f"V {preset.vocab}, k {settings['k']}, {result['wall_s']:.0f} s"
    )
    print(table(rows))
    return 0 if exact else 1


if __name__ == "__main__":
    sys.exit(main())
