"""The benchmark suite: the tiny preset end to end, and its parts on synthetic rows."""

import argparse
import dataclasses
import importlib.metadata
import json
import math
import re
import signal
import subprocess
import sys
import weakref
from pathlib import Path

import jax
import numpy as np
import pytest

import bench.__main__ as bench_main
import jaxdistill
from bench import common, multi_gpu, report, suite
from bench.__main__ import Runner, build_cases, build_parser, main, parse_preset
from bench.cases import FLOOR_IMPLEMENTATIONS, IMPLEMENTATIONS, PRESETS, Case, Preset, Problem, is_oom

REPO_ROOT = Path(__file__).resolve().parents[1]
PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"


def tiny_problem(n=64, **overrides):
    preset = PRESETS["tiny"]
    return Problem("tiny", n, preset.hidden_teacher, preset.hidden_student, preset.vocab, **overrides)


@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory):
    """``python -m bench --preset tiny --out DIR``, as a user (and the acceptance check) runs it."""
    out = tmp_path_factory.mktemp("bench-tiny")
    completed = subprocess.run(
        [sys.executable, "-m", "bench", "--preset", "tiny", "--out", str(out)],
        cwd=REPO_ROOT,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert completed.returncode == 0, completed.stdout + completed.stderr
    return out, completed.stdout, report.read_rows(out)


def test_tiny_rows_cover_every_implementation_and_size(tiny_run):
    _, _, rows = tiny_run
    expected = [(n, impl) for n in PRESETS["tiny"].sizes for impl in IMPLEMENTATIONS]
    assert [(r["config"]["n"], r["impl"]) for r in rows] == expected
    for row in rows:
        assert row["schema"] == 1 and row["date"] and "git_sha" in row
        assert row["config"]["preset"] == "tiny" and row["config"]["iters"] >= 10
        assert {"hidden_teacher", "hidden_student", "vocab", "dtype", "beta", "temperature"} <= set(row["config"])
        if row["impl"] == "liger":
            assert row["status"] in ("ok", "skipped"), row
            assert row["status"] == "ok" or row["reason"]
        else:
            assert row["status"] == "ok", row


def test_tiny_rows_hold_timings_memory_and_errors(tiny_run):
    _, _, rows = tiny_run
    ok = [r for r in rows if r["status"] == "ok"]
    for row in ok:
        assert row["env"]["device"] and row["env"]["jax"] == jax.__version__
        for key in ("vg_ms", "fwd_ms"):
            t = row[key]
            assert 0 < t["p10"] <= t["median"] <= t["p90"]
        assert row["compile_s"]["vg"] >= 0 and row["tflops"] > 0 and row["tokens_per_s"] > 0
        assert row["ratio_to_floor"] > 0
        if row["impl"] != "liger":
            assert row["memory"]["xla_temp_bytes"] > 0
    floors = [r for r in ok if r["impl"] == "matmul-floor"]
    assert floors and all(r["ratio_to_floor"] == 1.0 and "loss" not in r for r in floors)
    chunked = [r for r in ok if r["impl"] == "matmul-floor-chunked"]
    assert len(chunked) == len(floors) and all(r["ratio_to_chunked_floor"] == 1.0 and "loss" not in r for r in chunked)
    for row in ok:
        if row["impl"] in FLOOR_IMPLEMENTATIONS:
            continue
        errors = row["errors"]
        # bf16 inputs: gradients are rounded to bf16 (≤ 2^-9 relative each rounding; 1.6-1.8e-3
        # measured on this preset), the loss is float32.
        assert errors["loss_rel"] < 1e-5 and errors["grad_x_rel"] < 4e-3 and errors["grad_w_rel"] < 4e-3, row
        assert row["loss"] == pytest.approx(errors["reference_loss"], rel=1e-3)


def test_tiny_outputs_table_and_plots(tiny_run):
    out, stdout, rows = tiny_run
    table = (out / report.TABLE_FILE).read_text()
    pallas = "pallas" if jax.default_backend() == "gpu" else "pallas (interpret)"
    assert "| tiny | 64 | xla | ok |" in table and f"| tiny | 256 | {pallas} | ok |" in table
    assert "| tiny | 64 | matmul-floor-chunked | ok |" in table
    assert table.count("\n| tiny |") == len(rows)
    assert stdout.rstrip().endswith(table.rstrip().splitlines()[-1])  # the table is printed last
    for name in (report.TIME_PLOT_FILE, report.MEMORY_PLOT_FILE):
        assert (out / name).read_bytes()[:8] == PNG_SIGNATURE


def test_parse_preset():
    assert parse_preset("tiny") == ("tiny", None)
    assert parse_preset("llama:2048,8192") == ("llama", (2048, 8192))
    for bad in ("nope", "llama:2k", "gemma:0"):
        with pytest.raises(argparse.ArgumentTypeError, match="preset|N"):
            parse_preset(bad)


def test_cases_run_floor_first_in_given_preset_order():
    args = build_parser().parse_args(
        ["--out", "x", "--preset", "llama:8192,2048", "gemma:8192", "--impl", "liger", "xla", "matmul-floor"]
    )
    cases = build_cases(args)
    assert [(c.problem.preset, c.problem.n, c.impl) for c in cases] == [
        ("llama", 8192, "matmul-floor"),
        ("llama", 8192, "xla"),
        ("llama", 8192, "liger"),
        ("llama", 2048, "matmul-floor"),
        ("llama", 2048, "xla"),
        ("llama", 2048, "liger"),
        ("gemma", 8192, "matmul-floor"),
        ("gemma", 8192, "xla"),
        ("gemma", 8192, "liger"),
    ]
    gemma = cases[-1].problem
    assert (gemma.hidden_teacher, gemma.hidden_student, gemma.vocab) == (3840, 1152, 262144)
    assert Case.from_json(cases[0].to_json()) == cases[0]
    assert cases[0].problem.flops() == 2 * 8192 * 128256 * (4096 + 3 * 2048)


def test_zero_time_budget_gives_skipped_rows(tmp_path, capsys):
    assert main(["--preset", "tiny:64", "--out", str(tmp_path), "--time-budget", "0"]) == 0
    rows = report.read_rows(tmp_path)
    assert len(rows) == len(IMPLEMENTATIONS) and all(r["status"] == "skipped" for r in rows)
    assert all(r["reason"] == "time budget spent" for r in rows if r["impl"] != "liger")
    assert "| tiny | 64 | xla | skipped: time budget spent |" in capsys.readouterr().out


def test_case_timeout_kills_the_worker(tmp_path, monkeypatch):
    workers, real_popen = [], subprocess.Popen

    def popen(*args, **kwargs):
        workers.append(real_popen(*args, **kwargs))
        return workers[-1]

    monkeypatch.setattr(bench_main.subprocess, "Popen", popen)
    row = Runner(tmp_path, time_budget=None, case_timeout=0.2).run(Case(tiny_problem(), "xla"))
    assert row["status"] == "timeout"
    assert [w.returncode for w in workers] == [-signal.SIGKILL]


def test_planned_out_of_memory_is_a_row(monkeypatch):
    monkeypatch.setattr(suite, "memory_stats", lambda: {"bytes_limit": 1024, "bytes_in_use": 0})
    row = suite.run_case(Case(tiny_problem(), "reference"))
    assert row["status"] == "OOM" and "PlannedOOM" in row["reason"]


def test_forward_outputs_are_gone_before_value_and_grad_runs():
    """Each timed call starts with no earlier call's outputs alive (one (N, V) result at a time)."""

    class Output:
        def __init__(self, kind):
            self.kind = kind

    alive = weakref.WeakSet()
    seen = []  # (kind of call, kinds of outputs alive when it started)

    def call(kind):
        def run():
            seen.append((kind, sorted(o.kind for o in alive)))
            out = Output(kind)
            alive.add(out)
            return out

        return run

    fwd_s, vg_s, result = suite.time_forward_then_value_and_grad(
        call("fwd"), call("vg"), warmup=2, iters=3, sync=lambda out: None
    )
    assert (len(fwd_s), len(vg_s), result.kind) == (3, 3, "vg")
    assert [kind for kind, _ in seen] == ["fwd"] * 5 + ["vg"] * 5
    assert all(not others for _, others in seen), seen


@pytest.mark.parametrize("impl", ["matmul-floor", "matmul-floor-chunked", "xla"])
def test_jax_cases_are_timed_one_output_at_a_time(monkeypatch, impl):
    helper, calls = suite.time_forward_then_value_and_grad, []

    def spy(*args, **kwargs):
        calls.append(impl)
        return helper(*args, **kwargs)

    monkeypatch.setattr(suite, "time_forward_then_value_and_grad", spy)
    row = suite.run_case(Case(tiny_problem(), impl))
    assert row["status"] == "ok" and calls == [impl], row["reason"]


def test_kernel_sweep_runs_in_interpret_mode(tmp_path, monkeypatch):
    """The launch-config sweep: the default is measured once, a bad config is a row, the best is
    named; the JSON records the git sha (from the helper the bench rows use) and jaxlib."""
    from bench import kernel_sweep

    monkeypatch.setattr(common, "git_sha", lambda: "0123abc+dirty")

    argv = ["--out", str(tmp_path), "--interpret", "--rows", "3", "--vocab", "300", "--betas", "0.5"]
    argv += ["--block-v", "512,384", "--num-warps", "1", "--num-stages", "1", "--iters", "1", "--warmup", "0"]
    assert kernel_sweep.main(argv) == 0
    result = json.loads((tmp_path / "kernel_sweep.json").read_text())
    rows = {(r["impl"], r.get("block_v")): r for r in result["rows"]}
    assert len(rows) == len(result["rows"]) == 3  # xla, the default (512, 1, 1) once, and 384
    assert rows[("pallas-default", 512)]["max_err_dlogits"] < 1e-5
    assert "power of 2" in rows[("pallas", 384)]["error"]
    assert result["best_config"] == {"impl": "pallas-default", "block_v": 512, "num_warps": 1, "num_stages": 1}
    assert (result["git_sha"], result["jax_version"]) == ("0123abc+dirty", jax.__version__)
    assert result["jaxlib_version"] == importlib.metadata.version("jaxlib")


def test_is_oom():
    assert is_oom("XlaRuntimeError: RESOURCE_EXHAUSTED: Out of memory while trying to allocate")
    assert is_oom("torch.OutOfMemoryError: CUDA out of memory.")
    assert not is_oom(ValueError("bad shape"))


def test_inputs_are_deterministic_and_drawn_in_slabs(monkeypatch):
    monkeypatch.setattr(suite, "SLAB_ELEMENTS", 3000)  # several slabs and a ragged tail
    problem = tiny_problem(n=50, ignore_fraction=0.2, seed=3)
    a, b = suite.make_inputs(problem, with_dlogits=True), suite.make_inputs(problem, with_dlogits=True)
    assert {k: v.shape for k, v in a.items()} == {
        "student_hidden": (50, 32),
        "student_weight": (32, 1000),
        "teacher_hidden": (50, 64),
        "teacher_weight": (64, 1000),
        "dlogits": (50, 1000),
        "labels": (50,),
    }
    for key in a:
        np.testing.assert_array_equal(np.asarray(a[key]), np.asarray(b[key]))
    weight = np.asarray(a["student_weight"], np.float32)
    assert len(np.unique(weight[:, :8], axis=0)) == 32  # slabs differ from each other
    assert weight.std() == pytest.approx(suite.LOGIT_STD / np.sqrt(32), rel=0.1)
    labels = np.asarray(a["labels"])
    assert ((labels == -100) | ((labels >= 0) & (labels < 1000))).all() and (labels == -100).any()


def synthetic_row(preset, n, impl, status="ok", ms=1.0, extra=None, reason=None):
    row = {
        "schema": 1,
        "date": "2026-11-28T00:00:00+00:00",
        "git_sha": "abc",
        "impl": impl,
        "status": status,
        "reason": reason,
        "config": {**dataclasses.asdict(tiny_problem(n)), "preset": preset, "warmup": 2, "iters": 10},
        "env": {"device": "NVIDIA H200", "backend": "gpu", "jax": "0.11.2"},
        "memory": {} if extra is None else {"extra_bytes": extra, "xla_temp_bytes": extra // 2},
        "errors": {},
    }
    if status == "ok":
        row.update(
            vg_ms={"median": ms, "p10": 0.9 * ms, "p90": 1.2 * ms},
            fwd_ms={"median": ms / 2, "p10": ms / 3, "p90": ms},
            compile_s={"vg": 1.5, "fwd": None},
            tflops=500.0,
            tokens_per_s=1e6,
        )
    return row


def test_markdown_and_plots_from_rows(tmp_path):
    rows = [
        synthetic_row("llama", 2048, "matmul-floor", ms=8.0, extra=3 * 10**9),
        synthetic_row("llama", 2048, "xla", ms=10.0, extra=10**9),
        synthetic_row("llama", 8192, "matmul-floor", ms=32.0, extra=12 * 10**9),
        synthetic_row("llama", 8192, "xla", ms=40.0, extra=2 * 10**9),
        synthetic_row("llama", 8192, "reference", status="OOM", reason="RESOURCE_EXHAUSTED | 84 GB"),
        synthetic_row("gemma", 8192, "liger", status="skipped", reason="not installed: torch"),
    ]
    for row in rows:
        report.append_row(tmp_path, row)
    text = report.render(tmp_path)
    assert text == (tmp_path / report.TABLE_FILE).read_text()
    lines = [line for line in text.splitlines() if line.startswith("| llama") or line.startswith("| gemma")]
    assert len(lines) == len(rows)
    assert "| llama | 8192 | xla | ok | 40.00 (36.00–48.00) | 20.00 | 1.25 |" in text
    assert "| llama | 8192 | reference | OOM: RESOURCE_EXHAUSTED / 84 GB |" in text
    assert "NVIDIA H200" in text
    for name in (report.TIME_PLOT_FILE, report.MEMORY_PLOT_FILE):
        assert (tmp_path / name).read_bytes()[:8] == PNG_SIGNATURE
    floors = report.floor_medians(rows)
    assert [report.ratio_to_floor(r, floors) for r in rows] == [1.0, 1.25, 1.0, 1.25, None, None]


def test_replot_rebuilds_from_rows(tmp_path, capsys):
    report.append_row(tmp_path, synthetic_row("qwen", 4096, "xla"))
    assert main(["--out", str(tmp_path), "--replot"]) == 0
    assert "| qwen | 4096 | xla | ok |" in capsys.readouterr().out
    assert json.loads((tmp_path / report.ROWS_FILE).read_text())["impl"] == "xla"


# ---------------------------------------------------------------------------------------------
# --help of the three scripts


def _script_parsers():
    from bench import kernel_sweep, topk_select

    return {
        "bench": build_parser(),
        "bench.multi_gpu": multi_gpu.build_parser(),
        "bench.kernel_sweep": kernel_sweep.build_parser(),
        "bench.topk_select": topk_select.build_parser(),
    }


@pytest.mark.parametrize("script", ["bench", "bench.multi_gpu", "bench.kernel_sweep", "bench.topk_select"])
def test_every_flag_has_help_and_shows_its_default(script):
    parser = _script_parsers()[script]
    text = parser.format_help()  # also checks that every help string formats
    formatter = parser.formatter_class(prog=parser.prog)
    flags = [a for a in parser._actions if a.option_strings and a.dest != "help"]
    assert flags
    for action in flags:
        assert action.help, action.option_strings
        shown = formatter._get_help_string(action)
        assert action.required or "default" in shown, (action.option_strings, shown)
        assert action.option_strings[-1] in text


def test_help_lists_the_presets_with_their_shapes(monkeypatch):
    monkeypatch.setitem(PRESETS, "custom", Preset(777, 555, 33333, (11, 13), "made up"))
    text = build_parser().format_help()
    lines = text.splitlines()
    for name, preset in PRESETS.items():
        shown = [line.split() for line in lines if line.split()[:1] == [name]]
        shape = [str(preset.hidden_teacher), str(preset.hidden_student), str(preset.vocab)]
        assert [name, *shape, ",".join(map(str, preset.sizes))] in [cells[:5] for cells in shown], (name, text)


def test_multi_gpu_help_lists_its_sizes_and_timing():
    text = " ".join(multi_gpu.build_parser().format_help().split())
    for size in (multi_gpu.FULL, multi_gpu.TINY):
        assert f"N {size.tokens_per_device} tokens/device, Hs {size.hidden_student}, Ht {size.hidden_teacher}" in text
        assert f"V {size.vocab}, {size.dtype}" in text
    assert "default: 3, or 1 with --tiny" in text and "default: 20, or 3 with --tiny" in text


# ---------------------------------------------------------------------------------------------
# Pallas interpret mode, run metadata


def test_tiny_pallas_rows_are_marked_interpret(tiny_run):
    """Off the GPU the pallas rows ran the kernel in interpret mode and say so; no other row does."""
    _, _, rows = tiny_run
    off_gpu = jax.default_backend() != "gpu"
    for row in rows:
        if row["status"] == "ok":
            assert row["interpret"] is (off_gpu and row["impl"] == "pallas"), row


def test_interpret_rows_are_labelled_in_table_and_plots(tmp_path):
    rows = [
        synthetic_row("tiny", 64, "matmul-floor", ms=1.0),
        {**synthetic_row("tiny", 64, "pallas", ms=40.0), "interpret": True},
        {**synthetic_row("tiny", 64, "xla", ms=2.0), "interpret": False},
    ]
    text = report.markdown(rows)
    assert "| tiny | 64 | pallas (interpret) | ok | 40.00 (36.00–48.00) | 20.00 | 40.00 |" in text
    assert "| tiny | 64 | xla | ok |" in text
    assert "interpret mode" in text
    [(_, legend)] = report.plot(rows, tmp_path / "t.png", metric="time")
    assert legend == ["matmul-floor", "pallas (interpret)", "xla"]


def test_bench_rows_take_the_git_sha_from_the_shared_helper(tmp_path, monkeypatch):
    monkeypatch.setattr(common, "git_sha", lambda: "0123abc+dirty")
    assert main(["--preset", "tiny:64", "--impl", "xla", "--out", str(tmp_path), "--time-budget", "0"]) == 0
    assert [r["git_sha"] for r in report.read_rows(tmp_path)] == ["0123abc+dirty"]


# ---------------------------------------------------------------------------------------------
# The multi-GPU benchmark (one CPU device here; tests/test_multidevice.py runs it on four)


def test_multi_gpu_keeps_explicit_warmup_and_iters_with_tiny():
    def timing(*argv):
        _, size, warmup, iters = multi_gpu.parse_args(["--out", "x", *argv])
        return size, warmup, iters

    assert timing() == (multi_gpu.FULL, 3, 20)
    assert timing("--tiny") == (multi_gpu.TINY, 1, 3)
    assert timing("--tiny", "--warmup", "0", "--iters", "2") == (multi_gpu.TINY, 0, 2)
    assert timing("--tiny", "--iters", "12") == (multi_gpu.TINY, 1, 12)
    assert timing("--warmup", "5", "--iters", "11")[1:] == (5, 11)
    with pytest.raises(SystemExit):
        timing("--iters", "5")  # fewer than 10 timed calls only with --tiny


def test_multi_gpu_tiny_run_records_metadata_and_the_given_timing(tmp_path):
    argv = ["--tiny", "--out", str(tmp_path), "--warmup", "0", "--iters", "2", "--git-sha", "cafe"]
    assert multi_gpu.main(argv) == 0
    result = json.loads((tmp_path / "multi_gpu.json").read_text())
    assert (result["warmup"], result["iters"]) == (0, 2)
    assert result["git_sha"] == "cafe" and result["date"]
    assert result["jaxlib_version"] == importlib.metadata.version("jaxlib")
    assert result["jax_version"] == jax.__version__


def test_multi_gpu_draws_with_the_suite_generator():
    """The multi-GPU inputs are bench.suite.make_inputs' arrays, placed by the given shardings."""
    mesh = jax.sharding.Mesh(np.asarray(jax.devices()[:1]), (multi_gpu.AXIS,))
    size = multi_gpu.TINY
    got = multi_gpu.draw_inputs(size, mesh, seed=4)
    problem = multi_gpu.problem_of(size, mesh.size, seed=4)
    assert (problem.n, problem.vocab, problem.ignore_fraction, problem.dtype) == (64, 257, 0.1, "float32")
    want = suite.make_inputs(problem)
    assert set(got) == set(want) == set(suite.INPUT_NAMES) | {"labels"}
    for key in want:
        np.testing.assert_array_equal(np.asarray(got[key]), np.asarray(want[key]))
    assert got["labels"].sharding.spec == jax.sharding.PartitionSpec(multi_gpu.AXIS)
    assert got["student_weight"].sharding.spec == jax.sharding.PartitionSpec()


def test_multi_gpu_vocab_parallel_defaults_are_the_issue_grid():
    """--vocab-parallel: llama and gemma head shapes, N = 8192 and 32768, bf16, model axes 2 and 4."""
    args, *_ = multi_gpu.parse_args(["--out", "x", "--vocab-parallel"])
    assert args.vocab_parallel and args.model_axis == [2, 4]
    sizes = dict(multi_gpu.vocab_sizes(args.vocab_presets, args.vocab_tokens))
    assert list(sizes) == ["llama:8192", "llama:32768", "gemma:8192", "gemma:32768"]
    for label, size in sizes.items():
        preset = PRESETS[label.split(":")[0]]
        assert (size.hidden_student, size.hidden_teacher, size.vocab) == (
            preset.hidden_student,
            preset.hidden_teacher,
            preset.vocab,
        )
        assert size.dtype == "bfloat16" and size.tokens_per_device == int(label.split(":")[1])
        assert all(size.vocab % m == 0 for m in args.model_axis)


def test_multi_gpu_vocab_parallel_runs_on_one_device(tmp_path):
    """The mode end to end on this process's one CPU device (model axis 1; model axes that do
    not fit are skipped and recorded); tests/test_vocab_parallel.py runs it on 8 devices."""
    argv = ["--vocab-parallel", "--tiny", "--model-axis", "1", "64", "--out", str(tmp_path), "--iters", "2"]
    assert multi_gpu.main([*argv, "--warmup", "0"]) == 0
    result = json.loads((tmp_path / "multi_gpu_vocab.json").read_text())
    assert (result["model_axes"], result["skipped_model_axes"]) == ([1], [64])
    one, sharded = result["rows"]
    assert (one["variant"], sharded["variant"]) == ("1-device", "model=1")
    assert sharded["matches_1_device"] and sharded["loss"] == pytest.approx(one["loss"], rel=1e-6)
    for row in (one, sharded):
        assert set(row["memory"]) == {"argument_bytes", "output_bytes", "temp_bytes", "extra_bytes"}
        assert row["memory"]["extra_bytes"] == row["memory"]["output_bytes"] + row["memory"]["temp_bytes"]


def test_all_reduces_reads_shapes_groups_and_place():
    """Both HLO notations of device groups, combined all-reduces, async starts, entry vs loop body."""
    hlo = "\n".join(
        [
            "%body.1 (p: (s32[], f32[4])) -> (s32[], f32[4]) {",
            "  %ar = (f32[16]{0}, f32[16]{0}) all-reduce(%a, %b), channel_id=1, "
            "replica_groups={{0,1,2,3},{4,5,6,7}}, use_global_device_ids=true, to_apply=%add",
            "}",
            "ENTRY %main.2 (x: f32[12,16]) -> f32[12,16] {",
            "  %ars = f32[12,16]{1,0} all-reduce-start(%x), channel_id=2, replica_groups=[4,2]<=[2,4]T(1,0), "
            "to_apply=%add",
            "  %ard = f32[12,16]{1,0} all-reduce-done(%ars)",
            "  ROOT %s = s32[] all-reduce(%c), replica_groups=[2,4]<=[8], to_apply=%add",
            "}",
        ]
    )
    assert multi_gpu.all_reduces(hlo) == [
        {"shapes": ["f32[16]", "f32[16]"], "groups": [[0, 1, 2, 3], [4, 5, 6, 7]], "entry": False},
        {"shapes": ["f32[12,16]"], "groups": [[0, 4], [1, 5], [2, 6], [3, 7]], "entry": True},
        {"shapes": ["s32[]"], "groups": [[0, 1, 2, 3], [4, 5, 6, 7]], "entry": True},
    ]
    mesh = jax.sharding.Mesh(np.asarray(jax.devices()[:1]).reshape(1, 1), ("data", "model"))
    assert multi_gpu.model_axis_all_reduces(hlo, mesh)["per_chunk_count"] == 0


# ---------------------------------------------------------------------------------------------
# The float32 oracle: once per problem


def test_float32_oracle_runs_once_per_problem_with_the_same_errors(tmp_path, monkeypatch):
    computed = []
    compute = suite.compute_float32_oracle

    def spy(problem, inputs):
        computed.append(problem)
        return compute(problem, inputs)

    monkeypatch.setattr(suite, "compute_float32_oracle", spy)
    problem = tiny_problem()
    first = suite.run_case(Case(problem, "xla", oracle_dir=str(tmp_path)))
    second = suite.run_case(Case(problem, "reference", oracle_dir=str(tmp_path)))
    assert computed == [problem]  # the second worker read the first one's
    assert [p.name for p in tmp_path.iterdir()] == [problem.key() + ".npz"]
    alone = suite.run_case(Case(problem, "xla"))  # no store: computes its own
    assert len(computed) == 2
    assert first["errors"] == alone["errors"] and first["errors"]["grad_w_rel"] > 0
    assert second["errors"]["reference_loss"] == first["errors"]["reference_loss"]
    other = dataclasses.replace(problem, beta=0.0)
    assert other.key() != problem.key() and dataclasses.replace(problem).key() == problem.key()


# ---------------------------------------------------------------------------------------------
# The chunked matmul floor


def test_chunked_floor_is_the_four_dots_in_the_fused_scan():
    problem = tiny_problem(n=50, dtype="float32", chunk_size=16)
    inputs = suite.make_inputs(problem)
    vg, fwd, vg_args, fwd_args = suite.matmul_floor_chunked_fns(problem, inputs)
    jaxpr = jax.make_jaxpr(vg)(*vg_args).jaxpr
    [scan] = [e for e in jaxpr.eqns if e.primitive.name == "scan"]
    body = [e.primitive.name for e in scan.params["jaxpr"].jaxpr.eqns]
    assert scan.params["length"] == math.ceil(50 / 16) and body.count("dot_general") == 4
    # XLA keeps all four dots (two in the forward): the stand-in dZ feeds on both logits.
    assert len(re.findall(r"\bdot\(", jax.jit(vg).lower(*vg_args).compile().as_text())) == 4
    assert len(re.findall(r"\bdot\(", jax.jit(fwd).lower(*fwd_args).compile().as_text())) == 2

    x_s, w_s, x_t, w_t = (np.asarray(a, np.float64) for a in vg_args)
    dz = x_s @ w_s - x_t @ w_t
    grad_x, grad_w = vg(*vg_args)
    np.testing.assert_allclose(grad_x, dz @ w_s.T, rtol=1e-5, atol=1e-5 * np.abs(dz @ w_s.T).max())
    np.testing.assert_allclose(grad_w, x_s.T @ dz, rtol=1e-5, atol=1e-5 * np.abs(x_s.T @ dz).max())
    np.testing.assert_allclose(fwd(*fwd_args), dz.max(axis=1), rtol=1e-5)


def test_chunked_floor_takes_the_library_chunk_size():
    assert suite.chunk_rows(tiny_problem(n=256, chunk_size=32)) == 32
    assert suite.chunk_rows(tiny_problem(n=256, chunk_size=1000)) == 256
    assert suite.chunk_rows(tiny_problem(n=256)) == min(256, jaxdistill.default_chunk_size(1000))
    llama = Problem("llama", 8192, 4096, 2048, 128256)
    assert suite.chunk_rows(llama) == jaxdistill.default_chunk_size(128256) == 1024


def test_chunked_floor_is_listed_and_reported():
    assert IMPLEMENTATIONS[:2] == FLOOR_IMPLEMENTATIONS == ("matmul-floor", "matmul-floor-chunked")
    assert "matmul-floor-chunked" in build_parser().format_help()
    rows = [
        synthetic_row("llama", 8192, "matmul-floor", ms=32.0),
        synthetic_row("llama", 8192, "matmul-floor-chunked", ms=36.0),
        synthetic_row("llama", 8192, "pallas", ms=45.0),
    ]
    text = report.markdown(rows)
    assert "| × floor | × chunked |" in text
    assert "| llama | 8192 | matmul-floor | ok | 32.00 (28.80–38.40) | 16.00 | 1.00 | 0.89 |" in text
    assert "| llama | 8192 | matmul-floor-chunked | ok | 36.00 (32.40–43.20) | 18.00 | 1.12 | 1.00 |" in text
    assert "| llama | 8192 | pallas | ok | 45.00 (40.50–54.00) | 22.50 | 1.41 | 1.25 |" in text


# ---------------------------------------------------------------------------------------------
# Several β in one run


def test_beta_list_gives_one_problem_per_beta():
    args = build_parser().parse_args(["--out", "x", "--preset", "tiny:64", "--impl", "xla", "matmul-floor"])
    assert args.beta == [0.5] and [c.problem.beta for c in build_cases(args)] == [0.5, 0.5]
    args = build_parser().parse_args(["--out", "x", "--preset", "tiny:64,256", "--impl", "xla", "--beta", "0", "1"])
    assert [(c.problem.beta, c.problem.n) for c in build_cases(args)] == [(0, 64), (0, 256), (1, 64), (1, 256)]
    with pytest.raises(SystemExit):
        main(["--out", "x", "--beta", "0", "1.5"])


def test_beta_sections_in_table_and_plots(tmp_path):
    def row(beta, impl, ms):
        r = synthetic_row("llama", 8192, impl, ms=ms)
        r["config"]["beta"] = beta
        return r

    rows = [
        row(0.0, "matmul-floor", 30.0),
        row(0.0, "xla", 45.0),
        row(1.0, "matmul-floor", 40.0),
        row(1.0, "xla", 50.0),
    ]
    text = report.markdown(rows)
    zero, one = text.index("### β = 0\n"), text.index("### β = 1\n")
    assert (
        zero < text.index("| llama | 8192 | xla | ok | 45.00") < one < text.index("| llama | 8192 | xla | ok | 50.00")
    )
    assert "| 45.00 (40.50–54.00) | 22.50 | 1.50 |" in text and "| 50.00 (45.00–60.00) | 25.00 | 1.25 |" in text
    assert [label for label, _ in report.sections(rows)] == ["β = 0", "β = 1"]
    assert report.plot(rows, tmp_path / "t.png", metric="time") == [
        ("llama, β = 0", ["matmul-floor", "xla"]),
        ("llama, β = 1", ["matmul-floor", "xla"]),
    ]
    rows[-1]["config"]["temperature"] = 2.0  # another setting differs too: named in the label
    assert [label for label, _ in report.sections(rows)] == [
        "β = 0, temperature = 1.0",
        "β = 1, temperature = 1.0",
        "β = 1, temperature = 2.0",
    ]


def test_floors_compile_without_the_run_wide_cache(tmp_path):
    """A floor's program is the same for every β: from the shared cache it would report no compile time."""
    runner = Runner(tmp_path, time_budget=None, case_timeout=1.0, compilation_cache_dir=str(tmp_path / "c"))
    for impl in IMPLEMENTATIONS:
        env = runner.worker_env(Case(tiny_problem(), impl))
        assert (env.get("JAX_COMPILATION_CACHE_DIR") == str(tmp_path / "c")) is (impl not in FLOOR_IMPLEMENTATIONS)


def test_several_betas_in_one_run(tmp_path):
    """--beta 0 1: a set of rows and a table section per β; each problem's oracle is computed by
    one worker and read by the other."""
    argv = ["--preset", "tiny:64", "--impl", "xla", "reference", "--beta", "0", "1", "--out", str(tmp_path)]
    assert main(argv) == 0
    rows = report.read_rows(tmp_path)
    assert [(r["config"]["beta"], r["impl"], r["status"]) for r in rows] == [
        (0.0, "xla", "ok"),
        (0.0, "reference", "ok"),
        (1.0, "xla", "ok"),
        (1.0, "reference", "ok"),
    ]
    losses = [r["errors"]["reference_loss"] for r in rows]
    assert losses[0] == losses[1] != losses[2] == losses[3]
    log = (tmp_path / "workers.log").read_text()
    assert log.count("float32 oracle: computed") == 2 and log.count("float32 oracle: read") == 2
    table = (tmp_path / report.TABLE_FILE).read_text()
    assert table.index("### β = 0") < table.index("### β = 1") and table.count("| tiny | 64 | xla | ok |") == 2
