"""Data-parallel benchmark of the fused loss: ``python -m bench.multi_gpu --out DIR [--tiny]``.

On all D visible devices it times the value-and-gradients step of the distillation LM head
(student and teacher hidden states → fused loss → gradients of the student hidden states and
LM head, the weight gradient all-reduced over the devices) in three ways:

* ``1-device``: ``jax.jit`` on the first device over the whole global batch (D × N tokens);
* ``pmap``: ``jax.pmap`` over the D devices, N tokens each, loss with ``axis_name``;
* ``sharded_jit``: ``jax.jit`` with ``NamedSharding`` (tokens sharded, weights replicated) and
  the loss per device in ``shard_map`` (:func:`jaxdistill.training.shard_mapped_head_loss`).

Every variant uses the default implementation (the Pallas kernel on GPU, the XLA chunked path
elsewhere) on the same inputs. It checks that the D-device loss and gradients equal the
1-device ones (float32: 1e-5 relative to the largest entry; bf16: 4 bf16 epsilons, since the
weight gradient is summed over devices in bf16), that the compiled D-device steps contain no
all-gather, and counts the transposed copies of a tied (V, H) embedding head in the compiled
1-device step. Times: warm-up, then ``--iters`` calls each timed to ``block_until_ready``;
median and p10/p90. Prints a table and writes ``DIR/multi_gpu.json``.

Sizes (``--help`` lists them): the default is the ``llama`` preset's shapes with N = 8192
tokens per device, bf16; ``--tiny`` is a float32 CPU smoke test (e.g. with
``XLA_FLAGS=--xla_force_host_platform_device_count=4``). ``--warmup``/``--iters`` default to the
size's own counts; values given explicitly are used as given, with ``--tiny`` too. The inputs are
drawn by :func:`bench.suite.make_inputs`, the benchmark suite's generator. The JSON records
date, git sha, jax and jaxlib versions.

``--vocab-parallel``: vocabulary parallelism instead. For each problem (``--vocab-presets`` head
shapes × ``--vocab-tokens`` N, bf16; ``--tiny``: one float32 CPU size) it times the same
value-and-gradients step on one device with the whole heads (``1-device``) and with the heads
split over V on (1, M) meshes of the first M devices, M in ``--model-axis``
(:func:`jaxdistill.training.vocab_parallel_head_loss`: every device sees the N tokens and V/M
columns of each head). Each row records the step time, the compiled per-device memory
(``memory_analysis()``: arguments, i.e. the head shards, and the extra memory, temporaries +
outputs), the equality with the 1-device step (same tolerance as above) and the compiled
collectives: their names and the model-axis all-reduces, per chunk and per call. Writes
``DIR/multi_gpu_vocab.json``.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import platform
import re
import sys
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import Mesh, NamedSharding
from jax.sharding import PartitionSpec as P

from bench import common
from bench.cases import IGNORE_INDEX, PRESETS, Problem
from bench.common import HelpFormatter, add_git_sha_flag
from bench.suite import make_inputs, percentiles_ms, time_calls
from jaxdistill.fused import resolve_implementation
from jaxdistill.heads import LMHead
from jaxdistill.training import DistillConfig, shard_mapped_head_loss, vocab_parallel_head_loss

AXIS = "data"
COLLECTIVES = ("all-gather", "all-reduce", "all-to-all", "collective-permute", "reduce-scatter")


@dataclasses.dataclass(frozen=True)
class Size:
    tokens_per_device: int
    hidden_student: int
    hidden_teacher: int
    vocab: int
    dtype: str
    chunk_size: int | None = None
    ignore_fraction: float = 0.1


_LLAMA = PRESETS["llama"]
FULL = Size(
    tokens_per_device=8192,
    hidden_student=_LLAMA.hidden_student,
    hidden_teacher=_LLAMA.hidden_teacher,
    vocab=_LLAMA.vocab,
    dtype="bfloat16",
)
TINY = Size(tokens_per_device=64, hidden_student=16, hidden_teacher=24, vocab=257, dtype="float32", chunk_size=16)
# (warm-up calls, timed calls) when --warmup / --iters are not given.
TIMING = {"full": (3, 20), "tiny": (1, 3)}
MIN_ITERS = 10  # the least --iters outside --tiny
CONFIG = dict(beta=0.5, temperature=1.0, soft_weight=1.0, hard_weight=0.5)


def collectives(hlo_text: str) -> list[str]:
    """Names of the cross-device collectives in a compiled HLO module."""
    return sorted(set(re.findall(r"\b(" + "|".join(COLLECTIVES) + r")(?:-start)?\(", hlo_text)))


_COMPUTATION = re.compile(r"^(ENTRY )?%?([\w.\-]+) .*\{$")
_INSTRUCTION = re.compile(r"^\s*(?:ROOT )?%?([\w.\-]+) = \w+\[([\d,]*)\]\S* (\w[\w\-]*)\(")
_ALL_REDUCE = re.compile(r"^\s*(?:ROOT )?%?[\w.\-]+ = (\(.*?\)|\S+) all-reduce(?:-start)?\(")
_ARRAY_SHAPE = re.compile(r"(\w+)\[([\d,]*)\]")
_LISTED_GROUPS = re.compile(r"replica_groups=\{((?:\{[\d,]*\},?)*)\}")
_IOTA_GROUPS = re.compile(r"replica_groups=\[([\d,]+)\]<=\[([\d,]+)\](?:T\(([\d,]+)\))?")


def _replica_groups(line: str) -> list[list[int]]:
    """The device groups of a collective, from either HLO notation ({{0,1},{2,3}} or [2,2]<=[4])."""
    listed = _LISTED_GROUPS.search(line)
    if listed:
        return [[int(d) for d in g.split(",") if d] for g in re.findall(r"\{([\d,]*)\}", listed.group(1))]
    iota = _IOTA_GROUPS.search(line)
    if not iota:
        return []
    shape, dims, perm = (None if g is None else [int(v) for v in g.split(",")] for g in iota.groups())
    ids = np.arange(int(np.prod(dims))).reshape(dims)
    return ids.transpose(perm if perm else range(len(dims))).reshape(shape).tolist()


def all_reduces(hlo_text: str) -> list[dict]:
    """Every all-reduce of a compiled HLO module: ``{"shapes", "groups", "entry"}``.

    ``shapes``: the reduced arrays, e.g. ``["f32[1024]", "f32[1024]"]`` (a combined all-reduce
    has several); ``groups``: the device groups (lists of device ids); ``entry``: whether it is
    in the entry computation (once per call) rather than in a loop body or a branch (once per
    chunk).
    """
    found, current = [], None
    for line in hlo_text.splitlines():
        header = _COMPUTATION.match(line)
        if header:
            current = "entry" if header.group(1) else header.group(2)
            continue
        match = _ALL_REDUCE.match(line)
        if match:
            shapes = [f"{dtype}[{dims}]" for dtype, dims in _ARRAY_SHAPE.findall(match.group(1))]
            found.append({"shapes": shapes, "groups": _replica_groups(line), "entry": current == "entry"})
    return found


def weight_sized_copies(hlo_text: str, rows: int, cols: int) -> dict:
    """Copies/transposes of a (rows, cols) or (cols, rows) array in a compiled HLO module.

    Counts instructions whose output has that shape and that are a ``copy`` or ``transpose``,
    or a fusion named after one (XLA names fusions after the ops they fuse), split into those
    in the entry computation (once per call) and those in while-loop bodies (once per chunk).
    Returns ``{"per_call": int, "per_chunk": int, "names": [...]}``.
    """
    bodies = set(re.findall(r"body=%?([\w.\-]+)", hlo_text))
    shapes = {f"{rows},{cols}", f"{cols},{rows}"}
    counts, names, current = {"per_call": 0, "per_chunk": 0}, [], None
    for line in hlo_text.splitlines():
        header = _COMPUTATION.match(line)
        if header:
            current = "entry" if header.group(1) else header.group(2)
            continue
        match = _INSTRUCTION.match(line)
        if not match or current is None or match.group(2) not in shapes:
            continue
        name, _, opcode = match.groups()
        is_copy = opcode in ("copy", "transpose") or (opcode == "fusion" and ("copy" in name or "transpose" in name))
        if is_copy and (current == "entry" or current in bodies):
            counts["per_call" if current == "entry" else "per_chunk"] += 1
            names.append(name)
    return dict(counts, names=names)


def problem_of(size: Size, num_devices: int, seed: int = 0) -> Problem:
    """The global problem (D × N tokens) of ``size`` in the benchmark suite's terms."""
    return Problem(
        preset="multi_gpu",
        n=size.tokens_per_device * num_devices,
        hidden_teacher=size.hidden_teacher,
        hidden_student=size.hidden_student,
        vocab=size.vocab,
        dtype=size.dtype,
        ignore_fraction=size.ignore_fraction,
        chunk_size=size.chunk_size,
        seed=seed,
        **CONFIG,
    )


