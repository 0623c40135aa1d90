"""Worker for test_shard_map_vma.py (run with 4 simulated CPU devices): prints one JSON line.

The fused loss inside ``jax.shard_map`` with JAX's default ``check_vma=True``: the weight is
replicated, the tokens are sharded, and autodiff sums the weight gradient over the data axis.
``python tests/shard_map_vma_worker.py [xla|pallas] [check-vma|no-check-vma]`` picks the
implementation (default xla; pallas runs the row kernel in interpret mode off a GPU) and the
shard_map's check_vma (default True).
"""

import functools
import json
import sys

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import Mesh
from jax.sharding import PartitionSpec as P

from bench.multi_gpu import max_rel_diff
from jaxdistill import fused_linear_jsd_loss

jax.config.update("jax_default_matmul_precision", "highest")
keys = jax.random.split(jax.random.key(0), 6)
n, hs, ht, vocab = 64, 16, 24, 257
xs, xt = jax.random.normal(keys[0], (n, hs)), jax.random.normal(keys[1], (n, ht))
ws, wt = jax.random.normal(keys[2], (hs, vocab)) / 4, jax.random.normal(keys[3], (ht, vocab)) / 4
bs = jax.random.normal(keys[4], (vocab,))
labels = jax.random.randint(keys[5], (n,), 0, vocab)
labels = jnp.where(jnp.arange(n) % 16 < jnp.arange(n) // 16 * 3, -100, labels)  # uneven per device
implementation = sys.argv[1] if len(sys.argv) > 1 else "xla"
check_vma = (sys.argv[2] if len(sys.argv) > 2 else "check-vma") == "check-vma"
options = dict(beta=0.3, temperature=2.0, hard_weight=0.5, chunk_size=5, implementation=implementation)


def loss(xs, ws, bs, xt, labels, axis_name=None):
    return fused_linear_jsd_loss(xs, ws, xt, wt, labels, student_bias=bs, axis_name=axis_name, **options)


whole = jax.value_and_grad(loss, argnums=(0, 1, 2))(xs, ws, bs, xt, labels)

mesh = Mesh(np.array(jax.devices()), ("data",))


def global_loss(xs, ws, bs, xt, labels):
    local = functools.partial(loss, axis_name="data")
    mapped = jax.shard_map(
        lambda *a: jax.lax.psum(local(*a), "data"),
        mesh=mesh,
        in_specs=(P("data"), P(), P(), P("data"), P("data")),
        out_specs=P(),
        check_vma=check_vma,
    )
    return mapped(xs, ws, bs, xt, labels)


sharded = jax.jit(jax.value_and_grad(global_loss, argnums=(0, 1, 2)))(xs, ws, bs, xt, labels)


def rel(a, b):
    return max_rel_diff(np.asarray(a), np.asarray(b))


print(
    json.dumps(
        {
            "devices": len(jax.devices()),
            "implementation": implementation,
            "check_vma": check_vma,
            "loss": [float(whole[0]), float(sharded[0])],
            "grad_rel_diff": [rel(a, b) for a, b in zip(sharded[1], whole[1], strict=True)],
        }
    )
)
