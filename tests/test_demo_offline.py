"""The demo's offline teacher (`--teacher offline[:K]`): the top-k cache on disk, its header check, and the
third student trained from it, end to end at the tiny preset."""

import json
import pathlib

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from jaxdistill.demo import cache, data, report
from jaxdistill.demo.config import CACHE_NAME, DEFAULT_TOPK, parse_config
from jaxdistill.demo.run import main
from jaxdistill.transformer import TransformerLM


def test_tiny_offline_run_writes_the_cache_and_reports_the_offline_student(tmp_path, capsys):
    # k = V − 1: the bucket tail is then one token, so the bucket loss is the dense forward loss (up
    # to rounding) and the offline student must retrace the online one if the cache holds the
    # teacher at the distillation temperature (T = 2 here) on the same batches in the same order.
    out = tmp_path / "report"
    argv = ["--preset", "tiny", "--teacher", "offline:511", "--temperature", "2", "--seed", "3", "--no-progress"]
    assert main([*argv, "--out", str(out)]) == 0

    assert [p.name for p in tmp_path.iterdir()] == ["report"]  # no staging or scratch directory left behind
    assert sorted(p.name for p in out.iterdir()) == sorted(["metrics.json", "summary.md", "curves.png", CACHE_NAME])
    metrics = json.loads((out / "metrics.json").read_text())
    config = metrics["config"]
    assert (config["teacher_mode"], config["topk"], config["temperature"]) == ("offline", 511, 2.0)
    steps, batch, seq_len, k = config["student_steps"], config["batch_size"], config["seq_len"], 511

    # The cache: one raw file per field and the header, which matches the run and reads back.
    directory = out / CACHE_NAME
    shape = [steps, batch, seq_len, k]
    assert sorted(p.name for p in directory.iterdir()) == ["header.json", "ids.int32", "logprobs.float32"]
    assert (
        (directory / "ids.int32").stat().st_size
        == (directory / "logprobs.float32").stat().st_size
        == 4 * np.prod(shape)
    )
    header = json.loads((directory / "header.json").read_text())
    assert header["format"] == cache.FORMAT
    assert (header["k"], header["temperature"], header["vocab_size"]) == (511, 2.0, 512)
    assert header["fields"] == {
        "ids": {"file": "ids.int32", "dtype": "int32", "shape": shape},
        "logprobs": {"file": "logprobs.float32", "dtype": "float32", "shape": shape},
    }
    identity = header["identity"]
    assert (identity["preset"], identity["corpus"], identity["seed"]) == ("tiny", "pydoc", 3)
    assert identity["teacher"]["steps"] == config["teacher_steps"]
    assert len(identity["tokenizer_sha256"]) == len(identity["train_stream_sha256"]) == 64
    assert set(cache.PROVENANCE) <= set(header)
    expected = {key: value for key, value in header.items() if key not in cache.PROVENANCE}
    opened = cache.open_cache(directory, expected)
    ids, logprobs = np.asarray(opened.ids), np.asarray(opened.logprobs)
    assert ids.min() >= 0 and ids.max() < 512
    assert np.all(np.diff(np.sort(ids, axis=-1), axis=-1) > 0)  # k distinct ids per position
    assert np.all(np.diff(logprobs, axis=-1) <= 0) and np.all(logprobs <= 0)  # descending log-probabilities
    assert np.all(np.exp(logprobs).sum(-1) <= 1 + 1e-5)

    cached = metrics["offline_cache"]
    assert cached["directory"] == str(directory)
    assert cached["bytes"] == sum(p.stat().st_size for p in directory.iterdir())
    assert cached["positions"] == steps * batch * seq_len and cached["tail"] == "bucket"
    assert cached["mean_topk_mass"] == pytest.approx(np.exp(logprobs.astype(np.float64)).sum(-1).mean())
    assert {"teacher_topk_cache", "student_offline"} <= set(metrics["timings_s"])

    # The offline student retraces the online one (the same loss, batches and initialization).
    heldout = metrics["heldout"]
    for key in ("ce", "kl_to_teacher", "agreement", "accuracy"):
        assert heldout["student_offline"][key] == pytest.approx(heldout["student_distilled"][key], rel=1e-4, abs=1e-6)
    curves = metrics["curves"]
    assert len(curves["student_offline"]["loss"]) == steps
    np.testing.assert_allclose(curves["student_offline"]["hard_loss"], curves["student_distilled"]["hard_loss"], 1e-4)
    np.testing.assert_allclose(curves["student_offline"]["soft_loss"], curves["student_distilled"]["soft_loss"], 1e-3)

    comparison = metrics["comparison_offline"]
    assert comparison["placement"] in report.PLACEMENTS
    assert comparison["between_or_better"] == (comparison["placement"] in report.PLACED_BETWEEN_OR_BETTER)

    summary = (out / "summary.md").read_text()
    for role, label in report.STUDENTS_OFFLINE.items():
        assert f"| {label} | {heldout[role]['ce']:.4f} |" in summary, role
    assert "**Verdict (offline teacher)**" in summary and f"{cached['bytes']:,} bytes" in summary
    printed = capsys.readouterr().out
    assert f"{out}/summary.md, metrics.json, curves.png, {CACHE_NAME}/" in printed
    assert "offline teacher: top-511 cache of 2,048 positions" in printed
    assert "held-out CE: offline-distilled" in printed