def draw_inputs(size: Size, mesh: Mesh, seed: int = 0) -> dict:
    """Global inputs: tokens sharded over the mesh (D × N rows), weights replicated on every device.

    Drawn by the benchmark suite's :func:`bench.suite.make_inputs` (x ~ N(0, 1), W ~ N(0,
    LOGIT_STD²/H), labels uniform with ``ignore_fraction`` ignored (-100), so every device has a
    different number of valid tokens).
    """
    rows, replicated = NamedSharding(mesh, P(AXIS)), NamedSharding(mesh, P())
    shardings = {
        "student_hidden": rows,
        "student_weight": replicated,
        "teacher_hidden": rows,
        "teacher_weight": replicated,
        "labels": rows,
    }
    return make_inputs(problem_of(size, mesh.size, seed), shardings=shardings)


def _per_device_stack(x: jax.Array, devices) -> jax.Array:
    """A sharded-by-rows (or replicated) global array as pmap's (D, ...) input, without moving data."""
    by_device = {shard.device: shard for shard in x.addressable_shards}
    shards = [by_device[d].data for d in devices]
    stacked = [s.reshape((1, *s.shape)) for s in shards]
    sharding = NamedSharding(Mesh(np.asarray(devices), ("devices",)), P("devices"))
    return jax.make_array_from_single_device_arrays((len(devices), *shards[0].shape), sharding, stacked)


