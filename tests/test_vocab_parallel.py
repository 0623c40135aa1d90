"""Vocabulary parallelism: LM heads sharded over V across devices (``vocab_axis_name``).

The multi-device checks run in subprocesses with 8 simulated CPU devices (jax fixes its device
count once per process): ``vocab_parallel_worker.py`` for the loss itself (equality on 2 × 4 and
1 × 8 (data, model) meshes, compiled collectives, per-device memory, errors) and
``distributed_worker.py vocab`` for the 2-D training step. Argument errors that need no second
device run here, on a one-device mesh.
"""

from __future__ import annotations

import collections
import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from distill_setup import last_json_line, run_python
from helpers import make_problem
from jax.sharding import Mesh
from jax.sharding import PartitionSpec as P
from vocab_parallel_worker import EQUALITY_CASES

from jaxdistill import fused_linear_jsd_loss
from jaxdistill.training import DistillConfig
from pallas_kernels import default_row_kernel_config


@pytest.fixture(scope="module")
def loss_report():
    proc = run_python("tests/vocab_parallel_worker.py", devices=8, timeout=600)
    assert proc.returncode == 0, proc.stderr[-6000:]
    report = last_json_line(proc.stdout)
    assert report["devices"] == 8
    return report


@pytest.fixture(scope="module")
def training_report():
    proc = run_python("tests/distributed_worker.py", "vocab", devices=8, timeout=600)
    assert proc.returncode == 0, proc.stderr[-6000:]
    return last_json_line(proc.stdout)


@pytest.mark.parametrize("case", list(EQUALITY_CASES))
def test_sharded_loss_and_grads_equal_one_device(loss_report, case):
    """β ∈ {0, 0.5, 1} and traced, T = 2, soft 0.7 + hard 0.5, both biases, ignored rows (5 and 10
    valid tokens on the two data shards), both layouts of each head, both implementations: the
    loss and the student gradients equal the one-device call on the whole arrays, and the
    float64 reference; the teacher gets exactly zero gradient."""
    result = loss_report["equality"][case]
    assert result["loss_rel"] <= 1e-5, result["loss"]
    for name, rel in result["grad_rel"].items():
        assert rel <= 1e-5, name
    for name in ("teacher_hidden", "teacher_weight", "teacher_bias"):
        assert result[f"{name}_grad_max_abs"] == 0.0, name
    assert result["oracle_loss_rel"] <= 1e-5
    assert max(result["oracle_grad_rel"]) <= 1e-4


def _axis(groups, report) -> str:
    """ "model" or "data": the mesh axis whose device groups an all-reduce uses."""
    as_set = lambda gs: sorted(sorted(g) for g in gs)  # noqa: E731
    for axis in ("model", "data"):
        if as_set(groups) == as_set(report[f"{axis}_groups"]):
            return axis
    raise AssertionError(f"all-reduce over groups {groups}, neither the model nor the data axis")


PROGRAMS = [
    f"{impl}-beta{beta}-{what}"
    for impl, beta in (("xla", 0.5), ("xla", 0.0), ("xla", "traced"), ("pallas", 0.5))
    for what in ("value", "value_and_grad")
]


@pytest.mark.parametrize("program", PROGRAMS)
def test_compiled_loss_all_reduces_only_row_scalars(loss_report, program):
    """The compiled loss on the 2 × 4 mesh has no collective but all-reduces. Over the model axis:
    per chunk, only (chunk,) float32 row scalars (maxima, sums, target logit, JSD terms); once
    per call, the (rows, Hs) grad_x (plus the cotangent scalar where the axis is not
    type-checked). Over the data axis: scalars and the student head's shard gradients."""
    report = loss_report["hlo"]
    program_report = report["programs"][program]
    assert program_report["collectives"] == ["all-reduce"]
    chunk, rows, hidden = report["chunk"], report["rows_per_device"], report["hidden_student"]
    row_scalar, grad_x = f"f32[{chunk}]", f"f32[{rows},{hidden}]"
    weight_shard = "f32[{},{}]".format(*report["weight_shard"])
    bias_shard = "f32[{}]".format(*report["bias_shard"])
    shapes = collections.defaultdict(list)
    for all_reduce in program_report["all_reduces"]:
        where = "per_chunk" if not all_reduce["entry"] else "per_call"
        shapes[_axis(all_reduce["groups"], report), where] += all_reduce["shapes"]
    assert set(shapes[("model", "per_chunk")]) == {row_scalar}
    assert not shapes[("data", "per_chunk")]
    gradients = program.endswith("value_and_grad")
    assert shapes[("model", "per_call")].count(grad_x) == (1 if gradients else 0)
    assert set(shapes[("model", "per_call")]) <= {grad_x, "f32[]"}
    allowed_data = {"f32[]", "s32[]"} | ({weight_shard, bias_shard} if gradients else set())
    assert set(shapes[("data", "per_call")]) <= allowed_data
    if gradients:
        assert {weight_shard, bias_shard} <= set(shapes[("data", "per_call")])


