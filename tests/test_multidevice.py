"""Data parallelism on 4 simulated CPU devices: pmap, shard_map and sharded jit equal the one-device step.

The work runs in a subprocess (``distributed_worker.py devices``) started with
``--xla_force_host_platform_device_count=4``: jax fixes its devices once per process, so the
flag must not reach this one. The batch gives the 4 devices 6, 9, 14 and 16 valid tokens.
"""

import json

import pytest
from distill_setup import last_json_line, run_python

VARIANTS = ["pmap", "shard_map", "sharded_jit"]


@pytest.fixture(scope="module")
def report():
    proc = run_python("tests/distributed_worker.py", "devices", devices=4)
    assert proc.returncode == 0, proc.stderr[-6000:]
    return last_json_line(proc.stdout)


@pytest.mark.parametrize("variant", VARIANTS)
def test_loss_and_grads_equal_single_device(report, variant):
    result, reference = report[variant], report["reference"]
    assert report["num_devices"] == 4
    assert report["valid_tokens_per_device"] == [6, 9, 14, 16]
    assert result["metrics"]["num_valid_tokens"] == reference["num_valid_tokens"] == 45
    for key in ("loss", "soft_loss", "hard_loss"):
        assert result["metrics"][key] == pytest.approx(reference[key], rel=1e-6, abs=1e-7), key
    # Every student parameter's gradient, relative to the largest entry of that parameter's gradient.
    assert result["grads_max_rel_diff"] < 1e-5
    # The parameters after one SGD step (the full train step, optimizer included).
    assert result["state_max_rel_diff"] < 1e-6


@pytest.mark.parametrize("variant", VARIANTS)
@pytest.mark.parametrize("step", ["grads", "step"])
def test_compiled_step_only_all_reduces(report, variant, step):
    """No all-gather (nor any other collective that moves logits or hidden states): the fused
    loss runs on each device's own rows; the only collectives are the all-reduces of the
    gradients and of the loss/valid-token scalars."""
    assert report[variant][f"collectives_{step}"] == ["all-reduce"]


def test_bench_multi_gpu_tiny(tmp_path):
    """``python -m bench.multi_gpu --tiny`` on 4 simulated devices: runs, agrees with 1 device, writes JSON."""
    proc = run_python("-m", "bench.multi_gpu", "--tiny", "--out", str(tmp_path), devices=4)
    assert proc.returncode == 0, proc.stderr[-6000:]
    result = json.loads((tmp_path / "multi_gpu.json").read_text())
    assert result["num_devices"] == 4
    rows = {row["variant"]: row for row in result["rows"]}
    assert set(rows) == {"1-device", "pmap", "sharded_jit"}
    for name in ("pmap", "sharded_jit"):
        assert rows[name]["matches_1_device"], rows[name]
        assert rows[name]["collectives"] == ["all-reduce"], rows[name]
    assert all(row["median_ms"] > 0 for row in rows.values())
    assert "median ms" in proc.stdout