def value_and_grads(head_loss):
    """``(xs, ws, xt, wt, y) -> (loss, (grad_xs, grad_ws))`` of ``head_loss`` on two untied (H, V) heads."""

    def loss(xs, ws, xt, wt, y):
        return head_loss(xs, LMHead(ws), xt, LMHead(wt), y)[0]

    return jax.value_and_grad(loss, argnums=(0, 1))


def head_step(head_loss):
    """The benchmarked step: ``(xs, ws, xt, wt, y) -> (loss, grad_xs, grad_ws)``."""

    def step(xs, ws, xt, wt, y):
        loss, (gx, gw) = value_and_grads(head_loss)(xs, ws, xt, wt, y)
        return loss, gx, gw

    return step


def build_steps(size: Size, mesh: Mesh, inputs: dict) -> dict:
    """{variant: (callable, args)}; each returns (loss, grad_student_hidden, grad_student_weight)."""
    config = DistillConfig(**CONFIG, chunk_size=size.chunk_size)
    devices = list(mesh.devices.flat)
    single = head_step(config.head_loss)

    def per_device(xs, ws, xt, wt, y):
        head_loss = lambda *a: config.head_loss(*a, axis_name=AXIS)  # noqa: E731
        loss, (gx, gw) = value_and_grads(head_loss)(xs, ws, xt, wt, y)
        return jax.lax.psum(loss, AXIS), gx, jax.lax.psum(gw, AXIS)

    sharded = head_step(shard_mapped_head_loss(mesh, config=config, axis_name=AXIS))

    names = ("student_hidden", "student_weight", "teacher_hidden", "teacher_weight", "labels")
    args = tuple(inputs[k] for k in names)
    first = devices[0]
    single_args = tuple(jax.device_put(a, first) for a in args)
    steps = {"1-device": (jax.jit(single), single_args)}
    if len(devices) > 1:
        steps["pmap"] = (jax.pmap(per_device, axis_name=AXIS), tuple(_per_device_stack(a, devices) for a in args))
        rows, replicated = NamedSharding(mesh, P(AXIS)), NamedSharding(mesh, P())
        in_shardings = (rows, replicated, rows, replicated, rows)
        steps["sharded_jit"] = (
            jax.jit(sharded, in_shardings=in_shardings, out_shardings=(replicated, rows, replicated)),
            args,
        )
    return steps


