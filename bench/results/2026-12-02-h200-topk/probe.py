"""Timing probe: dense steps (this tree or --tree), top-k loss, floors, top-k selection. Prints one line per row."""
import argparse, functools, json, sys, time

p = argparse.ArgumentParser()
p.add_argument("--tree", default=".")
p.add_argument("--what", nargs="+", default=["dense"])
p.add_argument("--tag", default="head")
p.add_argument("--iters", type=int, default=10)
p.add_argument("--out", default=None)
args = p.parse_args()
sys.path.insert(0, args.tree)
import jax, jax.numpy as jnp, numpy as np
import jaxdistill

N, HS, HT, V = 8192, 2048, 4096, 128256
rows = []


def timed(name, f, *a):
    out = f(*a); jax.block_until_ready(out)
    out = f(*a); jax.block_until_ready(out)
    ts = []
    for _ in range(args.iters):
        t = time.perf_counter(); jax.block_until_ready(f(*a)); ts.append(time.perf_counter() - t)
    ms = 1e3 * float(np.median(ts))
    rows.append({"name": name, "tag": args.tag, "ms": ms})
    print(f"{args.tag:8s} {name:45s} {ms:9.3f} ms", flush=True)
    return ms


k = jax.random.split(jax.random.key(1), 6)
xs = jax.random.normal(k[0], (N, HS), jnp.bfloat16)
ws = (jax.random.normal(k[1], (HS, V), jnp.float32) / np.sqrt(HS) * 2).astype(jnp.bfloat16)
xt = jax.random.normal(k[2], (N, HT), jnp.bfloat16)
wt = (jax.random.normal(k[3], (HT, V), jnp.float32) / np.sqrt(HT) * 3).astype(jnp.bfloat16)
labels = jax.random.randint(k[4], (N,), 0, V)
dot = functools.partial(jnp.dot, preferred_element_type=jnp.float32)
C = 1024

if "dense" in args.what:
    for beta in (0.0, 0.5, 1.0):
        for impl in ("pallas", "xla"):
            loss = lambda x, w, impl=impl, beta=beta: jaxdistill.fused_linear_jsd_loss(
                x, w, xt, wt, labels, beta=beta, soft_weight=0.5, hard_weight=0.5, implementation=impl)
            timed(f"dense {impl} beta={beta}", jax.jit(jax.value_and_grad(loss, (0, 1))), xs, ws)

if "topk" in args.what:
    def floor3(xs, ws):
        def body(acc, x):
            z = dot(x, ws).astype(jnp.bfloat16)
            return acc + jax.lax.dot_general(x, z, (((0,), (0,)), ((), ())), preferred_element_type=jnp.float32), dot(z, ws.T)
        return jax.lax.scan(body, jnp.zeros(ws.shape, jnp.float32), xs.reshape(-1, C, HS))
    timed("floor student 3 matmuls", jax.jit(floor3), xs, ws)
    def teacher_mm(xt, wt):
        return jax.lax.scan(lambda c, x: (c + jnp.sum(dot(x, wt)[:, :8]), None), 0.0, xt.reshape(-1, C, HT))[0]
    timed("teacher logits matmuls", jax.jit(teacher_mm), xt, wt)
    for kk in (64,):
        timed(f"teacher_topk k={kk}", jax.jit(lambda x, w, kk=kk: jaxdistill.teacher_topk(x, w, kk)), xt, wt)
    z = dot(xt[:C], wt)
    timed("lax.top_k (1024,V) k=64", jax.jit(lambda z: jax.lax.top_k(z, 64)), z)
    def two_stage(z, g=64):
        pad = (-V) % g
        zz = jnp.pad(z, ((0, 0), (0, pad)), constant_values=-jnp.inf).reshape(C, g, -1)
        v, i = jax.lax.top_k(zz, 64)
        i = i + (jnp.arange(g) * zz.shape[-1])[None, :, None]
        v2, j = jax.lax.top_k(v.reshape(C, -1), 64)
        return v2, jnp.take_along_axis(i.reshape(C, -1), j, -1)
    for g in (16, 64, 256):
        if V // g >= 64:
            timed(f"two-stage top_k g={g}", jax.jit(functools.partial(two_stage, g=g)), z)
    for kk in (16, 64, 256):
        cache = jax.jit(lambda x, w, kk=kk: jaxdistill.teacher_topk(x, w, kk))(xt, wt)
        for impl in ("xla", "pallas"):
            loss = lambda x, w, ids, lp, impl=impl: jaxdistill.fused_linear_topk_distill_loss(
                x, w, ids, lp, labels, beta=0.0, soft_weight=0.5, hard_weight=0.5, implementation=impl)
            timed(f"topk k={kk} {impl}", jax.jit(jax.value_and_grad(loss, (0, 1))), xs, ws, cache.ids, cache.logprobs)
if "select" in args.what:
    from jaxdistill.topk import exact_top_k
    def teacher_mm(xt, wt):
        return jax.lax.scan(lambda c, x: (c + jnp.sum(dot(x, wt)[:, :8]), None), 0.0, xt.reshape(-1, C, HT))[0]
    timed("teacher logits matmuls", jax.jit(teacher_mm), xt, wt)
    timed("teacher_topk k=64", jax.jit(lambda x, w: jaxdistill.teacher_topk(x, w, 64)), xt, wt)
    z = dot(xt[:C], wt)
    timed("chunk: lax.top_k k=64", jax.jit(lambda z: jax.lax.top_k(z, 64)), z)
    for tile in (32, 64, 128, 256, 512):
        timed(f"chunk: exact_top_k tile={tile}", jax.jit(lambda z, tile=tile: exact_top_k(z, 64, tile)), z)
    timed("chunk: logsumexp", jax.jit(lambda z: jax.nn.logsumexp(z, -1)), z)
    timed("chunk: tile max 128", jax.jit(lambda z: jnp.max(jnp.pad(z, ((0, 0), (0, 128 - V % 128)), constant_values=-jnp.inf).reshape(C, -1, 128), -1)), z)
if "hlo" in args.what:
    cache = jax.jit(lambda x, w: jaxdistill.teacher_topk(x, w, 64))(xt, wt)
    loss = lambda x, w, ids, lp: jaxdistill.fused_linear_topk_distill_loss(x, w, ids, lp, labels, soft_weight=0.5, hard_weight=0.5, implementation="xla")
    text = jax.jit(jax.value_and_grad(loss, (0, 1))).lower(xs, ws, cache.ids, cache.logprobs).compile().as_text()
    import os
    open(os.path.join(os.environ.get("OUT", "."), "topk_step_hlo.txt"), "w").write(text)
    print("copies:", text.count(" copy("), "fusions:", text.count("fusion("), "scatter:", text.count("scatter("))
if args.out:
    with open(args.out, "a") as f:
        for r in rows:
            f.write(json.dumps(r) + "\n")
