"""Hardening: wide and unsigned labels, messages that name the argument and the fix, test-suite wording,
the README's NNX training example."""

import pathlib
import re
import tomllib

import conftest
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from helpers import make_problem

import jaxdistill
from jaxdistill import reference

LOSSES = {
    "fused-xla": lambda *a, **k: jaxdistill.fused_linear_jsd_loss(*a, implementation="xla", chunk_size=4, **k),
    "reference": reference.fused_linear_jsd_loss,
}


REPO_ROOT = pathlib.Path(__file__).resolve().parents[1]


def _arrays(p):
    return p.student_hidden, p.student_weight, p.teacher_hidden, p.teacher_weight


@pytest.mark.parametrize("loss_fn", LOSSES.values(), ids=LOSSES.keys())
def test_a_numpy_int64_label_outside_the_vocabulary_gives_nan_not_a_wrapped_label(loss_fn):
    # With x64 off, int64 → int32 narrowing keeps the low 32 bits: 2**32 + 3 would read as label 3.
    p = make_problem(n=6, vocab=10, ignored_fraction=0.0, bias=False)
    labels = np.array([0, 1, 2, 5, 7, 3], dtype=np.int64)
    assert np.isfinite(float(loss_fn(*_arrays(p), labels)))
    for bad in (2**32 + 3, -(2**32) + 3):
        labels[3] = bad
        assert np.isnan(float(loss_fn(*_arrays(p), labels))), bad


@pytest.mark.parametrize("loss_fn", LOSSES.values(), ids=LOSSES.keys())
def test_numpy_int64_labels_keep_their_ignored_rows(loss_fn):
    p = make_problem(n=6, vocab=10, ignored_fraction=0.0, bias=False)
    labels = np.array([0, 1, -100, 5, 7, 3], dtype=np.int64)
    expected = loss_fn(*_arrays(p), labels.astype(np.int32))
    np.testing.assert_allclose(float(loss_fn(*_arrays(p), labels)), float(expected), rtol=1e-6)
    # An ignore_index beyond int32 still matches exactly, and a label 2**32 - 100 is not ignored.
    huge = np.array([0, 1, 2**40, 5, 7, 3], dtype=np.int64)
    np.testing.assert_allclose(float(loss_fn(*_arrays(p), huge, ignore_index=2**40)), float(expected), rtol=1e-6)
    assert np.isnan(float(loss_fn(*_arrays(p), np.array([0, 1, 2**32 - 100, 5, 7, 3]))))


@pytest.mark.parametrize("loss_fn", LOSSES.values(), ids=LOSSES.keys())
def test_unsigned_jax_labels_match_their_int32_cast(loss_fn):
    p = make_problem(n=12, vocab=123, ignored_fraction=0.0, seed=4)

    @jax.jit
    def value_and_grads(y):
        def f(xs, ws, bs):
            return loss_fn(
                xs, ws, p.teacher_hidden, p.teacher_weight, y, student_bias=bs, hard_weight=0.5, return_aux=True
            )

        return jax.value_and_grad(f, argnums=(0, 1, 2), has_aux=True)(
            p.student_hidden, p.student_weight, p.student_bias
        )

    (expected, _), expected_grads = value_and_grads(p.labels.astype(jnp.int32))
    for dtype in (jnp.uint8, jnp.uint16, jnp.uint32):
        (got, aux), got_grads = value_and_grads(p.labels.astype(dtype))
        np.testing.assert_allclose(float(got), float(expected), rtol=1e-6)
        for g, e in zip(got_grads, expected_grads, strict=True):
            np.testing.assert_allclose(np.asarray(g), np.asarray(e), rtol=1e-6, atol=1e-7)
        # 0 is a token id, never "ignored"; a label ≥ V is out of range, however it is stored.
        assert int(value_and_grads(jnp.zeros((12,), dtype))[0][1]["num_valid_tokens"]) == 12
        for bad in (123, np.iinfo(dtype).max):
            (loss, _), grads = value_and_grads(p.labels.astype(dtype).at[5].set(bad))
            assert np.isnan(float(loss)) and bool(jnp.all(jnp.isnan(grads[1]))), (dtype, bad)


