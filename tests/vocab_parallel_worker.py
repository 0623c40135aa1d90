"""Worker of test_vocab_parallel.py (run with 8 simulated CPU devices): prints one JSON line.

``python tests/vocab_parallel_worker.py SECTION...``, sections:

* ``equality``: the loss and its gradients with the vocabulary sharded over a 2 × 4 and a
  1 × 8 (data, model) mesh, against the one-device call on the whole arrays and the float64
  reference; both implementations, both weight layouts of each head, β ∈ {0, 0.5, 1} and a traced β.
* ``hlo``: every all-reduce (shapes, device groups, whether per chunk) and the collectives of
  the compiled loss, value-only and value-and-gradients.
* ``memory``: ``memory_analysis()`` of the compiled value-and-gradients on (1, M) meshes,
  M = 1, 2, 4, at a fixed global vocabulary.
* ``errors``: a vocabulary the model axis does not divide; a label past the global vocabulary.
"""

from __future__ import annotations

import functools
import json
import sys

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from helpers import Problem, make_problem, oracle64, relative_error
from jax.sharding import Mesh
from jax.sharding import PartitionSpec as P

from bench.multi_gpu import all_reduces, collectives
from jaxdistill import fused_linear_jsd_loss
from jaxdistill.heads import LMHead
from jaxdistill.training import DistillConfig, vocab_parallel_head_loss, vocab_parallel_shardings

jax.config.update("jax_default_matmul_precision", "highest")

DATA, MODEL = "data", "model"
N, HS, HT, VOCAB, CHUNK = 24, 16, 12, 96, 5  # 12 rows per data shard: 3 chunks, the last ragged
# Ignored rows: 7 of the first data shard's 12 rows, 2 of the second's (5 and 10 valid tokens).
IGNORED_ROWS = [0, 2, 3, 5, 8, 9, 11, 14, 20]
OPTIONS = dict(temperature=2.0, soft_weight=0.7, hard_weight=0.5, chunk_size=CHUNK)
TRACED_BETA = 0.3


def arrays(layouts, *, n=N, hs=HS, ht=HT, vocab=VOCAB, seed=1):
    """(xs, ws, bs, xt, wt, bt, labels): biases on both heads, weights in ``layouts`` (student, teacher)."""
    p = make_problem(n=n, hs=hs, ht=ht, vocab=vocab, ignored_fraction=0.0, seed=seed)
    ignored = np.isin(np.arange(n), IGNORED_ROWS)
    labels = jnp.where(ignored, -100, p.labels)
    ws = p.student_weight if layouts[0] == "hv" else p.student_weight.T
    wt = p.teacher_weight if layouts[1] == "hv" else p.teacher_weight.T
    return p.student_hidden, ws, p.student_bias, p.teacher_hidden, wt, p.teacher_bias, labels


def weight_spec(layout):
    return P(None, MODEL) if layout == "hv" else P(MODEL, None)


def make_loss(beta_value, layouts, implementation, **axes):
    """loss(beta, xs, ws, bs, xt, wt, bt, labels); ``beta`` is used only when ``beta_value`` is None (traced)."""

    def loss(beta, xs, ws, bs, xt, wt, bt, labels):
        return fused_linear_jsd_loss(
            xs,
            ws,
            xt,
            wt,
            labels,
            student_bias=bs,
            teacher_bias=bt,
            beta=beta if beta_value is None else beta_value,
            student_weight_layout=layouts[0],
            teacher_weight_layout=layouts[1],
            implementation=implementation,
            **OPTIONS,
            **axes,
        )

    return loss


def sharded_loss(mesh, beta_value, layouts, implementation, *, check_vma):
    """The global loss: shard_map over (data, model), the heads split over V, the loss psum-ed over data."""
    local = make_loss(beta_value, layouts, implementation, axis_name=DATA, vocab_axis_name=MODEL)
    specs = (P(), P(DATA), weight_spec(layouts[0]), P(MODEL), P(DATA), weight_spec(layouts[1]), P(MODEL), P(DATA))
    return jax.shard_map(
        lambda *a: jax.lax.psum(local(*a), DATA), mesh=mesh, in_specs=specs, out_specs=P(), check_vma=check_vma
    )


def inside_grads(mesh, beta_value, layouts, implementation):
    """Gradients taken inside shard_map(check_vma=True): out_specs that omit the model axis for grad_x
    (and the data axis for the head gradients) hold only if those values are invariant there."""
    local = make_loss(beta_value, layouts, implementation, axis_name=DATA, vocab_axis_name=MODEL)

    def per_device(*a):
        share, grads = jax.value_and_grad(local, argnums=(1, 2, 3, 4, 5, 6))(*a)
        return jax.lax.psum(share, DATA), grads

    specs = (P(), P(DATA), weight_spec(layouts[0]), P(MODEL), P(DATA), weight_spec(layouts[1]), P(MODEL), P(DATA))
    return jax.shard_map(per_device, mesh=mesh, in_specs=specs, out_specs=(P(), specs[1:-1]), check_vma=True)