def _as_single(variant: str, result):
    """(loss, grad_x (D·N, Hs), grad_W) as host float32 arrays, whatever the variant's layout."""
    loss, gx, gw = (np.asarray(jax.device_get(r)).astype(np.float32) for r in result)
    if variant == "pmap":
        loss, gx, gw = loss[0], gx.reshape(-1, gx.shape[-1]), gw[0]
    return loss, gx, gw


def max_rel_diff(got: np.ndarray, want: np.ndarray) -> float:
    """max|got − want| / max|want|."""
    return float(np.max(np.abs(got - want)) / max(float(np.max(np.abs(want))), 1e-30))


def tied_head_copies(size: Size, device) -> dict:
    """Compile (not run) the 1-device step with the student head tied to a (V, Hs) embedding and
    count weight-sized transposed copies (see :func:`weight_sized_copies`)."""
    config = DistillConfig(**CONFIG, chunk_size=size.chunk_size)
    n = size.tokens_per_device
    dtype = jnp.dtype(size.dtype)
    shapes = (
        jax.ShapeDtypeStruct((n, size.hidden_student), dtype),
        jax.ShapeDtypeStruct((size.vocab, size.hidden_student), dtype),
        jax.ShapeDtypeStruct((n, size.hidden_teacher), dtype),
        jax.ShapeDtypeStruct((size.hidden_teacher, size.vocab), dtype),
        jax.ShapeDtypeStruct((n,), jnp.int32),
    )

    def loss(xs, table, xt, wt, y):
        return config.head_loss(xs, LMHead(table, vocab_major=True), xt, LMHead(wt), y)[0]

    with jax.default_device(device):
        text = jax.jit(jax.value_and_grad(loss, argnums=(0, 1))).lower(*shapes).compile().as_text()
    return weight_sized_copies(text, size.vocab, size.hidden_student)