def _tiny_teacher(vocab=64):
    return TransformerLM(vocab_size=vocab, d_model=16, n_layers=1, n_heads=2, d_ff=32, max_len=8, rngs=nnx.Rngs(0))


def _build(directory, teacher, *, k=4, temperature=2.0, identity=None):
    tokens = np.random.default_rng(0).integers(0, 64, 200).astype(np.int32)
    starts = data.batch_starts(len(tokens), steps=3, batch_size=2, seq_len=8, seed=0)
    identity = {"preset": "test", "teacher": {"params_sha256": cache.params_sha256(teacher)}} | (identity or {})
    built = cache.build(directory, teacher, tokens, starts, seq_len=8, k=k, temperature=temperature, identity=identity)
    return built, tokens, starts


def test_the_cache_holds_the_teacher_top_k_of_each_batch_in_order(tmp_path):
    teacher = _tiny_teacher()
    built, tokens, starts = _build(tmp_path / "cache", teacher)
    assert built.ids.shape == built.logprobs.shape == (3, 2, 8, 4)
    assert built.nbytes == sum(p.stat().st_size for p in (tmp_path / "cache").iterdir())
    for step in range(3):
        inputs, _ = data.windows(tokens, starts[step], 8)
        log_p = jax.nn.log_softmax(teacher(jnp.asarray(inputs)) / 2.0)
        values, ids = jax.lax.top_k(log_p, 4)
        batch = built.batch(step)
        np.testing.assert_array_equal(batch["teacher_ids"], ids)
        np.testing.assert_allclose(batch["teacher_logprobs"], values, rtol=1e-5, atol=1e-5)


def test_a_cache_whose_header_does_not_match_is_rejected(tmp_path):
    teacher = _tiny_teacher()
    directory = tmp_path / "cache"
    built, *_ = _build(directory, teacher)
    expected = {key: value for key, value in built.header.items() if key not in cache.PROVENANCE}
    assert cache.open_cache(directory, expected).header == built.header

    def rejected(changed, *fields):
        with pytest.raises(cache.CacheMismatchError, match="does not match this run") as error:
            cache.open_cache(directory, changed)
        for field in fields:
            assert field in str(error.value)
        return str(error.value)

    message = rejected(dict(expected, temperature=1.0), "temperature: expected 1.0, cache has 2.0")
    assert "k:" not in message  # only the differing fields are named
    other = cache.expected_header(
        k=8, temperature=2.0, vocab_size=64, steps=3, batch_size=2, seq_len=8, identity=expected["identity"]
    )
    rejected(other, "k: expected 8, cache has 4", "fields.ids.shape")
    another_teacher = {"preset": "test", "teacher": {"params_sha256": cache.params_sha256(_tiny_teacher(vocab=65))}}
    rejected(dict(expected, identity=another_teacher), "identity.teacher.params_sha256")
    rejected(dict(expected, identity={"preset": "cpu"}), "identity.preset", "identity.teacher: not expected")

    # A header entry the reader does not know (other than provenance) is a mismatch too.
    header_path = directory / cache.HEADER
    header_path.write_text(json.dumps(dict(built.header, extra=1)))
    rejected(expected, "extra: not expected")
    header_path.write_text(json.dumps(built.header))

    # Files of the wrong size and a missing header are clear errors, not garbage reads.
    ids_path = directory / "ids.int32"
    ids_path.write_bytes(ids_path.read_bytes()[:-4])
    with pytest.raises(cache.CacheMismatchError, match=r"ids\.int32 should hold \(3, 2, 8, 4\) int32"):
        cache.open_cache(directory, expected)
    header_path.unlink()
    with pytest.raises(cache.CacheMismatchError, match="has no header.json"):
        cache.open_cache(directory, expected)


