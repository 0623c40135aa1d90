"""Subprocess worker of test_multidevice.py and test_multiprocess.py (run with simulated CPU devices).

``python tests/distributed_worker.py devices``: on 4 local devices, runs the pmap, shard_map and
sharded-jit variants of the distillation loss-and-gradients and of one training step, and the
same on one device over the whole batch; prints one JSON line with the largest differences,
the valid-token counts and the collectives in each compiled HLO.

``python tests/distributed_worker.py process --process-id I --num-processes P --port N``: one
process of a ``jax.distributed`` job on localhost (CPU collectives); runs the sharded-jit
training step on the global mesh and compares it with this process's single-device step over
the whole batch; prints one JSON line.
"""

from __future__ import annotations

import argparse
import functools
import json

import jax
import numpy as np
from flax import nnx
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

from bench.multi_gpu import collectives
from bench.multi_gpu import max_rel_diff as leaf_max_rel_diff


def max_rel_diff(tree, ref_tree) -> float:
    """max over leaves of max|a − b| / max(max|b|, 1e-30)."""
    diffs = jax.tree.map(lambda a, b: leaf_max_rel_diff(np.asarray(a), np.asarray(b)), tree, ref_tree)
    return max(jax.tree.leaves(diffs))


def scalar_metrics(metrics) -> dict:
    return {k: float(np.asarray(v).reshape(-1)[0]) for k, v in metrics.items()}


def run_devices() -> dict:
    from distill_setup import CONFIG, make_batch, make_models

    from jaxdistill import training

    n_dev = jax.device_count()
    student, teacher, optimizer = make_models()
    graphdef, state = nnx.split((student, teacher, optimizer))
    batch = make_batch(8)
    grads_fn, step_fn = training.functional_loss_and_grads, training.functional_train_step

    single_grads = jax.jit(functools.partial(grads_fn, graphdef, config=CONFIG))
    ref_metrics, ref_grads = single_grads(state, batch)
    ref_state, _ = jax.jit(functools.partial(step_fn, graphdef, config=CONFIG))(state, batch)

    mesh = training.data_mesh()
    on_mesh_state = jax.device_put(state, NamedSharding(mesh, P()))
    on_mesh_batch = jax.device_put(batch, NamedSharding(mesh, P("data")))
    stacked_batch = jax.tree.map(lambda x: x.reshape(n_dev, -1, *x.shape[1:]), batch)
    variants = {
        "pmap": (
            lambda fn: training.make_pmap_step(graphdef, config=CONFIG, step_fn=fn),
            (training.replicate(state), stacked_batch),
            lambda tree: jax.tree.map(lambda x: np.asarray(x)[0], tree),
        ),
        "shard_map": (
            lambda fn: training.make_shard_map_step(graphdef, mesh, config=CONFIG, step_fn=fn),
            (on_mesh_state, on_mesh_batch),
            lambda tree: tree,
        ),
        "sharded_jit": (
            lambda fn: training.make_sharded_jit_step(graphdef, mesh, config=CONFIG, step_fn=fn),
            (state, batch),
            lambda tree: tree,
        ),
    }
    valid = (batch["labels"] != CONFIG.ignore_index).reshape(n_dev, -1).sum(axis=1)
    report = {
        "num_devices": n_dev,
        "valid_tokens_per_device": valid.tolist(),
        "reference": scalar_metrics(ref_metrics),
    }
    for name, (build, args, first) in variants.items():
        grads_step = build(grads_fn).lower(*args).compile()
        metrics, grads = first(grads_step(*args))
        train = build(step_fn).lower(*args).compile()
        new_state, _ = train(*args)
        report[name] = {
            "metrics": scalar_metrics(metrics),
            "grads_max_rel_diff": max_rel_diff(grads, ref_grads),
            "state_max_rel_diff": max_rel_diff(first(new_state), ref_state),
            "collectives_grads": collectives(grads_step.as_text()),
            "collectives_step": collectives(train.as_text()),
        }
    return report


def run_process(process_id: int, num_processes: int, port: int) -> dict:
    jax.distributed.initialize(
        coordinator_address=f"localhost:{port}",
        num_processes=num_processes,
        process_id=process_id,
        initialization_timeout=120,
    )
    from distill_setup import CONFIG, make_batch, make_models

    from jaxdistill import training

    student, teacher, optimizer = make_models()
    graphdef, state = nnx.split((student, teacher, optimizer))
    state = jax.device_get(state)  # host copies: identical in every process (same seed)
    global_batch = make_batch(8)
    rows = len(global_batch["inputs"]) // num_processes
    local_batch = jax.tree.map(lambda x: x[process_id * rows : (process_id + 1) * rows], global_batch)

    # The single-device step over the whole batch, on this process's first local device.
    with jax.default_device(jax.local_devices()[0]):
        ref_state, ref_metrics = jax.jit(functools.partial(training.functional_train_step, graphdef, config=CONFIG))(
            state, global_batch
        )

    mesh = training.data_mesh()
    replicated = NamedSharding(mesh, P())
    batch_sharding = NamedSharding(mesh, P("data"))
    dist_state = jax.tree.map(lambda x: jax.make_array_from_process_local_data(replicated, x), state)
    dist_batch = jax.tree.map(lambda x: jax.make_array_from_process_local_data(batch_sharding, x), local_batch)
    step = training.make_sharded_jit_step(graphdef, mesh, config=CONFIG).lower(dist_state, dist_batch).compile()
    new_state, metrics = step(dist_state, dist_batch)
    local = functools.partial(jax.tree.map, lambda x: np.asarray(x.addressable_data(0)))
    report = {
        "process_id": process_id,
        "process_count": jax.process_count(),
        "global_devices": jax.device_count(),
        "local_devices": jax.local_device_count(),
        "local_valid_tokens": int(np.sum(local_batch["labels"] != CONFIG.ignore_index)),
        "metrics": scalar_metrics(local(metrics)),
        "reference": scalar_metrics(ref_metrics),
        "state_max_rel_diff": max_rel_diff(local(new_state), ref_state),
        "collectives": collectives(step.as_text()),
    }
    jax.distributed.shutdown()
    return report


def main():
    parser = argparse.ArgumentParser()
    sub = parser.add_subparsers(dest="mode", required=True)
    sub.add_parser("devices")
    proc = sub.add_parser("process")
    proc.add_argument("--process-id", type=int, required=True)
    proc.add_argument("--num-processes", type=int, required=True)
    proc.add_argument("--port", type=int, required=True)
    args = parser.parse_args()
    if args.mode == "devices":
        report = run_devices()
    else:
        report = run_process(args.process_id, args.num_processes, args.port)
    print(json.dumps(report))


if __name__ == "__main__":
    main()
