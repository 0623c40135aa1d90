"""Multi-process data parallelism: the sharded-jit step across 2 processes on localhost.

Two interpreters (``distributed_worker.py process``), each with 2 simulated CPU devices, join
one ``jax.distributed`` job (coordinator on a free localhost port; CPU collectives through
gloo) and run :func:`jaxdistill.training.make_sharded_jit_step` on the global 4-device mesh,
each process feeding its own half of the batch (15 and 30 valid tokens). Each compares the
result with its own single-device step over the whole batch. Then the same for
:func:`jaxdistill.training.make_vocab_parallel_step` on a 2 × 2 (data, model) mesh: the data axis
across the processes, each process's two devices holding half of every LM head.
"""

import socket
import subprocess

import pytest
from distill_setup import REPO_ROOT, last_json_line, python_command, worker_env

NUM_PROCESSES = 2
TIMEOUT_S = 240


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("localhost", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def reports():
    port = _free_port()
    procs = [
        subprocess.Popen(
            python_command(
                "tests/distributed_worker.py",
                "process",
                f"--process-id={i}",
                f"--num-processes={NUM_PROCESSES}",
                f"--port={port}",
            ),
            cwd=REPO_ROOT,
            env=worker_env(2),
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        for i in range(NUM_PROCESSES)
    ]
    outputs = []
    try:
        for proc in procs:
            outputs.append(proc.communicate(timeout=TIMEOUT_S))
    finally:
        for proc in procs:  # only on a timeout or error: never leave a worker behind
            if proc.poll() is None:
                proc.kill()
                proc.communicate()
    for i, (proc, (_, stderr)) in enumerate(zip(procs, outputs, strict=True)):
        assert proc.returncode == 0, f"process {i} failed:\n{stderr[-6000:]}"
    return [last_json_line(stdout) for stdout, _ in outputs]


def test_processes_form_one_job(reports):
    for i, report in enumerate(reports):
        assert report["process_id"] == i
        assert report["process_count"] == NUM_PROCESSES
        assert (report["global_devices"], report["local_devices"]) == (4, 2)
    assert [r["local_valid_tokens"] for r in reports] == [15, 30]


@pytest.mark.parametrize("process", range(NUM_PROCESSES), ids=lambda i: f"process{i}")
def test_sharded_step_equals_single_device(reports, process):
    report = reports[process]
    assert report["metrics"]["num_valid_tokens"] == report["reference"]["num_valid_tokens"] == 45
    for key in ("loss", "soft_loss", "hard_loss"):
        assert report["metrics"][key] == pytest.approx(report["reference"][key], rel=1e-6, abs=1e-7), key
    assert report["state_max_rel_diff"] < 1e-6
    assert report["collectives"] == ["all-reduce"]


@pytest.mark.parametrize("process", range(NUM_PROCESSES), ids=lambda i: f"process{i}")
def test_vocab_parallel_step_equals_single_device(reports, process):
    """Three steps of the 2-D (data, model) step across the two processes equal the single-device steps."""
    report = reports[process]["vocab"]
    assert report["mesh"] == {"data": NUM_PROCESSES, "model": 2}
    assert report["losses"] == pytest.approx(report["reference_losses"], rel=1e-6)
    assert report["state_max_rel_diff"] < 1e-5
    assert report["collectives"] == ["all-reduce"]