def run(size: Size, *, warmup: int, iters: int, sha: str | None = None) -> dict:
    devices = jax.devices()
    mesh = Mesh(np.asarray(devices), (AXIS,))
    inputs = draw_inputs(size, mesh)
    steps = build_steps(size, mesh, inputs)
    valid_per_device = np.asarray(inputs["labels"] != IGNORE_INDEX).reshape(len(devices), -1).sum(axis=1)
    tolerance = 1e-5 if size.dtype == "float32" else 4 * float(jnp.finfo(jnp.dtype(size.dtype)).eps)

    rows, want = [], None
    for variant, (fn, args) in steps.items():
        compiled = fn.lower(*args).compile()
        seconds, result = time_calls(lambda c=compiled, a=args: c(*a), warmup=warmup, iters=iters)
        got = _as_single(variant, result)
        del result
        times = percentiles_ms(seconds)
        row = {
            "variant": variant,
            "devices": 1 if variant == "1-device" else len(devices),
            "tokens_per_device": size.tokens_per_device * (len(devices) if variant == "1-device" else 1),
            "median_ms": times["median"],
            "p10_ms": times["p10"],
            "p90_ms": times["p90"],
            "global_tokens_per_s": size.tokens_per_device * len(devices) / (times["median"] / 1e3),
            "loss": float(got[0]),
            "collectives": collectives(compiled.as_text()),
        }
        if want is None:
            want = got
        else:
            diffs = {
                "loss": abs(float(got[0]) - float(want[0])) / max(abs(float(want[0])), 1e-30),
                "grad_student_hidden": max_rel_diff(got[1], want[1]),
                "grad_student_weight": max_rel_diff(got[2], want[2]),
            }
            row["max_rel_diff_vs_1_device"] = diffs
            row["matches_1_device"] = all(d <= tolerance for d in diffs.values())
        rows.append(row)

    stats = [d.memory_stats() or {} for d in devices]
    return {
        "date": common.utc_now(),
        "git_sha": sha or common.git_sha(),
        "size": dataclasses.asdict(size),
        "config": CONFIG,
        "implementation": resolve_implementation(None),
        "num_devices": len(devices),
        "device_kind": devices[0].device_kind,
        "platform": devices[0].platform,
        "jax_version": jax.__version__,
        "jaxlib_version": common.package_version("jaxlib"),
        "python": platform.python_version(),
        "valid_tokens_per_device": valid_per_device.tolist(),
        "tolerance": tolerance,
        "warmup": warmup,
        "iters": iters,
        "rows": rows,
        "peak_bytes_in_use_per_device": [s.get("peak_bytes_in_use") for s in stats],
        "tied_student_head_transposed_copies": tied_head_copies(size, devices[0]),
    }


# ---------------------------------------------------------------------------------------------
# Vocabulary parallelism (--vocab-parallel)

MODEL_AXIS = "model"
VOCAB_PRESETS = ("llama", "gemma")
VOCAB_TOKENS = (8192, 32768)
MODEL_AXES = (2, 4)
VOCAB_TINY = Size(tokens_per_device=64, hidden_student=16, hidden_teacher=24, vocab=96, dtype="float32", chunk_size=16)


def vocab_sizes(presets, tokens) -> list[tuple[str, Size]]:
    """(label, size) of each preset's head shapes at each N, bf16 (N is every device's token count)."""
    return [
        (
            f"{name}:{n}",
            Size(
                tokens_per_device=n,
                hidden_student=PRESETS[name].hidden_student,
                hidden_teacher=PRESETS[name].hidden_teacher,
                vocab=PRESETS[name].vocab,
                dtype="bfloat16",
            ),
        )
        for name in presets
        for n in tokens
    ]


def model_mesh(model: int, devices=None) -> Mesh:
    """A (1, ``model``) (data, model) mesh over the first ``model`` devices."""
    devices = jax.devices() if devices is None else devices
    return Mesh(np.asarray(devices[:model]).reshape(1, model), (AXIS, MODEL_AXIS))


def _vocab_shardings(mesh: Mesh) -> tuple:
    """Shardings of (xs, ws, xt, wt, labels): the tokens replicated, both (H, V) heads split over V."""
    rows, heads = NamedSharding(mesh, P(AXIS)), NamedSharding(mesh, P(None, MODEL_AXIS))
    return rows, heads, rows, heads, rows


def vocab_step(size: Size, mesh: Mesh):
    """The jitted vocabulary-parallel step on ``mesh`` (:func:`jaxdistill.training.vocab_parallel_head_loss`)."""
    config = DistillConfig(**CONFIG, chunk_size=size.chunk_size)
    head_loss = vocab_parallel_head_loss(mesh, config=config, data_axis=AXIS, model_axis=MODEL_AXIS)
    shardings = _vocab_shardings(mesh)
    return jax.jit(
        head_step(head_loss),
        in_shardings=shardings,
        out_shardings=(NamedSharding(mesh, P()), shardings[0], shardings[1]),
    )


def memory_of(compiled) -> dict:
    """Per-device bytes of a compiled step: arguments, outputs, temporaries, and extra = outputs + temporaries."""
    stats = compiled.memory_analysis()
    out = {
        "argument_bytes": int(stats.argument_size_in_bytes),
        "output_bytes": int(stats.output_size_in_bytes),
        "temp_bytes": int(stats.temp_size_in_bytes),
    }
    return dict(out, extra_bytes=out["output_bytes"] + out["temp_bytes"])