@pytest.mark.parametrize("loss_fn", LOSSES.values(), ids=LOSSES.keys())
def test_unsigned_numpy_labels_match_their_int32_cast(loss_fn):
    p = make_problem(n=6, vocab=10, ignored_fraction=0.0, bias=False)
    labels = np.array([0, 1, 9, 5, 9, 3])
    expected = float(loss_fn(*_arrays(p), labels.astype(np.int32)))
    for dtype in (np.uint8, np.uint64):
        np.testing.assert_allclose(float(loss_fn(*_arrays(p), labels.astype(dtype))), expected, rtol=1e-6)
    bad = labels.astype(np.uint64)
    bad[2] = 2**64 - 1 - 2**32 + 4  # low 32 bits: 3
    assert np.isnan(float(loss_fn(*_arrays(p), bad)))
    # A non-negative ignore_index applies to unsigned labels too.
    _, aux = loss_fn(*_arrays(p), labels.astype(np.uint16), ignore_index=9, return_aux=True)
    assert int(aux["num_valid_tokens"]) == 4


@pytest.mark.parametrize("loss_fn", LOSSES.values(), ids=LOSSES.keys())
@pytest.mark.parametrize("role", ["student", "teacher"])
def test_a_transposed_weight_error_suggests_the_layout(loss_fn, role):
    p = make_problem(n=6, hs=16, ht=24, vocab=100, bias=False)
    xs, ws, xt, wt = _arrays(p)
    if role == "student":
        ws = ws.T
    else:
        wt = wt.T
    with pytest.raises(ValueError, match=f'{role}_hidden.*{role}_weight_layout="vh"'):
        loss_fn(xs, ws, xt, wt, p.labels)
    # Given "vh" for an (H, V) weight, the message points back to the default.
    with pytest.raises(ValueError, match=f'{role}_weight_layout="hv"'):
        loss_fn(*_arrays(p), p.labels, **{f"{role}_weight_layout": "vh"})
    # When neither layout fits, no layout is suggested.
    with pytest.raises(ValueError, match=f"{role}_hidden") as error:
        loss_fn(*_arrays(p)[:2], jnp.ones((6, 7)), p.teacher_weight, p.labels) if role == "teacher" else loss_fn(
            jnp.ones((6, 7)), *_arrays(p)[1:], p.labels
        )
    assert "layout" not in str(error.value)


NOT_NUMBERS = {
    "string": "0.5",
    "bytes": b"0.5",
    "numpy-string": np.str_("0.5"),
    "bool": True,
    "none": None,
    "list": [0.5],
    "complex": 0.5 + 1j,
    "string-array": np.array("0.5"),
}


@pytest.mark.parametrize("loss_fn", LOSSES.values(), ids=LOSSES.keys())
@pytest.mark.parametrize("name", ["beta", "temperature", "soft_weight", "hard_weight"])
@pytest.mark.parametrize("value", NOT_NUMBERS.values(), ids=NOT_NUMBERS.keys())
def test_a_non_numeric_hyper_parameter_is_a_type_error_naming_it(loss_fn, name, value):
    p = make_problem(n=6, vocab=10, bias=False)
    with pytest.raises(TypeError, match=f"`{name}` must be a real number"):
        loss_fn(*_arrays(p), p.labels, **{name: value})


def test_numeric_hyper_parameters_of_every_kind_still_work():
    p = make_problem(n=6, vocab=10, bias=False)
    kinds = [
        dict(beta=1, temperature=2, soft_weight=1, hard_weight=0),  # Python ints
        dict(beta=np.float32(0.5), temperature=np.int64(1), soft_weight=jnp.float32(0.5), hard_weight=np.array(0.25)),
    ]
    for hyper in kinds:
        assert np.isfinite(float(LOSSES["fused-xla"](*_arrays(p), p.labels, **hyper))), hyper


