"""Sweep the launch config of the Pallas row kernel against the XLA contract implementation.

    python -m bench.kernel_sweep --out DIR [--rows 1024 --vocab 128256 --iters 30]

Times :func:`pallas_kernels.distill_rows_pallas` for every (block_v, num_warps, num_stages) of
the sweep, and ``jaxdistill.rowmath.distill_rows`` under ``jax.jit`` (the XLA path), on the same
(rows, V) float32 logits with bf16 dlogits, for each β (β = 0 and 1 take two passes over the
logits, interior β three). β, T and the weights are runtime inputs of the kernel, so each config
compiles once and serves every β.

Per (implementation, config, β) it records: the median / p10 / p90 of single calls timed to
``block_until_ready`` (after warm-up), the mean of back-to-back calls with one final block
(launch gaps hidden), two effective bandwidths — *unique* bytes (read both logits once, write
dlogits once) and *pass* bytes (what the kernel's passes move if nothing stays in L2) divided by
the median — and the largest deviation from the XLA outputs (a config that computes garbage
fast must not win). A config that fails to compile or run is a row with its error. Prints a
table and writes ``DIR/kernel_sweep.json``.
"""

from __future__ import annotations

import argparse
import functools
import itertools
import json
import pathlib
import platform
import statistics
import sys
import time
import traceback

import jax
import jax.numpy as jnp

from bench import common
from bench.cases import IGNORE_INDEX
from bench.common import HelpFormatter, add_git_sha_flag
from bench.suite import percentiles_ms, time_calls
from jaxdistill import rowmath
from pallas_kernels import RowKernelConfig, default_row_kernel_config, distill_rows_pallas

TEMPERATURE, SOFT_WEIGHT, HARD_WEIGHT = 2.0, 0.7, 0.3
IGNORED_FRACTION = 0.05
F32_BYTES = 4


DEFAULT_BETAS = (0.0, 0.5, 1.0)
DEFAULT_BLOCK_V = (2048, 4096, 8192)
DEFAULT_NUM_WARPS = (4, 8, 16)
DEFAULT_NUM_STAGES = (1, 2, 3)


def _csv(values) -> str:
    return ",".join(f"{v:g}" for v in values)


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="python -m bench.kernel_sweep", description=__doc__.split("\n\n")[0], formatter_class=HelpFormatter
    )
    p.add_argument("--out", type=pathlib.Path, required=True, help="directory for kernel_sweep.json (created)")
    p.add_argument("--rows", type=int, default=1024, help="logits rows per call (one chunk of the fused loss)")
    p.add_argument("--vocab", type=int, default=128256, help="vocabulary size V (logits columns)")
    p.add_argument(
        "--betas",
        type=_floats,
        default=list(DEFAULT_BETAS),
        help=f"comma-separated JSD β values, each timed with every config (default: {_csv(DEFAULT_BETAS)})",
    )
    p.add_argument(
        "--block-v",
        type=_ints,
        default=list(DEFAULT_BLOCK_V),
        help=f"comma-separated vocabulary tile widths to sweep (default: {_csv(DEFAULT_BLOCK_V)})",
    )
    p.add_argument(
        "--num-warps",
        type=_ints,
        default=list(DEFAULT_NUM_WARPS),
        help=f"comma-separated Triton warp counts to sweep (default: {_csv(DEFAULT_NUM_WARPS)})",
    )
    p.add_argument(
        "--num-stages",
        type=_ints,
        default=list(DEFAULT_NUM_STAGES),
        help=f"comma-separated Triton pipeline stage counts to sweep (default: {_csv(DEFAULT_NUM_STAGES)})",
    )
    p.add_argument("--dlogits-dtype", default="bfloat16", help="dtype of the dlogits the kernel writes")
    p.add_argument("--iters", type=int, default=30, help="timed calls per row (>= 20 recommended)")
    p.add_argument("--warmup", type=int, default=3, help="untimed calls before the timed ones")
    p.add_argument(
        "--interpret", action="store_true", help="off-GPU smoke run in Pallas interpret mode (slow: small sizes)"
    )
    add_git_sha_flag(p)
    return p


def _ints(text: str) -> list[int]:
    return [int(x) for x in text.split(",")]


def _floats(text: str) -> list[float]:
    return [float(x) for x in text.split(",")]


def parse_args(argv=None) -> argparse.Namespace:
    return build_parser().parse_args(argv)