def test_building_replaces_a_cache_but_no_other_directory(tmp_path):
    teacher = _tiny_teacher()
    directory = tmp_path / "cache"
    _build(directory, teacher, k=4)
    rebuilt, *_ = _build(directory, teacher, k=6)
    assert rebuilt.header["k"] == 6 and rebuilt.ids.shape[-1] == 6
    assert sorted(p.name for p in tmp_path.iterdir()) == ["cache"]  # no staging or old directory left

    other = tmp_path / "notes"
    other.mkdir()
    (other / "keep.txt").write_text("mine")
    with pytest.raises(FileExistsError, match="not a top-k teacher cache"):
        _build(other, teacher)
    assert [p.name for p in other.iterdir()] == ["keep.txt"]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["cache", "notes"]


def test_teacher_flag():
    assert (parse_config([]).teacher_mode, parse_config([]).topk) == ("online", None)
    config = parse_config(["--teacher", "offline"])
    assert (config.teacher_mode, config.topk, config.cache_dir) == ("offline", DEFAULT_TOPK, None)
    assert DEFAULT_TOPK == 64
    config = parse_config(["--teacher", "offline:8", "--cache-dir", "somewhere"])
    assert (config.topk, str(config.cache_dir)) == (8, "somewhere")


@pytest.mark.parametrize(
    "argv, message",
    [
        (["--teacher", "offline:0"], "the K of offline:K must be an integer ≥ 1"),
        (["--teacher", "offline:x"], "the K of offline:K must be an integer ≥ 1"),
        (["--teacher", "cached"], "must be online, offline or offline:K"),
        (["--teacher", "online:4"], "must be online, offline or offline:K"),
        (["--preset", "tiny", "--teacher", "offline:513"], "K exceeds the vocabulary size 512"),
        (["--cache-dir", "x"], "--cache-dir applies to --teacher offline only"),
        (["--teacher", "offline", "--out", "r", "--cache-dir", "r/c"], "--cache-dir r/c is inside --out r"),
    ],
    ids=lambda v: " ".join(v) if isinstance(v, list) else None,
)
def test_bad_teacher_flags_exit_2(argv, message, capsys):
    with pytest.raises(SystemExit) as exit_info:
        main(argv)
    assert exit_info.value.code == 2
    assert message in capsys.readouterr().err


def test_the_readme_cites_the_committed_offline_report():
    root = pathlib.Path(__file__).resolve().parents[1]
    committed = "bench/results/2026-12-02-demo-cpu-offline"
    readme = " ".join((root / "README.md").read_text().split())  # sentences wrap anywhere
    assert f"`{committed}/`" in readme and "## Offline teacher (top-k cache)" in readme
    metrics = json.loads((root / committed / "metrics.json").read_text())
    config, heldout, cached = metrics["config"], metrics["heldout"], metrics["offline_cache"]
    assert (config["preset"], config["seed"], config["teacher_mode"], config["topk"]) == ("cpu", 0, "offline", 64)
    for role, label in [
        ("student_ce", "CE-only student"),
        ("student_distilled", "online-distilled student"),
        ("student_offline", "offline-distilled student (top-64)"),
    ]:
        h = heldout[role]
        assert f"| {label} | {h['ce']:.3f} | {h['perplexity']:.1f} | {h['kl_to_teacher']:.3f} |" in readme, role
    comparison = metrics["comparison_offline"]
    vs_ce, vs_online = comparison["vs_ce_only"]["ce"], comparison["vs_online"]["ce"]
    below, above = -vs_ce["offline_minus_ce_only"], vs_online["offline_minus_online"]
    assert f"{below:.3f} nats/token below CE-only (noise threshold ±{vs_ce['threshold']:.3f})" in readme
    assert f"{above:.3f} above online distillation (±{vs_online['threshold']:.3f})" in readme
    assert comparison["placement"] == "between" and "lands between the other two" in readme
    assert f"in {cached['bytes'] / 1e6:.1f} MB" in readme and f"took {cached['build_seconds']:.1f} s" in readme
    assert f"{cached['positions']:,} positions" in readme
