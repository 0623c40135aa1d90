"""Subprocess worker of test_multidevice.py and test_multiprocess.py (run with simulated CPU devices).

``python tests/distributed_worker.py devices``: on 4 local devices, runs the pmap, shard_map and
sharded-jit variants of the distillation loss-and-gradients and of one training step, and the
same on one device over the whole batch; prints one JSON line with the largest differences,
the valid-token counts and the collectives in each compiled HLO.

``python tests/distributed_worker.py vocab``: on 8 local devices, trains the student for
``VOCAB_STEPS`` steps with the data- and vocabulary-parallel step on a 2 × 4 and a 1 × 8
(data, model) mesh and with the single-device step; prints the loss curves, the final
parameters' largest difference, the head shardings and the compiled step's collectives.

``python tests/distributed_worker.py process --process-id I --num-processes P --port N``: one
process of a ``jax.distributed`` job on localhost (CPU collectives); runs the sharded-jit
training step on the global mesh, then the vocabulary-parallel step on a (processes × local
devices) mesh, and compares each with this process's single-device step over the whole batch;
prints one JSON line.
"""

from __future__ import annotations

import argparse
import dataclasses
import functools
import json

import jax
import numpy as np
import optax
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


VOCAB_STEPS = 50
VOCAB_PARALLEL = 96  # a multiple of the model axis sizes 1, 2, 4 and 8
# Student tied with a bias, teacher untied with a bias: every kind of head parameter is split.
VOCAB_HEADS = dict(tie_student=True, student_bias=True, tie_teacher=False, teacher_bias=True, vocab=VOCAB_PARALLEL)


def vocab_batches(steps: int) -> list[dict]:
    from distill_setup import make_batch

    return [make_batch(8, seed=i, vocab=VOCAB_PARALLEL) for i in range(steps)]


def train(step, state, batches) -> tuple[object, list[float]]:
    losses = []
    for batch in batches:
        state, metrics = step(state, batch)
        losses.append(float(np.asarray(metrics["loss"]).reshape(-1)[0]))
    return state, losses


def head_layout(state, shardings) -> dict:
    """The specs and per-device shapes of the student's tied embedding, the teacher's head and one Adam moment."""
    student, teacher, optimizer = state[0], state[1], state[2]
    leaves = {
        "student_embedding": (student["embed"]["embedding"], shardings[0]["embed"]["embedding"]),
        "student_head_bias": (student["head_bias"], shardings[0]["head_bias"]),
        "teacher_kernel": (teacher["head"]["kernel"], shardings[1]["head"]["kernel"]),
        "teacher_bias": (teacher["head"]["bias"], shardings[1]["head"]["bias"]),
        "adam_mu_embedding": (
            optimizer["opt_state"][0]["mu"]["embed"]["embedding"],
            shardings[2]["opt_state"][0]["mu"]["embed"]["embedding"],
        ),
        "position_embedding": (student["position"]["embedding"], shardings[0]["position"]["embedding"]),
    }
    return {
        name: {
            "spec": [None if a is None else str(a) for a in sharding.get_value().spec],
            "shard_shape": list(leaf.get_value().addressable_shards[0].data.shape),
        }
        for name, (leaf, sharding) in leaves.items()
    }