def make_inputs(rows, vocab, seed=0):
    k = jax.random.split(jax.random.key(seed), 4)
    student = 2.0 * jax.random.normal(k[0], (rows, vocab), jnp.float32)
    teacher = 0.6 * student + 1.6 * jax.random.normal(k[1], (rows, vocab), jnp.float32)
    labels = jax.random.randint(k[2], (rows,), 0, vocab)
    labels = jnp.where(jax.random.uniform(k[3], (rows,)) < IGNORED_FRACTION, IGNORE_INDEX, labels)
    return student, teacher, labels


def hyper_for(beta):
    return jnp.array([beta, TEMPERATURE, SOFT_WEIGHT, HARD_WEIGHT], jnp.float32)


def pipelined_ms(fn, args, *, iters):
    """Mean ms of ``iters`` back-to-back calls with one final ``block_until_ready`` (launch gaps hidden)."""
    t0 = time.perf_counter()
    jax.block_until_ready([fn(*args) for _ in range(iters)])
    return 1e3 * (time.perf_counter() - t0) / iters


def deviation(got, want):
    """Largest |got − want| of (soft, hard) relative to max |want|, and of dlogits in absolute terms."""
    errs = {}
    for name, g, w in zip(("soft", "hard", "dlogits"), got, want, strict=True):
        g, w = g.astype(jnp.float32), w.astype(jnp.float32)
        err = float(jnp.max(jnp.abs(g - w)))
        errs[f"max_err_{name}"] = err if name == "dlogits" else err / max(float(jnp.max(jnp.abs(w))), 1e-30)
    return errs


def traffic_bytes(rows, vocab, beta, dlogits_itemsize):
    """(unique, pass) bytes: logits read once + dlogits written once; and per the kernel's passes."""
    reads = 2 if beta in (0.0, 1.0) else 3
    per_pass = 2 * F32_BYTES * rows * vocab
    written = dlogits_itemsize * rows * vocab
    return per_pass + written, reads * per_pass + written


def measure(name, config, launch, args, beta, reference, cli):
    """One table row: timings, bandwidths and deviation, or the error."""
    row = {"impl": name, "beta": beta}
    if config is not None:
        row.update(block_v=config.block_v, num_warps=config.num_warps, num_stages=config.num_stages)
    try:
        times = percentiles_ms(time_calls(lambda: launch(*args), warmup=cli.warmup, iters=cli.iters)[0])
        unique, passes = traffic_bytes(cli.rows, cli.vocab, beta, jnp.dtype(cli.dlogits_dtype).itemsize)
        median = times["median"]
        row.update(
            median_ms=median,
            p10_ms=times["p10"],
            p90_ms=times["p90"],
            pipelined_ms=pipelined_ms(launch, args, iters=cli.iters),
            unique_GBps=unique / median / 1e6,
            pass_GBps=passes / median / 1e6,
        )
        if reference is not None:
            row.update(deviation(launch(*args), reference))
    except Exception as e:  # a config that does not run is a row, not a crash
        row["error"] = error_text(e)
        row["traceback"] = traceback.format_exc(limit=4)
    return row


def error_text(e: BaseException) -> str:
    lines = str(e).strip().splitlines()
    return f"{type(e).__name__}: {lines[0] if lines else ''}"


def sweep(cli) -> list[dict]:
    student, teacher, labels = make_inputs(cli.rows, cli.vocab)
    dtype = jnp.dtype(cli.dlogits_dtype)
    xla = jax.jit(functools.partial(rowmath.distill_rows, dlogits_dtype=dtype))
    default = default_row_kernel_config(cli.vocab, dtype)
    default = (default.block_v, default.num_warps, default.num_stages)
    grid = itertools.product(cli.block_v, cli.num_warps, cli.num_stages)
    configs = [("pallas-default", default)] + [("pallas", c) for c in grid if c != default]
    args_by_beta = {beta: (student, teacher, labels, hyper_for(beta)) for beta in cli.betas}

    rows, references = [], {}
    for beta, args in args_by_beta.items():
        row = measure("xla", None, xla, args, beta, None, cli)
        references[beta] = xla(*args)
        rows.append(row)
        print_row(row)
    for name, (block_v, num_warps, num_stages) in configs:
        t0 = time.perf_counter()
        try:  # an invalid or uncompilable config is a row with its error
            config = RowKernelConfig(block_v=block_v, num_warps=num_warps, num_stages=num_stages)
            launch = functools.partial(distill_rows_pallas, dlogits_dtype=dtype, config=config, interpret=cli.interpret)
            launch = jax.jit(launch).lower(*args_by_beta[cli.betas[0]]).compile()
            compile_s, failure = time.perf_counter() - t0, None
        except Exception as e:
            failure = error_text(e)
        for beta, args in args_by_beta.items():
            if failure is None:
                row = measure(name, config, launch, args, beta, references[beta], cli)
                row["compile_s"] = compile_s
            else:
                row = dict(impl=name, beta=beta, block_v=block_v, num_warps=num_warps, num_stages=num_stages)
                row["error"] = f"compile: {failure}"
            rows.append(row)
            print_row(row)
    return rows