def test_memory_per_device_falls_as_one_over_model_axis(loss_report):
    """At a fixed global problem (V = 4096, 64 rows, chunk 32), the compiled value-and-gradients'
    arguments (the head shards), outputs (the weight-gradient shard) and temporaries (the
    float32 grad_W accumulator and the chunk logits) per device scale as 1/M, M = 1, 2, 4."""
    memory = loss_report["memory"]
    for kind in ("argument_bytes", "output_bytes", "temp_bytes"):
        one = memory["1"][kind]
        for model in (2, 4):
            ratio = memory[str(model)][kind] / one
            assert ratio <= 1 / model + 0.02, (kind, model, ratio)


def test_vocab_not_a_multiple_of_the_model_axis_is_a_clear_error(loss_report):
    for key in ("vocab_not_multiple", "shardings_vocab_not_multiple"):
        error = loss_report["errors"][key]
        assert error is not None and error["type"] == "ValueError", key
        assert "`vocab_axis_name` 'model'" in error["message"] and "pad" in error["message"], error


def test_labels_are_global_ids(loss_report):
    """The last column of the last shard is a valid label; a label at V makes the loss NaN."""
    errors = loss_report["errors"]
    assert np.isfinite(errors["loss_label_last_column"])
    assert np.isnan(errors["loss_label_past_vocab"])


