"""The end-to-end demo (`python -m jaxdistill.demo`) at its tiny preset, its CLI errors and its atomic report."""

import json
import math
import subprocess
import sys

import pytest

from jaxdistill.demo import report
from jaxdistill.demo.run import main

REPORT_FILES = ("metrics.json", "summary.md", "curves.png")


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


def test_tiny_run_writes_a_finite_report(tmp_path, capsys):
    out = tmp_path / "report"
    assert main(["--preset", "tiny", "--out", str(out), "--seed", "3"]) == 0

    assert sorted(p.name for p in tmp_path.iterdir()) == ["report"]  # no staging directory left behind
    assert sorted(p.name for p in out.iterdir()) == sorted(REPORT_FILES)
    assert (out / "curves.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["config"]["seed"] == 3
    for section in ("heldout", "comparison", "curves", "timings_s"):
        values = list(_numbers(metrics[section]))
        assert values and all(math.isfinite(v) for v in values), section
    for role in ("student_ce", "student_distilled"):
        assert set(metrics["heldout"][role]) >= {"ce", "perplexity", "kl_to_teacher", "agreement", "accuracy"}
        assert len(metrics["curves"][role]["loss"]) == metrics["config"]["student_steps"]
    assert metrics["corpus"]["vocab_size"] == 512
    summary = (out / "summary.md").read_text()
    assert "**Verdict**" in summary and f"{metrics['heldout']['student_distilled']['ce']:.4f}" in summary
    assert "held-out CE: CE-only" in capsys.readouterr().out


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