HEADER = (
    f"{'impl':<15}{'block':>7}{'warps':>6}{'stg':>4}{'beta':>6}{'median ms':>11}{'p90 ms':>9}"
    f"{'piped ms':>10}{'uniq GB/s':>10}{'pass GB/s':>10}{'dlogit err':>11}{'vs xla':>8}"
)


def print_row(row, xla_ms=None):
    cfg = (
        f"{row.get('block_v', ''):>7}{row.get('num_warps', ''):>6}{row.get('num_stages', ''):>4}"
        if "block_v" in row
        else " " * 17
    )
    head = f"{row['impl']:<15}{cfg}{row['beta']:>6.2f}"
    if "error" in row:
        print(f"{head}  ERROR {row['error'][:100]}", flush=True)
        return
    speedup = f"{xla_ms / row['median_ms']:>7.2f}x" if xla_ms else ""
    err = f"{row['max_err_dlogits']:>11.2e}" if "max_err_dlogits" in row else " " * 11
    print(
        f"{head}{row['median_ms']:>11.3f}{row['p90_ms']:>9.3f}{row['pipelined_ms']:>10.3f}"
        f"{row['unique_GBps']:>10.0f}{row['pass_GBps']:>10.0f}{err}{speedup}",
        flush=True,
    )


def summarize(rows):
    """The table sorted by mean median over β, with the speedup over XLA; returns the best config."""
    xla_ms = {r["beta"]: r["median_ms"] for r in rows if r["impl"] == "xla" and "error" not in r}
    by_config = {}
    for r in rows:
        if r["impl"] != "xla" and "error" not in r:
            by_config.setdefault((r["impl"], r["block_v"], r["num_warps"], r["num_stages"]), []).append(r)
    ranked = sorted(by_config.items(), key=lambda kv: statistics.mean(r["median_ms"] for r in kv[1]))
    print("\nsorted by mean median over beta (fastest first):")
    print(HEADER)
    for r in (r for r in rows if r["impl"] == "xla" and "error" not in r):
        print_row(r)
    for _, config_rows in ranked:
        for r in config_rows:
            print_row(r, xla_ms.get(r["beta"]))
    failures = [r for r in rows if "error" in r]
    if failures:
        print(f"\n{len(failures)} rows failed, e.g. {failures[0]['error'][:200]}")
    return None if not ranked else dict(zip(("impl", "block_v", "num_warps", "num_stages"), ranked[0][0], strict=True))


def main(argv=None) -> int:
    cli = parse_args(argv)
    if jax.default_backend() != "gpu" and not cli.interpret:
        print("no GPU backend: run on the H200, or pass --interpret (slow; use small --rows/--vocab)")
        return 2
    cli.out.mkdir(parents=True, exist_ok=True)
    device = jax.devices()[0]
    print(f"{device.device_kind} | jax {jax.__version__} | rows={cli.rows} V={cli.vocab} dlogits={cli.dlogits_dtype}")
    print(HEADER)
    rows = sweep(cli)
    best = summarize(rows)
    result = {
        "date": common.utc_now(),
        "git_sha": cli.git_sha or common.git_sha(),
        "device_kind": device.device_kind,
        "jax_version": jax.__version__,
        "jaxlib_version": common.package_version("jaxlib"),
        "python": platform.python_version(),
        "argv": sys.argv[1:] if argv is None else list(argv),
        "problem": {
            "rows": cli.rows,
            "vocab": cli.vocab,
            "logits_dtype": "float32",
            "dlogits_dtype": cli.dlogits_dtype,
            "temperature": TEMPERATURE,
            "soft_weight": SOFT_WEIGHT,
            "hard_weight": HARD_WEIGHT,
            "ignored_fraction": IGNORED_FRACTION,
        },
        "timing": {"iters": cli.iters, "warmup": cli.warmup, "interpret": cli.interpret},
        "best_config": best,
        "rows": rows,
    }
    path = cli.out / "kernel_sweep.json"
    path.write_text(json.dumps(result, indent=1))
    print(f"\nbest: {best}\nwrote {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