def model_axis_all_reduces(hlo_text: str, mesh: Mesh) -> dict:
    """The all-reduces over ``mesh``'s model axis: shapes per chunk (in a loop body or branch) and per call."""
    groups = sorted(sorted(int(d.id) for d in row) for row in mesh.devices)
    per_chunk, per_call = [], []
    for all_reduce in all_reduces(hlo_text):
        if sorted(sorted(g) for g in all_reduce["groups"]) == groups:
            (per_call if all_reduce["entry"] else per_chunk).extend(all_reduce["shapes"])
    return {"per_chunk_shapes": sorted(set(per_chunk)), "per_chunk_count": len(per_chunk), "per_call_shapes": per_call}


def run_vocab(sizes, model_axes, *, warmup: int, iters: int, sha: str | None = None) -> dict:
    devices = jax.devices()
    axes = [m for m in model_axes if m <= len(devices)]
    rows = []
    for label, size in sizes:
        tolerance = 1e-5 if size.dtype == "float32" else 4 * float(jnp.finfo(jnp.dtype(size.dtype)).eps)
        names = ("student_hidden", "student_weight", "teacher_hidden", "teacher_weight", "labels")
        # Drawn once, heads split over the largest model axis, then placed for every variant.
        drawn = make_inputs(
            problem_of(size, 1),
            shardings=dict(zip(names, _vocab_shardings(model_mesh(max(axes, default=1))), strict=True)),
        )
        args = tuple(drawn.pop(k) for k in names)
        config = DistillConfig(**CONFIG, chunk_size=size.chunk_size)
        # (variant, M, step, where the inputs go)
        variants = [("1-device", 1, jax.jit(head_step(config.head_loss)), devices[0])]
        for m in axes:
            mesh = model_mesh(m)
            variants.append((f"model={m}", m, vocab_step(size, mesh), _vocab_shardings(mesh)))
        want = None
        for variant, model, fn, target in variants:
            placed = jax.device_put(args, target)
            compiled = fn.lower(*placed).compile()
            seconds, result = time_calls(lambda c=compiled, a=placed: c(*a), warmup=warmup, iters=iters)
            got = tuple(np.asarray(jax.device_get(r)).astype(np.float32) for r in result)
            del result, placed
            times = percentiles_ms(seconds)
            text = compiled.as_text()
            row = {
                "problem": label,
                "variant": variant,
                "model_axis": model,
                "size": dataclasses.asdict(size),
                "median_ms": times["median"],
                "p10_ms": times["p10"],
                "p90_ms": times["p90"],
                "loss": float(got[0]),
                "memory": memory_of(compiled),
                "collectives": collectives(text),
            }
            if want is None:
                want = got
            else:
                row["model_axis_all_reduces"] = model_axis_all_reduces(text, model_mesh(model))
                diffs = {
                    "loss": abs(float(got[0]) - float(want[0])) / max(abs(float(want[0])), 1e-30),
                    "grad_student_hidden": max_rel_diff(got[1], want[1]),
                    "grad_student_weight": max_rel_diff(got[2], want[2]),
                }
                row["max_rel_diff_vs_1_device"] = diffs
                row["matches_1_device"] = all(d <= tolerance for d in diffs.values())
                row["tolerance"] = tolerance
            rows.append(row)
        del args, want
    return {
        "date": common.utc_now(),
        "git_sha": sha or common.git_sha(),
        "mode": "vocab-parallel",
        "config": CONFIG,
        "implementation": resolve_implementation(None),
        "num_devices": len(devices),
        "model_axes": axes,
        "skipped_model_axes": [m for m in model_axes if m not in axes],
        "device_kind": devices[0].device_kind,
        "platform": devices[0].platform,
        "jax_version": jax.__version__,
        "jaxlib_version": common.package_version("jaxlib"),
        "python": platform.python_version(),
        "warmup": warmup,
        "iters": iters,
        "rows": rows,
    }


