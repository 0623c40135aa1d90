"""Time each stage of one chunk, and the whole step, on the GPU.

    python -m bench.chunk_stages --out DIR              # stages of one (1024, V) chunk + steps
    python bench/chunk_stages.py --steps-only --out DIR  # whole steps with the importable jaxdistill

Stages (llama head shapes unless overridden, bf16 inputs, median of ``--iters`` calls):
``xla-logits`` (the two logits matmuls, float32 out: the floor of stage 1), ``xla-logits+stats``
(the XLA path's stage 1), ``kernel`` (the fused logits kernel, per config in ``--configs``),
``rows-beta=B`` (stages 2 + 3 of the XLA path on the kernel's
float32 logits: statistics, losses and bf16 dlogits), ``grad-matmuls`` (grad_x and the float32
grad_W accumulation), ``chunk-IMPL-beta=B`` (one scan body of each implementation). Steps: value and gradients of the
whole N-token loss for each implementation and β, next to the four-matmul floor.

Writes ``stages.json`` (with date, device, jax version and git sha) into ``--out`` and prints a table.
"""

from __future__ import annotations

import argparse
import datetime
import functools
import itertools
import json
import subprocess
import sys
import time
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np


def median_ms(call, *, warmup=3, iters=20):
    for _ in range(warmup):
        jax.block_until_ready(call())
    times = []
    for _ in range(iters):
        start = time.perf_counter()
        jax.block_until_ready(call())
        times.append(time.perf_counter() - start)
    return 1e3 * float(np.median(times))


def draw(rows, hs, ht, vocab, seed=0):
    k = jax.random.split(jax.random.key(seed), 5)
    normal = lambda key, shape, scale: (jax.random.normal(key, shape, jnp.float32) * scale).astype(jnp.bfloat16)  # noqa: E731
    return dict(
        xs=normal(k[0], (rows, hs), 1.0),
        ws=normal(k[1], (hs, vocab), 3.0 / np.sqrt(hs)),
        xt=normal(k[2], (rows, ht), 1.0),
        wt=normal(k[3], (ht, vocab), 3.0 / np.sqrt(ht)),
        labels=jax.random.randint(k[4], (rows,), 0, vocab),
    )


def stage_rows(args):
    from jaxdistill import fused, rowmath
    from pallas_kernels import LogitsKernelConfig, logits_and_partials_pallas

    d = draw(args.rows, args.hidden_student, args.hidden_teacher, args.vocab)
    xs, ws, xt, wt, labels = d["xs"], d["ws"], d["xt"], d["wt"], d["labels"]
    t = jnp.float32(1.0)
    dot = functools.partial(jnp.dot, preferred_element_type=jnp.float32)
    out = []

    def add(name, fn, *fargs):
        ms = median_ms(lambda: fn(*fargs), iters=args.iters)
        out.append({"stage": name, "ms": ms})
        print(f"{name:40s} {ms:8.3f} ms", flush=True)

    add("xla-logits", jax.jit(lambda a, b, c, e: (dot(a, b), dot(c, e))), xs, ws, xt, wt)
    add(
        "xla-logits+stats",
        jax.jit(lambda a, b, c, e: rowmath.chunk_logits_xla(dot(a, b), dot(c, e), 1.0)),
        xs,
        ws,
        xt,
        wt,
    )
    for spec in args.configs:
        cfg = LogitsKernelConfig(*map(int, spec.split(",")))
        kernel = jax.jit(functools.partial(logits_and_partials_pallas, config=cfg))
        add(f"kernel {spec}", kernel, xs, ws, None, xt, wt, None, t)
    chunk = jax.jit(logits_and_partials_pallas)(xs, ws, None, xt, wt, None, t)
    for beta in args.betas:
        hyper = fused._hyper(beta, 1.0, 0.5, 0.5, 1.0 / args.rows)
        divergence = fused.divergence_of(beta)

        def rows_stage(chunk, labels, z_label, divergence=divergence, hyper=hyper):
            stats = rowmath.combine_partials(chunk.partials, hyper.inv_temperature)
            return rowmath.soft_rows_and_dlogits(
                chunk, stats, labels, z_label, hyper, divergence=divergence, dlogits_dtype=jnp.bfloat16
            )

        add(f"rows-beta={beta}", jax.jit(rows_stage), chunk, labels, jnp.zeros((args.rows,), jnp.float32))
    g = (dot(xs, ws) * 1e-3).astype(jnp.bfloat16)
    grad_w0 = jnp.zeros(ws.shape, jnp.float32)

    def grad_matmuls(g, w, x, acc):
        grad_w = jax.lax.dot_general(x, g, (((0,), (0,)), ((), ())), preferred_element_type=jnp.float32)
        return dot(g, w.T), acc + grad_w

    add("grad-matmuls", jax.jit(grad_matmuls), g, ws, xs, grad_w0)
    for beta, impl in itertools.product(args.betas, ("pallas", "xla")):
        plan = fused.FusedPlan(
            chunk_size=args.rows,
            implementation=impl,
            divergence=fused.divergence_of(beta),
            interpret=jax.default_backend() != "gpu",
        )
        hyper = fused._hyper(beta, 1.0, 0.5, 0.5, 1.0 / args.rows)
        add(
            f"chunk-{impl}-beta={beta}",
            jax.jit(lambda *a, plan=plan, hyper=hyper: fused._scan_losses_and_grads(plan, *a, hyper)),
            xs, ws, None, (xt,), (wt, None), labels,
        )  # fmt: skip
    return out


