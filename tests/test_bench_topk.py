"""The benchmark's offline-teacher (top-k) rows and the top-k selection timing script, at tiny sizes."""

import functools
import json
import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax import lax

import jaxdistill
from bench import report, suite, topk_select
from bench.__main__ import Runner, build_cases, build_parser, run_cases
from bench.cases import (
    BETA_FREE_IMPLEMENTATIONS,
    IMPLEMENTATIONS,
    PRESETS,
    TOPK_IMPLEMENTATIONS,
    Case,
    Problem,
)
from tests.test_bench import synthetic_row


def tiny_problem(n=64, **overrides):
    preset = PRESETS["tiny"]
    return Problem("tiny", n, preset.hidden_teacher, preset.hidden_student, preset.vocab, **overrides)


def test_impl_topk_selects_the_offline_teacher_rows_floors_first():
    def impls(*names):
        args = build_parser().parse_args(["--out", "x", "--preset", "tiny:64", *names])
        return [c.impl for c in build_cases(args)]

    assert impls() == list(IMPLEMENTATIONS)  # the default: the dense rows, no top-k row
    assert (
        impls("--impl", "topk")
        == list(TOPK_IMPLEMENTATIONS)
        == [
            "matmul-floor-student",
            "matmul-teacher-logits",
            "teacher-topk",
            "topk-k=16-xla",
            "topk-k=16-pallas",
            "topk-k=64-xla",
            "topk-k=64-pallas",
            "topk-k=256-xla",
            "topk-k=256-pallas",
        ]
    )
    assert impls("--impl", "topk-k=64-pallas", "topk", "pallas", "xla")[:3] == ["xla", "pallas", "matmul-floor-student"]
    help_text = " ".join(build_parser().format_help().split())
    assert "`topk` stands for the 9 offline-teacher rows" in help_text and "no top-k row" in help_text
    # Their programs do not depend on β: they compile outside the run-wide cache.
    runner = Runner(None, time_budget=None, case_timeout=1.0, compilation_cache_dir="cache")
    for impl in TOPK_IMPLEMENTATIONS:
        cached = "JAX_COMPILATION_CACHE_DIR" in runner.worker_env(Case(tiny_problem(), impl))
        assert cached is (impl not in BETA_FREE_IMPLEMENTATIONS), impl
    assert tiny_problem(n=10).flops("topk-k=16-xla") == 2 * 10 * 1000 * 3 * 32
    assert tiny_problem(n=10).flops("teacher-topk") == 2 * 10 * 1000 * 64


def test_topk_rows_read_the_cache_of_the_dense_rows_teacher(monkeypatch):
    monkeypatch.setattr(suite, "make_inputs", functools.cache(suite.make_inputs))  # one draw, compiled once
    problem = tiny_problem(n=40, chunk_size=16, temperature=2.0)
    inputs = suite.case_inputs(Case(problem, "topk-k=16-pallas"))
    assert set(inputs) == {"student_hidden", "student_weight", "teacher_ids", "teacher_logprobs", "labels"}
    dense = suite.make_inputs(problem)
    cache = jaxdistill.teacher_topk(dense["teacher_hidden"], dense["teacher_weight"], 16, temperature=2.0)
    np.testing.assert_array_equal(inputs["teacher_ids"], cache.ids)
    np.testing.assert_array_equal(inputs["teacher_logprobs"], cache.logprobs)
    for name in ("student_hidden", "student_weight", "labels"):
        np.testing.assert_array_equal(inputs[name], dense[name])
    assert set(suite.case_inputs(Case(problem, "teacher-topk"))) == {"teacher_hidden", "teacher_weight"}
    assert set(suite.case_inputs(Case(problem, "matmul-floor-student"))) == {
        "student_hidden",
        "student_weight",
        "labels",
    }