def mesh_of(data, model, devices=None):
    devices = jax.devices()[: data * model] if devices is None else devices
    return Mesh(np.asarray(devices).reshape(data, model), (DATA, MODEL))


GRAD_NAMES = ("student_hidden", "student_weight", "student_bias", "teacher_hidden", "teacher_weight", "teacher_bias")


@functools.cache
def whole_oracle64(beta):
    """The float64 reference of the whole arrays (hv layouts), computed once per β."""
    xs, ws, bs, xt, wt, bt, labels = arrays(("hv", "hv"))
    options = dict(OPTIONS, beta=beta)
    del options["chunk_size"]
    return oracle64(Problem(xs, ws, xt, wt, labels, bs, bt), **options)


def equality_case(mesh, beta, layouts, implementation, *, check_vma=True, inside=False):
    traced = beta == "traced"
    beta_value = None if traced else beta
    beta_arg = jnp.float32(TRACED_BETA if traced else 0.0)
    args = arrays(layouts)
    argnums = (1, 2, 3, 4, 5, 6)
    one = make_loss(beta_value, layouts, implementation)
    want_loss, want_grads = jax.jit(jax.value_and_grad(one, argnums=argnums))(beta_arg, *args)
    if inside:
        got_loss, got_grads = jax.jit(inside_grads(mesh, beta_value, layouts, implementation))(beta_arg, *args)
    else:
        loss = sharded_loss(mesh, beta_value, layouts, implementation, check_vma=check_vma)
        got_loss, got_grads = jax.jit(jax.value_and_grad(loss, argnums=argnums))(beta_arg, *args)
    result = {
        "loss": [float(got_loss), float(want_loss)],
        "loss_rel": relative_error(got_loss, want_loss),
        "grad_rel": {},
    }
    for name, got, want in zip(GRAD_NAMES, got_grads, want_grads, strict=True):
        if name.startswith("teacher"):
            result[f"{name}_grad_max_abs"] = float(jnp.max(jnp.abs(got)))
        else:
            result["grad_rel"][name] = relative_error(got, want)
    ref_loss, ref_grads = whole_oracle64(TRACED_BETA if traced else beta)
    got_ws = got_grads[1] if layouts[0] == "hv" else got_grads[1].T
    result["oracle_loss_rel"] = relative_error(got_loss, ref_loss)
    result["oracle_grad_rel"] = [
        relative_error(got, ref) for got, ref in zip((got_grads[0], got_ws, got_grads[2]), ref_grads, strict=True)
    ]
    return result


def _equality_cases() -> dict:
    """{case id: equality_case keywords (mesh as "DxM")}: the test parametrizes over these ids."""
    cases = {}
    layout_pairs = {"s=hv,t=vh": ("hv", "vh"), "s=vh,t=hv": ("vh", "hv")}
    # Per implementation: every β on the 2 × 4 mesh and β = 0.5 on the 1 × 8 one, each head in
    # each layout twice over (which β meets which layout does not matter: the layout decides
    # only how a head's logits and gradient are contracted, β only the row statistics).
    runs = [("2x4", 0.0, "s=hv,t=vh"), ("2x4", 0.5, "s=vh,t=hv"), ("2x4", 1.0, "s=vh,t=hv"), ("1x8", 0.5, "s=hv,t=vh")]
    for impl in ("xla", "pallas"):
        check_vma = impl == "xla"  # JAX cannot interpret a Pallas call under check_vma=True
        for mesh, beta, lname in runs:
            cases[f"{impl}-{mesh}-beta{beta}-{lname}"] = dict(
                mesh=mesh, beta=beta, layouts=layout_pairs[lname], implementation=impl, check_vma=check_vma
            )
    base = dict(mesh="2x4", beta=0.5, layouts=("hv", "vh"), implementation="xla")
    cases["xla-2x4-traced_beta"] = dict(base, beta="traced")
    cases["xla-2x4-beta0.5-check_vma=False"] = dict(base, check_vma=False)
    for lname, layouts in layout_pairs.items():
        cases[f"xla-2x4-beta0.5-{lname}-grads_inside"] = dict(base, layouts=layouts, inside=True)
    return cases


EQUALITY_CASES = _equality_cases()


def section_equality() -> dict:
    meshes = {"2x4": mesh_of(2, 4), "1x8": mesh_of(1, 8)}
    return {
        name: equality_case(meshes[case["mesh"]], **{k: v for k, v in case.items() if k != "mesh"})
        for name, case in EQUALITY_CASES.items()
    }


def hlo_report(compiled_text: str) -> dict:
    return {"collectives": collectives(compiled_text), "all_reduces": all_reduces(compiled_text)}