def vocab_table(result: dict) -> str:
    head = [
        "problem",
        "variant",
        "median ms",
        "p10 ms",
        "p90 ms",
        "× 1-device",
        "args MiB/device",
        "extra MiB/device",
        "matches 1-dev",
        "per-chunk all-reduces",
        "all-gather",
    ]
    lines = [" | ".join(head), " | ".join("---" for _ in head)]
    base = {}
    for r in result["rows"]:
        base.setdefault(r["problem"], r["median_ms"])
        reduces = r.get("model_axis_all_reduces")
        lines.append(
            " | ".join(
                [
                    r["problem"],
                    r["variant"],
                    f"{r['median_ms']:.2f}",
                    f"{r['p10_ms']:.2f}",
                    f"{r['p90_ms']:.2f}",
                    f"{r['median_ms'] / base[r['problem']]:.2f}",
                    f"{r['memory']['argument_bytes'] / 2**20:.4g}",
                    f"{r['memory']['extra_bytes'] / 2**20:.4g}",
                    "—" if "matches_1_device" not in r else ("yes" if r["matches_1_device"] else "NO"),
                    "—"
                    if reduces is None
                    else f"{reduces['per_chunk_count']} × {', '.join(reduces['per_chunk_shapes'])}",
                    "yes" if "all-gather" in r["collectives"] else "no",
                ]
            )
        )
    return "\n".join(lines)


def table(result: dict) -> str:
    head = [
        "variant",
        "devices",
        "tokens/device",
        "median ms",
        "p10 ms",
        "p90 ms",
        "Mtok/s",
        "matches 1-dev",
        "all-gather",
    ]
    lines = [" | ".join(head), " | ".join("---" for _ in head)]
    for r in result["rows"]:
        lines.append(
            " | ".join(
                [
                    r["variant"],
                    str(r["devices"]),
                    str(r["tokens_per_device"]),
                    f"{r['median_ms']:.2f}",
                    f"{r['p10_ms']:.2f}",
                    f"{r['p90_ms']:.2f}",
                    f"{r['global_tokens_per_s'] / 1e6:.3f}",
                    "—" if "matches_1_device" not in r else ("yes" if r["matches_1_device"] else "NO"),
                    "yes" if "all-gather" in r["collectives"] else "no",
                ]
            )
        )
    return "\n".join(lines)


def _size_line(name: str, size: Size) -> str:
    warmup, iters = TIMING[name]
    return (
        f"  {name:<5} N {size.tokens_per_device} tokens/device, Hs {size.hidden_student}, Ht {size.hidden_teacher}, "
        f"V {size.vocab}, {size.dtype}, chunk {size.chunk_size or 'default'}; {warmup} warm-up, {iters} timed calls"
    )


def build_parser() -> argparse.ArgumentParser:
    full_timing, tiny_timing = TIMING["full"], TIMING["tiny"]
    parser = argparse.ArgumentParser(
        prog="python -m bench.multi_gpu",
        description=__doc__.split("\n")[0],
        epilog="sizes:\n" + _size_line("full", FULL) + "\n" + _size_line("tiny", TINY),
        formatter_class=HelpFormatter,
    )
    parser.add_argument("--out", type=Path, required=True, help="directory for multi_gpu.json (created)")
    parser.add_argument("--tiny", action="store_true", help="the tiny float32 size (CPU smoke test) instead of full")
    parser.add_argument(
        "--tokens-per-device", type=int, default=None, help="override N per device (default: the size's)"
    )
    parser.add_argument("--vocab", type=int, default=None, help="override V (default: the size's)")
    parser.add_argument(
        "--warmup",
        type=int,
        default=None,
        help=f"untimed calls per variant (default: {full_timing[0]}, or {tiny_timing[0]} with --tiny)",
    )
    parser.add_argument(
        "--iters",
        type=int,
        default=None,
        help=f"timed calls per variant, >= {MIN_ITERS} except with --tiny "
        f"(default: {full_timing[1]}, or {tiny_timing[1]} with --tiny)",
    )
    parser.add_argument(
        "--vocab-parallel",
        action="store_true",
        help="benchmark vocabulary parallelism (heads split over V on (1, M) meshes) instead of data parallelism",
    )
    parser.add_argument(
        "--vocab-presets",
        nargs="+",
        choices=sorted(PRESETS),
        default=list(VOCAB_PRESETS),
        help="with --vocab-parallel: the presets whose head shapes are benchmarked",
    )
    parser.add_argument(
        "--vocab-tokens",
        nargs="+",
        type=int,
        default=list(VOCAB_TOKENS),
        help="with --vocab-parallel: N, the tokens every device sees",
    )
    parser.add_argument(
        "--model-axis",
        nargs="+",
        type=int,
        default=list(MODEL_AXES),
        help="with --vocab-parallel: model axis sizes M (those above the device count are skipped)",
    )
    add_git_sha_flag(parser)
    return parser