def run_vocab_devices() -> dict:
    from distill_setup import CONFIG, make_models

    from jaxdistill import training

    student, teacher, optimizer = make_models(**VOCAB_HEADS, tx=optax.adam(1e-2))
    graphdef, state = nnx.split((student, teacher, optimizer))
    batches = vocab_batches(VOCAB_STEPS)
    ref_state, ref_losses = train(
        jax.jit(functools.partial(training.functional_train_step, graphdef, config=CONFIG)), state, batches
    )
    report = {"num_devices": jax.device_count(), "steps": VOCAB_STEPS, "reference_losses": ref_losses}
    for data, model in ((2, 4), (1, 8)):
        mesh = training.vocab_mesh(data, model)
        shardings = training.vocab_parallel_shardings(graphdef, state, mesh)
        step = training.make_vocab_parallel_step(graphdef, state, mesh, config=CONFIG)
        placed = jax.device_put(state, shardings)
        compiled = step.lower(placed, batches[0]).compile()
        new_state, losses = train(compiled, placed, batches)
        report[f"{data}x{model}"] = {
            "losses": losses,
            "state_max_rel_diff": max_rel_diff(new_state, ref_state),
            "heads": head_layout(new_state, shardings),
            "collectives": collectives(compiled.as_text()),
        }
    # The Pallas path (fused logits kernel, interpret mode) through the same builder, a few steps.
    pallas = dataclasses.replace(CONFIG, implementation="pallas")
    mesh = training.vocab_mesh(2, 4)
    step = training.make_vocab_parallel_step(graphdef, state, mesh, config=pallas)
    _, losses = train(
        step, jax.device_put(state, training.vocab_parallel_shardings(graphdef, state, mesh)), batches[:2]
    )
    report["2x4-pallas"] = {"losses": losses}
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
        "vocab": run_process_vocab(num_processes),
    }
    jax.distributed.shutdown()
    return report


def place(host_tree, shardings):
    """Global arrays from host copies present in every process, each device taking its part."""
    return jax.tree.map(
        lambda x, s: jax.make_array_from_callback(np.shape(x), s, lambda index: np.asarray(x)[index]),
        host_tree,
        shardings,
    )


def local_copy(tree):
    """Host copies of global arrays whose every part is on this process's devices (replicated over processes)."""

    def gather(x):
        out = np.empty(x.shape, x.dtype)
        for shard in x.addressable_shards:
            out[shard.index] = np.asarray(shard.data)
        return out

    return jax.tree.map(gather, tree)


def run_process_vocab(num_processes: int, steps: int = 3) -> dict:
    """The vocabulary-parallel step on a (processes × local devices) mesh: the data axis across
    processes, the model axis within each, against this process's single-device steps."""
    from distill_setup import CONFIG, make_models

    from jaxdistill import training

    student, teacher, optimizer = make_models(**VOCAB_HEADS, tx=optax.adam(1e-2))
    graphdef, state = nnx.split((student, teacher, optimizer))
    state = jax.device_get(state)
    batches = vocab_batches(steps)
    with jax.default_device(jax.local_devices()[0]):
        ref_state, ref_losses = train(
            jax.jit(functools.partial(training.functional_train_step, graphdef, config=CONFIG)), state, batches
        )
    mesh = training.vocab_mesh(num_processes, jax.local_device_count())
    shardings = training.vocab_parallel_shardings(graphdef, state, mesh)
    batch_sharding = NamedSharding(mesh, P("data"))
    rows = len(batches[0]["inputs"]) // num_processes
    index = jax.process_index()
    local_batches = [
        jax.tree.map(
            lambda x: jax.make_array_from_process_local_data(batch_sharding, x[index * rows : (index + 1) * rows]), b
        )
        for b in batches
    ]
    step = training.make_vocab_parallel_step(graphdef, state, mesh, config=CONFIG)
    placed = place(state, shardings)
    compiled = step.lower(placed, local_batches[0]).compile()
    new_state, losses = train(compiled, placed, local_batches)
    return {
        "mesh": dict(mesh.shape),
        "losses": losses,
        "reference_losses": ref_losses,
        "state_max_rel_diff": max_rel_diff(local_copy(new_state), ref_state),
        "collectives": collectives(compiled.as_text()),
    }


def main():
    parser = argparse.ArgumentParser()
    sub = parser.add_subparsers(dest="mode", required=True)
    sub.add_parser("devices")
    sub.add_parser("vocab")
    proc = sub.add_parser("process")
    proc.add_argument("--process-id", type=int, required=True)
    proc.add_argument("--num-processes", type=int, required=True)
    proc.add_argument("--port", type=int, required=True)
    args = parser.parse_args()
    if args.mode == "devices":
        report = run_devices()
    elif args.mode == "vocab":
        report = run_vocab_devices()
    else:
        report = run_process(args.process_id, args.num_processes, args.port)
    print(json.dumps(report))


if __name__ == "__main__":
    main()