def step_rows(args):
    import jaxdistill

    d = draw(args.tokens, args.hidden_student, args.hidden_teacher, args.vocab, seed=1)
    xs, ws, xt, wt, labels = d["xs"], d["ws"], d["xt"], d["wt"], d["labels"]
    dot = functools.partial(jnp.dot, preferred_element_type=jnp.float32)
    out = []

    def floor(xs, ws, xt, wt):
        z_t, z_s = dot(xt, wt), dot(xs, ws)
        g = (z_s - z_t).astype(jnp.bfloat16)
        return dot(g, ws.T), jax.lax.dot_general(xs, g, (((0,), (0,)), ((), ())), preferred_element_type=jnp.float32)

    ms = median_ms(lambda: jax.jit(floor)(xs, ws, xt, wt), iters=args.iters)
    out.append({"step": "matmul-floor", "tokens": args.tokens, "ms": ms})
    print(f"{'step matmul-floor':40s} {ms:8.3f} ms", flush=True)
    for beta in args.betas:
        for impl in args.impls:
            options = dict(beta=beta, temperature=1.0, soft_weight=0.5, hard_weight=0.5, implementation=impl)
            if args.chunk_size:
                options["chunk_size"] = args.chunk_size

            def loss(x, w, options=options):
                return jaxdistill.fused_linear_jsd_loss(x, w, xt, wt, labels, **options)

            vg = jax.jit(jax.value_and_grad(loss, argnums=(0, 1)))
            ms = median_ms(lambda vg=vg: vg(xs, ws), iters=args.iters)
            value_only = jax.jit(loss)
            fwd_ms = median_ms(lambda f=value_only: f(xs, ws), iters=args.iters)
            row = {"step": impl, "beta": beta, "tokens": args.tokens, "ms": ms, "forward_ms": fwd_ms, "tag": args.tag}
            out.append(row)
            print(
                f"{'step ' + args.tag + ' ' + impl + f' beta={beta}':40s} {ms:8.3f} ms  forward {fwd_ms:8.3f} ms",
                flush=True,
            )
    return out


def main(argv=None):
    p = argparse.ArgumentParser(
        description=__doc__.split("\n")[0], formatter_class=argparse.ArgumentDefaultsHelpFormatter
    )
    p.add_argument("--out", type=Path, required=True, help="directory for stages.json")
    p.add_argument("--rows", type=int, default=1024, help="rows of the timed chunk")
    p.add_argument("--tokens", type=int, default=8192, help="N of the whole-step timings")
    p.add_argument("--hidden-student", type=int, default=2048, help="Hs")
    p.add_argument("--hidden-teacher", type=int, default=4096, help="Ht")
    p.add_argument("--vocab", type=int, default=128256, help="V")
    p.add_argument("--betas", type=float, nargs="+", default=[0.0, 0.5, 1.0], help="β values")
    p.add_argument("--impls", nargs="+", default=["pallas", "xla"], help="implementations of the step rows")
    p.add_argument("--chunk-size", type=int, default=None, help="chunk of the step rows (default: the library's)")
    p.add_argument(
        "--configs",
        nargs="+",
        default=["128,256,64,8,3"],
        help="kernel configs block_rows,block_v,block_k,num_warps,num_stages",
    )
    p.add_argument("--iters", type=int, default=20, help="timed calls per row")
    p.add_argument("--steps-only", action="store_true", help="only the whole-step rows")
    p.add_argument("--tag", default="", help="label of the step rows (e.g. the tree they ran on)")
    args = p.parse_args(argv)
    args.out.mkdir(parents=True, exist_ok=True)
    rows = [] if args.steps_only else stage_rows(args)
    rows += step_rows(args)
    sha = subprocess.run(["git", "rev-parse", "HEAD"], capture_output=True, text=True).stdout.strip()
    meta = {
        "date": datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds"),
        "device": jax.devices()[0].device_kind,
        "jax": jax.__version__,
        "git_sha": sha,
        "argv": sys.argv[1:],
    }
    with open(args.out / f"stages{'-' + args.tag if args.tag else ''}.json", "w") as f:
        json.dump({"meta": meta, "rows": rows}, f, indent=1)


if __name__ == "__main__":
    main()
