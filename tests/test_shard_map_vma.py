"""The fused loss inside ``jax.shard_map`` with the default ``check_vma=True`` (4 simulated devices)."""

import pytest
from distill_setup import last_json_line, run_python


def test_shard_map_with_check_vma_equals_single_device():
    proc = run_python("tests/shard_map_vma_worker.py", devices=4)
    assert proc.returncode == 0, proc.stderr[-6000:]
    result = last_json_line(proc.stdout)
    assert result["devices"] == 4
    whole, sharded = result["loss"]
    assert sharded == pytest.approx(whole, rel=1e-6)
    # student_hidden, student_weight (psum-ed over the data axis by the VJP), student_bias
    assert max(result["grad_rel_diff"]) < 1e-5, result["grad_rel_diff"]