def section_hlo() -> dict:
    mesh = mesh_of(2, 4)
    layouts = ("hv", "vh")
    args = arrays(layouts)
    beta_arg = jnp.float32(0.0)
    report = {
        "model_groups": np.asarray([[d.id for d in row] for row in mesh.devices]).tolist(),
        "data_groups": np.asarray([[d.id for d in row] for row in mesh.devices]).T.tolist(),
        "rows_per_device": N // 2,
        "chunk": CHUNK,
        "hidden_student": HS,
        "weight_shard": [HS, VOCAB // 4],
        "bias_shard": [VOCAB // 4],
        "programs": {},
    }
    for impl, beta in (("xla", 0.5), ("xla", 0.0), ("xla", "traced"), ("pallas", 0.5)):
        beta_value = None if beta == "traced" else beta
        loss = sharded_loss(mesh, beta_value, layouts, impl, check_vma=impl == "xla")
        grads = jax.value_and_grad(loss, argnums=(1, 2, 3))
        for what, fn in (("value", loss), ("value_and_grad", grads)):
            text = jax.jit(fn).lower(beta_arg, *args).compile().as_text()
            report["programs"][f"{impl}-beta{beta}-{what}"] = hlo_report(text)
    return report


def section_memory() -> dict:
    """Per-device compiled sizes at a fixed global problem (V dominates: 4096 columns, 64 rows)."""
    n, hidden, vocab, chunk = 64, 16, 4096, 32
    layouts = ("hv", "hv")
    args = arrays(layouts, n=n, hs=hidden, ht=hidden, vocab=vocab)
    report = {}
    for model in (1, 2, 4):
        mesh = mesh_of(1, model)
        local = functools.partial(
            fused_linear_jsd_loss,
            beta=0.5,
            temperature=2.0,
            hard_weight=0.5,
            chunk_size=chunk,
            implementation="xla",
            axis_name=DATA,
            vocab_axis_name=MODEL,
        )

        def loss(xs, ws, bs, xt, wt, bt, labels, local=local):
            return local(xs, ws, xt, wt, labels, student_bias=bs, teacher_bias=bt)

        specs = (P(DATA), weight_spec("hv"), P(MODEL), P(DATA), weight_spec("hv"), P(MODEL), P(DATA))
        mapped = jax.shard_map(
            lambda *a, loss=loss: jax.lax.psum(loss(*a), DATA), mesh=mesh, in_specs=specs, out_specs=P()
        )
        compiled = jax.jit(jax.value_and_grad(mapped, argnums=(0, 1, 2))).lower(*args).compile()
        stats = compiled.memory_analysis()
        report[str(model)] = {
            "argument_bytes": int(stats.argument_size_in_bytes),
            "output_bytes": int(stats.output_size_in_bytes),
            "temp_bytes": int(stats.temp_size_in_bytes),
        }
    report["sizes"] = {"rows": n, "hidden": hidden, "vocab": vocab, "chunk": chunk}
    return report


def _error(fn) -> dict | None:
    try:
        fn()
    except Exception as e:  # noqa: BLE001 - reported to the test, which checks the type and message
        return {"type": type(e).__name__, "message": str(e)}
    return None


def section_errors() -> dict:
    mesh = mesh_of(2, 4)
    config = DistillConfig(beta=0.5, temperature=2.0, hard_weight=0.5, chunk_size=CHUNK)
    head_loss = vocab_parallel_head_loss(mesh, config=config)
    xs, ws, bs, xt, wt, bt, labels = arrays(("hv", "hv"), vocab=VOCAB + 2)  # 98 columns: not a multiple of 4
    report = {
        "vocab_not_multiple": _error(
            lambda: jax.jit(head_loss)(xs, LMHead(ws, bs), xt, LMHead(wt, bt), labels % VOCAB)
        ),
    }
    # Labels are global ids: V − 1 (held by the last shard) is valid, V makes the loss NaN.
    xs, ws, bs, xt, wt, bt, labels = arrays(("hv", "hv"))
    fn = jax.jit(head_loss)
    last = fn(xs, LMHead(ws, bs), xt, LMHead(wt, bt), labels.at[1].set(VOCAB - 1))[0]
    past = fn(xs, LMHead(ws, bs), xt, LMHead(wt, bt), labels.at[1].set(VOCAB))[0]
    report["loss_label_last_column"] = float(last)
    report["loss_label_past_vocab"] = float(past)
    # The step builder's shardings: a 97-token model on the 4-device model axis.
    from distill_setup import make_models

    graphdef, state = nnx.split(make_models(vocab=VOCAB + 1))
    report["shardings_vocab_not_multiple"] = _error(lambda: vocab_parallel_shardings(graphdef, state, mesh))
    return report


SECTIONS = {"equality": section_equality, "hlo": section_hlo, "memory": section_memory, "errors": section_errors}


def main():
    names = sys.argv[1:] or list(SECTIONS)
    report = {"devices": jax.device_count()}
    for name in names:
        report[name] = SECTIONS[name]()
    print(json.dumps(report))


if __name__ == "__main__":
    main()