def parse_args(argv: list[str] | None = None) -> tuple[argparse.Namespace, Size, int, int]:
    """(arguments, size, warm-up calls, timed calls): the size's own counts unless given explicitly."""
    parser = build_parser()
    args = parser.parse_args(argv)
    name = "tiny" if args.tiny else "full"
    size = TINY if args.tiny else FULL
    overrides = {"tokens_per_device": args.tokens_per_device, "vocab": args.vocab}
    size = dataclasses.replace(size, **{k: v for k, v in overrides.items() if v is not None})
    warmup = TIMING[name][0] if args.warmup is None else args.warmup
    iters = TIMING[name][1] if args.iters is None else args.iters
    if iters < (1 if args.tiny else MIN_ITERS):
        parser.error(f"--iters must be at least {1 if args.tiny else MIN_ITERS}, got {iters}")
    if warmup < 0:
        parser.error(f"--warmup must be at least 0, got {warmup}")
    return args, size, warmup, iters


def vocab_main(args, warmup: int, iters: int) -> int:
    sizes = [("tiny", VOCAB_TINY)] if args.tiny else vocab_sizes(args.vocab_presets, args.vocab_tokens)
    result = run_vocab(sizes, args.model_axis, warmup=warmup, iters=iters, sha=args.git_sha)
    args.out.mkdir(parents=True, exist_ok=True)
    path = args.out / "multi_gpu_vocab.json"
    path.write_text(json.dumps(result, indent=2))
    print(
        f"{result['num_devices']} × {result['device_kind']} ({result['implementation']}), jax {result['jax_version']}; "
        f"vocabulary parallel, model axes {result['model_axes']} (skipped: {result['skipped_model_axes']})"
    )
    print(vocab_table(result))
    print(f"wrote {path}")
    rows = result["rows"]
    ok = all(r.get("matches_1_device", True) and "all-gather" not in r["collectives"] for r in rows)
    return 0 if ok else 1


def main(argv: list[str] | None = None) -> int:
    args, size, warmup, iters = parse_args(argv)
    if args.vocab_parallel:
        return vocab_main(args, warmup, iters)
    result = run(size, warmup=warmup, iters=iters, sha=args.git_sha)
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "multi_gpu.json").write_text(json.dumps(result, indent=2))
    print(
        f"{result['num_devices']} × {result['device_kind']} ({result['implementation']}), jax {result['jax_version']}; "
        f"{size.tokens_per_device} tokens/device, Hs {size.hidden_student}, Ht {size.hidden_teacher}, "
        f"V {size.vocab}, {size.dtype}; valid tokens per device {result['valid_tokens_per_device']}"
    )
    print(table(result))
    copies = result["tied_student_head_transposed_copies"]
    print(f"tied (V, Hs) student head, transposed copies in the 1-device step: {copies}")
    print(f"wrote {args.out / 'multi_gpu.json'}")
    ok = all(r.get("matches_1_device", True) and "all-gather" not in r["collectives"] for r in result["rows"])
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