@pytest.mark.parametrize("mesh", ["2x4", "1x8"])
def test_vocab_parallel_step_trains_like_one_device(training_report, mesh):
    """50 Adam steps of make_vocab_parallel_step give the one-device step's loss curve; the heads
    (a tied embedding and its bias, an untied kernel and bias) and the Adam moments of the
    student's stay split over V, everything else replicated; the compiled step has no
    collective but all-reduces (no gathered head, not even for the tied embedding lookup)."""
    result, reference = training_report[mesh], training_report["reference_losses"]
    assert len(result["losses"]) == training_report["steps"] == 50
    assert result["losses"] == pytest.approx(reference, rel=1e-5)
    assert np.mean(reference[-10:]) < np.mean(reference[:10]) - 0.05  # it trains
    assert result["state_max_rel_diff"] < 1e-4
    assert result["collectives"] == ["all-reduce"]
    shards = int(mesh.split("x")[1])
    heads = result["heads"]
    for name in ("student_embedding", "adam_mu_embedding"):
        assert heads[name] == {"spec": ["model", None], "shard_shape": [96 // shards, 16]}, name
    assert heads["teacher_kernel"] == {"spec": [None, "model"], "shard_shape": [24, 96 // shards]}
    for name in ("student_head_bias", "teacher_bias"):
        assert heads[name] == {"spec": ["model"], "shard_shape": [96 // shards]}, name
    assert heads["position_embedding"]["spec"] == []


def test_vocab_parallel_step_runs_the_pallas_path(training_report):
    """implementation="pallas" (fused logits kernel, interpret mode) through the 2-D step builder."""
    losses = training_report["2x4-pallas"]["losses"]
    assert losses == pytest.approx(training_report["reference_losses"][: len(losses)], rel=1e-5)


def _one_device_map(fn, out_specs=None):
    """``fn`` in shard_map over a one-device "model" axis, arguments replicated (check_vma=True)."""
    mesh = Mesh(np.asarray(jax.devices()[:1]), ("model",))
    return jax.shard_map(fn, mesh=mesh, in_specs=P(), out_specs=P() if out_specs is None else out_specs)


@pytest.fixture(scope="module")
def small():
    p = make_problem(n=12, hs=16, ht=16, vocab=48)
    return p.student_hidden, p.student_weight, p.teacher_hidden, p.teacher_weight, p.labels


def test_one_shard_equals_the_plain_call(small):
    """A model axis of size 1: the vocabulary-parallel path is the plain loss."""
    options = dict(beta=0.5, temperature=2.0, hard_weight=0.5, chunk_size=5, implementation="xla")
    plain = fused_linear_jsd_loss(*small, **options)
    sharded = _one_device_map(lambda *a: fused_linear_jsd_loss(*a, vocab_axis_name="model", **options))(*small)
    assert float(sharded) == pytest.approx(float(plain), rel=1e-6)


@pytest.mark.parametrize(
    ("options", "error", "match"),
    [
        (dict(vocab_axis_name=("model",)), TypeError, "`vocab_axis_name` must be None or a mesh axis name"),
        (dict(vocab_axis_name="vocab"), ValueError, "`vocab_axis_name` 'vocab' is not a mapped axis here"),
        (dict(vocab_axis_name="model", axis_name="model"), ValueError, "`vocab_axis_name` and `axis_name`"),
        (
            dict(
                vocab_axis_name="model", implementation="pallas", kernel_config=default_row_kernel_config(48, "float32")
            ),
            ValueError,
            "`kernel_config` configures the row kernel",
        ),
    ],
    ids=["not-a-string", "unbound", "same-as-axis_name", "row-kernel-config"],
)
def test_bad_vocab_axis_name_is_a_clear_error(small, options, error, match):
    with pytest.raises(error, match=match):
        _one_device_map(lambda *a: fused_linear_jsd_loss(*a, **options))(*small)


def test_outside_shard_map_names_the_fix(small):
    with pytest.raises(ValueError, match="inside jax.shard_map"):
        fused_linear_jsd_loss(*small, vocab_axis_name="model")


def test_reference_config_refuses_vocab_axis(small):
    xs, ws, xt, wt, labels = small
    from jaxdistill.heads import LMHead

    with pytest.raises(ValueError, match="does not apply to the reference"):
        DistillConfig(reference=True).head_loss(xs, LMHead(ws), xt, LMHead(wt), labels, vocab_axis_name="model")


def test_bench_vocab_parallel_tiny(tmp_path):
    """``python -m bench.multi_gpu --vocab-parallel --tiny`` on 8 simulated devices: runs each
    (data × model) layout, agrees with the replicated one-device step, reports per-device memory
    and the compiled all-reduces (no all-gather), writes JSON."""
    proc = run_python(
        "-m", "bench.multi_gpu", "--vocab-parallel", "--tiny", "--out", str(tmp_path), devices=8, timeout=600
    )
    assert proc.returncode == 0, proc.stderr[-6000:]
    result = json.loads((tmp_path / "multi_gpu_vocab.json").read_text())
    rows = {row["variant"]: row for row in result["rows"]}
    assert set(rows) == {"1-device", "model=2", "model=4"}
    for name in ("model=2", "model=4"):
        row = rows[name]
        assert row["matches_1_device"], row
        assert row["collectives"] == ["all-reduce"], row
        assert row["model_axis_all_reduces"]["per_chunk_shapes"], row
    assert rows["model=4"]["memory"]["argument_bytes"] < rows["model=2"]["memory"]["argument_bytes"]
    assert "median ms" in proc.stdout


@pytest.mark.parametrize("implementation", ["xla", "pallas"])
def test_padding_the_vocabulary_with_minus_inf_bias_columns_changes_nothing(implementation):
    """The padding the error message asks for: zero weight columns whose bias is −inf, on both
    heads, give the unpadded loss and gradients through the vocabulary-parallel path (a model
    axis of one device here), and the padded columns get zero gradient."""
    vocab, padded = 45, 48
    p = make_problem(n=12, hs=16, ht=16, vocab=vocab)
    pad = lambda w: jnp.pad(w, ((0, 0), (0, padded - vocab)))  # noqa: E731
    pad_bias = lambda b: jnp.pad(b, (0, padded - vocab), constant_values=-jnp.inf)  # noqa: E731
    options = dict(beta=0.5, temperature=2.0, hard_weight=0.5, chunk_size=5)

    def value_and_grads(ws, bs, wt, bt, **vocab_options):
        def loss(xs, ws, bs):
            return fused_linear_jsd_loss(
                xs, ws, p.teacher_hidden, wt, p.labels, student_bias=bs, teacher_bias=bt, **options, **vocab_options
            )

        return jax.value_and_grad(loss, argnums=(0, 1, 2))(p.student_hidden, ws, bs)

    loss, grads = value_and_grads(p.student_weight, p.student_bias, p.teacher_weight, p.teacher_bias)
    sharded = _one_device_map(
        lambda *a: value_and_grads(*a, vocab_axis_name="model", implementation=implementation),
        out_specs=(P(), (P(), P(), P())),
    )
    padded_loss, padded_grads = sharded(
        pad(p.student_weight), pad_bias(p.student_bias), pad(p.teacher_weight), pad_bias(p.teacher_bias)
    )
    assert float(padded_loss) == pytest.approx(float(loss), rel=1e-6)
    np.testing.assert_allclose(padded_grads[0], grads[0], rtol=1e-5, atol=1e-7)
    np.testing.assert_allclose(padded_grads[1][:, :vocab], grads[1], rtol=1e-5, atol=1e-7)
    np.testing.assert_allclose(padded_grads[2][:vocab], grads[2], rtol=1e-5, atol=1e-7)
    assert not np.any(padded_grads[1][:, vocab:]) and not np.any(padded_grads[2][vocab:])
