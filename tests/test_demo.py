"""The end-to-end demo (`python -m jaxdistill.demo`) at its tiny preset, its CLI errors and its atomic report."""

import json
import math
import pathlib
import subprocess
import sys

import numpy as np
import pytest

from jaxdistill.demo import data, report, train
from jaxdistill.demo.run import main

REPORT_FILES = ("metrics.json", "summary.md", "curves.png")
REPO_ROOT = pathlib.Path(__file__).resolve().parents[1]
COMMITTED_REPORT = "bench/results/2026-12-01-demo-cpu"


def _numbers(tree):
    """Every int/float leaf of a JSON tree."""
    if isinstance(tree, dict):
        for value in tree.values():
            yield from _numbers(value)
    elif isinstance(tree, list):
        for value in tree:
            yield from _numbers(value)
    elif isinstance(tree, int | float) and not isinstance(tree, bool):
        yield tree


def _counting(monkeypatch, module, name):
    """Wrap ``module.name`` so that its calls are counted; returns the list of call counts."""
    calls, original = [], getattr(module, name)

    def counted(*args, **kwargs):
        calls.append(1)
        return original(*args, **kwargs)

    monkeypatch.setattr(module, name, counted)
    return calls


def test_tiny_run_writes_a_finite_report(tmp_path, capsys, monkeypatch):
    teacher_calls = _counting(monkeypatch, train, "teacher_log_probs")
    student_calls = _counting(monkeypatch, train, "student_window_sums")
    out = tmp_path / "report"
    assert main(["--preset", "tiny", "--out", str(out), "--seed", "3"]) == 0

    assert sorted(p.name for p in tmp_path.iterdir()) == ["report"]  # no staging directory left behind
    assert sorted(p.name for p in out.iterdir()) == sorted(REPORT_FILES)
    assert (out / "curves.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    metrics = json.loads((out / "metrics.json").read_text())
    config = metrics["config"]
    assert config["seed"] == 3
    for section in ("heldout", "curves", "timings_s", "heldout_blocks"):
        values = list(_numbers(metrics[section]))
        assert values and all(math.isfinite(v) for v in values), section
    for role in ("student_ce", "student_distilled"):
        assert set(metrics["heldout"][role]) >= {"ce", "perplexity", "kl_to_teacher", "agreement", "accuracy"}
        assert len(metrics["curves"][role]["loss"]) == config["student_steps"]
    assert metrics["corpus"]["vocab_size"] == 512
    summary = (out / "summary.md").read_text()
    assert "**Verdict**" in summary and f"{metrics['heldout']['student_distilled']['ce']:.4f}" in summary
    captured = capsys.readouterr()
    assert "held-out CE: CE-only" in captured.out and "noise threshold ±" in captured.out

    # The frozen teacher runs once per batch of each window set: the curve windows (cached for
    # every curve point) and the final windows (shared by both students), never per evaluation.
    batches = lambda tokens: -(-(tokens // config["seq_len"]) // config["batch_size"])  # noqa: E731
    curve_batches, final_batches = batches(config["curve_eval_tokens"]), batches(config["eval_tokens"])
    assert len(teacher_calls) == curve_batches + final_batches
    # Each student: one curve point every eval_every steps from step 0, then the final pass, whose
    # first windows give the curve's last point (not evaluated a second time).
    points = -(-config["student_steps"] // config["eval_every"])
    assert len(student_calls) == 2 * (points * curve_batches + final_batches)
    for role in ("student_ce", "student_distilled"):
        evals = metrics["curves"][role]["eval"]
        assert [e["step"] for e in evals] == [*range(0, config["student_steps"], config["eval_every"])] + [
            config["student_steps"]
        ]
        assert evals[-1]["tokens"] == evals[0]["tokens"] == config["curve_eval_tokens"]

    # Both students' progress bars show the training cross-entropy (the distilled one its soft loss too).
    bars = {line.split(":")[0]: line for line in captured.err.replace("\r", "\n").splitlines() if "100%" in line}
    assert "ce=" in bars["student (CE only)"] and "loss=" not in bars["student (CE only)"]
    assert "ce=" in bars["student (distilled)"] and "soft=" in bars["student (distilled)"]
    final_ce = float(bars["student (distilled)"].split("ce=")[1].split(",")[0])
    assert final_ce == pytest.approx(metrics["curves"]["student_distilled"]["hard_loss"][-1], abs=5e-4)


def test_batch_starts_cover_every_valid_window_start():
    # A window is seq_len + 1 tokens: in 10 tokens with seq_len 7 the starts are 0, 1 and 2.
    starts = data.batch_starts(10, steps=200, batch_size=4, seq_len=7, seed=0)
    assert sorted(set(starts.ravel().tolist())) == [0, 1, 2]
    tokens = np.arange(10)
    inputs, labels = data.windows(tokens, starts, 7)
    assert labels.max() == 9 and np.array_equal(inputs[..., 1:], labels[..., :-1])
    # A stream of exactly one window has one start; one token fewer is too short.
    assert data.batch_starts(8, steps=3, batch_size=2, seq_len=7, seed=0).tolist() == [[0, 0]] * 3
    with pytest.raises(data.CorpusTooShortError, match="shorter than one window"):
        data.batch_starts(7, steps=3, batch_size=2, seq_len=7, seed=0)


def _heldout(ce_only, distilled):
    """Per-token metrics of the two students, every compared metric set to the same pair."""
    keys = ("ce", "perplexity", "kl_to_teacher", "agreement", "accuracy")
    return {"student_ce": dict.fromkeys(keys, ce_only), "student_distilled": dict.fromkeys(keys, distilled)}


def test_a_difference_within_the_noise_is_not_called_better():
    keys = ("ce", "kl_to_teacher", "agreement", "accuracy")
    # Mean block difference −0.01 with a standard error of 0.0137 (8 blocks): within noise.
    noisy = [-0.05, 0.04, -0.06, 0.05, -0.03, 0.02, -0.04, -0.01]
    comparison = report.compare(_heldout(5.0, 4.99), dict.fromkeys(keys, noisy))
    assert comparison["ce"]["standard_error"] == pytest.approx(np.std(noisy, ddof=1) / np.sqrt(8))
    assert comparison["ce"]["threshold"] == pytest.approx(2.36 * comparison["ce"]["standard_error"])
    assert {c["verdict"] for c in comparison.values()} == {"within_noise"}
    # The same mean difference, consistent over the blocks: better for "lower is better", worse otherwise.
    steady = [-0.011, -0.009, -0.010, -0.012, -0.008, -0.010, -0.011, -0.009]
    comparison = report.compare(_heldout(5.0, 4.99), dict.fromkeys(keys, steady))
    assert [comparison[k]["verdict"] for k in ("ce", "perplexity", "kl_to_teacher")] == ["better"] * 3
    assert [comparison[k]["verdict"] for k in ("agreement", "accuracy")] == ["worse"] * 2
    # One block: no noise estimate, no verdict.
    assert report.compare(_heldout(5.0, 4.0), dict.fromkeys(keys, [-1.0]))["ce"]["verdict"] == "no_estimate"


def test_the_summary_words_a_difference_within_noise_as_such(tmp_path):
    keys = ("ce", "kl_to_teacher", "agreement", "accuracy")
    metrics = json.loads((REPO_ROOT / COMMITTED_REPORT / "metrics.json").read_text())
    noisy = [-0.05, 0.04, -0.06, 0.05, -0.03, 0.02, -0.04, -0.01]
    metrics["heldout"] = dict(metrics["heldout"], **_heldout(0.5, 0.49))
    metrics["comparison"] = report.compare(metrics["heldout"], dict.fromkeys(keys, noisy))
    summary = report.summary_markdown(metrics)
    assert "beats" not in summary and "**better**" not in summary
    assert "is within noise of the CE-only student on held-out cross-entropy" in summary


def test_the_committed_report_is_the_one_the_readme_cites():
    readme = " ".join((REPO_ROOT / "README.md").read_text().split())  # sentences wrap anywhere
    assert f"`{COMMITTED_REPORT}/`" in readme
    metrics = json.loads((REPO_ROOT / COMMITTED_REPORT / "metrics.json").read_text())
    assert metrics["config"]["preset"] == "cpu" and metrics["config"]["seed"] == 0
    heldout, comparison = metrics["heldout"], metrics["comparison"]
    for role, label in [
        ("teacher", "teacher"),
        ("student_ce", "CE-only student"),
        ("student_distilled", "distilled student"),
    ]:
        h = heldout[role]
        assert f"| {label} | {h['ce']:.3f} | {h['perplexity']:.1f} |" in readme, role
    assert "noise threshold" in readme
    assert f"{abs(comparison['ce']['distilled_minus_ce_only']):.3f} nats/token" in readme


def test_help_is_clean(capsys):
    with pytest.raises(SystemExit) as exit_info:
        main(["--help"])
    assert exit_info.value.code == 0
    captured = capsys.readouterr()
    assert captured.err == ""
    assert "--preset" in captured.out and "--student-steps" in captured.out and "(cpu: " in captured.out


def test_module_entry_point():
    result = subprocess.run(
        [sys.executable, "-m", "jaxdistill.demo", "--help"], capture_output=True, text=True, check=False
    )
    assert result.returncode == 0
    assert result.stdout.startswith("usage: python -m jaxdistill.demo")


@pytest.mark.parametrize(
    "argv, message",
    [
        (["--preset", "huge"], "--preset"),
        (["--student-steps", "0"], "argument --student-steps: must be ≥ 1, got '0'"),
        (["--teacher-steps", "ten"], "argument --teacher-steps: must be an integer, got 'ten'"),
        (["--beta", "1.5"], "argument --beta: must be ≥ 0.0 and ≤ 1.0"),
        (["--temperature", "0"], "argument --temperature: must be > 0"),
        (["--hard-weight", "nan"], "argument --hard-weight: must be"),
        (["--vocab-size", "100"], "argument --vocab-size: must be ≥ 512"),
        (["--seq-len", "5000"], "argument --seq-len: must be ≥ 1 and ≤ 4096"),
        (["--corpus", "wikipedia"], "argument --corpus: invalid choice"),
        (["--teacher-d-model", "200"], "does not split into 3 heads"),
        (["--no-such-flag"], "unrecognized arguments"),
    ],
    ids=lambda v: " ".join(v) if isinstance(v, list) else None,
)
def test_bad_flags_exit_2_with_a_clear_message(argv, message, capsys):
    with pytest.raises(SystemExit) as exit_info:
        main(argv)
    assert exit_info.value.code == 2
    assert message in capsys.readouterr().err


def test_an_interrupted_report_leaves_the_previous_one(tmp_path):
    out = tmp_path / "report"
    with report.staged_directory(out) as staging:
        (staging / "a.txt").write_text("first")
    with pytest.raises(KeyboardInterrupt), report.staged_directory(out) as staging:
        (staging / "a.txt").write_text("half-written")
        raise KeyboardInterrupt
    assert [p.name for p in tmp_path.iterdir()] == ["report"]
    assert (out / "a.txt").read_text() == "first"
    with report.staged_directory(out) as staging:
        (staging / "b.txt").write_text("second")
    assert [p.name for p in tmp_path.iterdir()] == ["report"]
    assert [p.name for p in out.iterdir()] == ["b.txt"]