@pytest.mark.parametrize("loss_fn", LOSSES.values(), ids=LOSSES.keys())
@pytest.mark.parametrize("labels", [[0, 1, 2, 3, 4, 5], (0, 1, 2, 3, 4, 5)], ids=["list", "tuple"])
def test_labels_as_a_python_sequence_is_a_type_error_saying_to_pass_an_array(loss_fn, labels):
    p = make_problem(n=6, vocab=10, bias=False)
    with pytest.raises(TypeError, match=r"`labels` must be an integer array.*got list|`labels`.*got tuple"):
        loss_fn(*_arrays(p), labels)
    with pytest.raises(TypeError, match="np.asarray"):
        loss_fn(*_arrays(p), labels)


def test_the_gpu_marker_and_its_skip_reason_name_the_requirement_only():
    ini = tomllib.loads((REPO_ROOT / "pyproject.toml").read_text())["tool"]["pytest"]["ini_options"]
    assert ini["markers"] == ["gpu: needs a CUDA GPU (skipped where none is present)"]

    class Item:
        markers = []

        def get_closest_marker(self, name):
            return name == "gpu"

        def add_marker(self, marker):
            self.markers.append(marker)

    item = Item()
    conftest.pytest_collection_modifyitems(None, [item])
    if jax.default_backend() != "gpu":
        assert [m.kwargs["reason"] for m in item.markers] == ["needs a CUDA GPU"]


def readme_block(heading: str) -> str:
    """The first ```python block after the line ``heading`` of README.md."""
    text = (REPO_ROOT / "README.md").read_text()
    start = text.index("\n" + heading + "\n")
    match = re.compile(r"```python\n(.*?)```", re.S).search(text, start)
    assert match is not None, heading
    return match.group(1)


def test_the_readme_nnx_training_example_runs(capsys):
    code = readme_block("## Training a student with Flax NNX (one device)")
    tiny = {  # the example's sizes → a few seconds on a CPU
        "V, L, B, STEPS = 32000, 256, 16, 1000": "V, L, B, STEPS = 97, 8, 2, 2",
        "1_000_000": "1_000",
        "d_model=1024, n_layers=12, n_heads=16, d_ff=4096": "d_model=24, n_layers=1, n_heads=2, d_ff=48",
        "d_model=512, n_layers=6, n_heads=8, d_ff=2048": "d_model=16, n_layers=1, n_heads=2, d_ff=32",
    }
    for size, small in tiny.items():
        assert code.count(size) == 1, size
        code = code.replace(size, small)
    namespace = {}
    exec(compile(code, "README.md", "exec"), namespace)
    metrics = namespace["metrics"]
    assert set(metrics) >= {"loss", "soft_loss", "hard_loss", "num_valid_tokens"}
    assert int(metrics["num_valid_tokens"]) == 2 * 8 and np.isfinite(float(metrics["loss"]))
    assert int(namespace["optimizer"].step[...]) == 2  # the loop ran its two optimizer steps
    assert capsys.readouterr().out.startswith("0 ")


@pytest.mark.parametrize(
    "loss_fn",
    [
        lambda p, **k: jaxdistill.fused_linear_jsd_loss(*_arrays(p), p.labels, **k),
        lambda p, **k: jaxdistill.fused_linear_topk_distill_loss(
            p.student_hidden,
            p.student_weight,
            *jaxdistill.teacher_topk(p.teacher_hidden, p.teacher_weight, 3),
            p.labels,
            **k,
        ),
    ],
    ids=["dense", "topk"],
)
@pytest.mark.parametrize("implementation", [None, "xla"])
def test_kernel_config_without_the_pallas_implementation_names_what_ran(loss_fn, implementation):
    """A kernel config outside the Pallas path is an error that says which implementation ran,
    and that None resolved to it on this backend."""
    from pallas_kernels import default_row_kernel_config

    p = make_problem(n=6, vocab=10, bias=False)
    config = default_row_kernel_config(10, "float32")
    resolved = "pallas" if jax.default_backend() == "gpu" else "xla"
    if implementation is None and resolved == "pallas":
        pytest.skip("implementation=None is the Pallas path on a GPU")
    with pytest.raises(ValueError, match="applies only to implementation='pallas'") as error:
        loss_fn(p, implementation=implementation, kernel_config=config)
    if implementation is None:
        assert f'resolved to "xla" on the {jax.default_backend()} backend' in str(error.value)
    else:
        assert "implementation='xla'" in str(error.value)