def test_top_k_floors_are_their_dots_in_the_scan_over_chunks():
    problem = tiny_problem(n=50, dtype="float32", chunk_size=16)
    inputs = suite.make_inputs(problem)
    dots = lambda fn, args: len(re.findall(r"\bdot\(", jax.jit(fn).lower(*args).compile().as_text()))  # noqa: E731

    vg, fwd, args, fwd_args = suite.case_fns(Case(problem, "matmul-floor-student"), inputs)
    assert len(args) == 2 and dots(vg, args) == 3 and dots(fwd, fwd_args) == 1
    x_s, w_s = (np.asarray(a, np.float64) for a in args)
    z = x_s @ w_s
    grad_x, grad_w = vg(*args)
    np.testing.assert_allclose(grad_x, z @ w_s.T, rtol=1e-5, atol=1e-5 * np.abs(z @ w_s.T).max())
    np.testing.assert_allclose(grad_w, x_s.T @ z, rtol=1e-5, atol=1e-5 * np.abs(x_s.T @ z).max())

    logits, fwd, args, _ = suite.case_fns(Case(problem, "matmul-teacher-logits"), inputs)
    compiled = jax.jit(logits).lower(*args).compile().as_text()
    # One dot, in the loop, writing the carried logits in place (no copy of a chunk's logits).
    assert fwd is None and dots(logits, args) == 1 and "while" in compiled
    assert re.search(r"f32\[16,1000\]\{1,0\} copy\(", compiled) is None
    x_t, w_t = (np.asarray(a, np.float64) for a in args)
    last_chunk = np.pad(x_t, ((0, 14), (0, 0)))[48:]  # rows 48..63 of the zero-padded rows: the fourth chunk
    np.testing.assert_allclose(logits(*args), last_chunk @ w_t, rtol=1e-5, atol=1e-5)


class InProcessRunner:
    """The driver's runner, each case measured in this process (no worker start-up)."""

    def run(self, case):
        return suite.run_case(case)


def test_topk_rows_run_and_report_their_own_floor(tmp_path):
    impls = ["matmul-floor-student", "matmul-teacher-logits", "topk-k=16-pallas"]
    cases = [Case(tiny_problem(), impl, warmup=1, iters=10) for impl in impls]
    assert run_cases(cases, InProcessRunner(), tmp_path, {"date": "2026-12-02T00:00:00+00:00", "git_sha": "abc"})
    rows = {r["impl"]: r for r in report.read_rows(tmp_path)}
    assert list(rows) == impls and all(r["status"] == "ok" for r in rows.values()), rows
    floor, teacher, loss = (rows[i] for i in impls)
    assert floor["ratio_to_own_floor"] == 1.0 and teacher["ratio_to_own_floor"] == 1.0
    assert loss["ratio_to_own_floor"] == loss["vg_ms"]["median"] / floor["vg_ms"]["median"]
    assert teacher["fwd_ms"] is None and floor["fwd_ms"]["median"] > 0 and loss["fwd_ms"]["median"] > 0
    assert loss["loss"] > 0 and "note" in loss["errors"] and loss["interpret"] is (jax.default_backend() != "gpu")
    flops = tiny_problem().flops("matmul-teacher-logits")
    assert teacher["tflops"] == pytest.approx(flops / teacher["vg_ms"]["median"] / 1e9)
    table = (tmp_path / report.TABLE_FILE).read_text()
    assert "| × chunked | × own floor |" in table and "Top-k rows (offline teacher)" in table
    pallas = re.escape("topk-k=16-pallas" + ("" if jax.default_backend() == "gpu" else " (interpret)"))
    ms = r"[\d.]+ \([\d.–]+\)"
    assert re.search(rf"\| tiny \| 64 \| {pallas} \| ok \| {ms} \| [\d.]+ \|  \|  \| [\d.]+ \|", table)
    assert re.search(rf"\| tiny \| 64 \| matmul-teacher-logits \| ok \| {ms} \|  \|  \|  \| 1.00 \|", table)


def test_markdown_gives_the_top_k_targets():
    rows = [
        synthetic_row("llama", 8192, "matmul-floor-student", ms=20.0),
        synthetic_row("llama", 8192, "matmul-teacher-logits", ms=14.0),
        {**synthetic_row("llama", 8192, "teacher-topk", ms=21.0), "fwd_ms": None},
        synthetic_row("llama", 8192, "topk-k=64-xla", ms=24.0),
        synthetic_row("llama", 8192, "topk-k=64-pallas", ms=22.0),
        synthetic_row("llama", 8192, "topk-k=256-pallas", ms=26.0),
    ]
    text = report.markdown(rows)
    assert "| llama | 8192 | topk-k=64-pallas | ok | 22.00 (19.80–26.40) | 11.00 |  |  | 1.10 |" in text
    assert "| llama | 8192 | teacher-topk | ok | 21.00 (18.90–25.20) |  |  |  | 1.50 |" in text
    assert "| llama | 8192 | topk-k=256-pallas | ok | 26.00 (23.40–31.20) | 13.00 |  |  | 1.30 |" in text
    assert text.splitlines()[-3:] == [
        "- llama, N = 8192: topk-k=64-xla / matmul-floor-student = 1.200 (target ≤ 1.15: not met)",
        "- llama, N = 8192: topk-k=64-pallas / matmul-floor-student = 1.100 (target ≤ 1.15: met)",
        "- llama, N = 8192: teacher-topk / matmul-teacher-logits = 1.500 (target ≤ 1.1: not met)",
    ]
    assert "Top-k" not in report.markdown([synthetic_row("llama", 8192, "xla")])


# ---------------------------------------------------------------------------------------------
# bench.topk_select


def test_two_stage_top_k_equals_lax_top_k_with_ties_and_padding():
    rng = np.random.default_rng(0)
    z = rng.integers(-4, 5, size=(9, 101)).astype(np.float32)  # many ties
    z[0, :] = -np.inf
    z[1, ::3] = -np.inf
    z[2, 50:] = np.inf
    for groups, k in ((1, 6), (7, 1), (7, 6), (16, 6)):  # 101 columns: the last group padded at G = 7 and 16
        want = lax.top_k(jnp.asarray(z), k)
        got = topk_select.two_stage_top_k(jnp.asarray(z), k, groups)
        assert topk_select.same_top_k(got, want), (groups, k)
    with pytest.raises(ValueError, match="smaller than k"):
        topk_select.two_stage_top_k(jnp.asarray(z), 16, 16)


def test_topk_select_tiny_run_checks_the_two_stage_results(tmp_path, monkeypatch):
    """The CPU smoke run: every row timed, the two-stage results compared with lax.top_k's. One of
    them is made wrong here (G = 64, ids off by one): the run says so and exits with status 1."""
    exact = topk_select.two_stage_top_k

    def wrong_at_64(z, k, groups):
        values, ids = exact(z, k, groups)
        return (values, ids + 1) if groups == 64 else (values, ids)

    monkeypatch.setattr(topk_select, "two_stage_top_k", wrong_at_64)
    argv = ["--tiny", "--out", str(tmp_path), "--iters", "2", "--git-sha", "cafe"]
    assert topk_select.main(argv) == 1
    result = json.loads((tmp_path / "topk_select.json").read_text())
    assert result["git_sha"] == "cafe" and result["jax_version"] == jax.__version__ and not result["exact"]
    assert result["config"] | {"hidden": 64, "vocab": 1000, "rows": 64, "k": 8} == result["config"]
    rows = {row["name"]: row for row in result["rows"]}
    assert list(rows)[:8] == [
        "matmul",
        "top_k",
        "two-stage G=4",
        "two-stage G=16",
        "two-stage G=64",
        "approx_max_k",
        "exact_top_k tile=32",  # 32 tiles of 32 > k = 8: the library's two levels, not its fallback
        "teacher_topk",
    ]
    assert [rows[f"two-stage G={g}"]["equal_to_top_k"] for g in (4, 16, 64)] == [True, True, False]
    assert rows["exact_top_k tile=32"]["equal_to_top_k"]
    assert rows["matmul"]["x_matmul"] == 1.0 and rows["teacher_topk"]["x_matmul"] > 0
    [(name, chunk)] = [(name, row) for name, row in rows.items() if name.startswith("chunk two-stage")]
    assert name in ("chunk two-stage G=4", "chunk two-stage G=16")  # the fastest exact one
    assert chunk["ids_equal_to_teacher_topk"] and chunk["max_logprob_diff"] < 1e-5
