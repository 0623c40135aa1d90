"""``python -m bench``: jaxdistill's fused distillation loss next to its peers — time, memory, accuracy.

Usage::

    python -m bench --preset tiny --out /tmp/bench-tiny            # CPU smoke run, about a minute
    python -m bench --preset llama:2048,8192,32768 gemma:8192 llama:65536 \\
        --impl matmul-floor matmul-floor-chunked xla pallas reference liger \\
        --beta 0 0.5 1 --time-budget 540 --out $OUT                  # H200
    python -m bench --preset llama:8192 --impl xla pallas topk --out $OUT   # + the top-k rows
    python -m bench --replot --out $OUT                             # table and plots again

``--preset NAME[:N,N,...]`` (repeatable in one list) picks a teacher/student pair (``--help``
lists them with their shapes) and the N (tokens) to sweep; without ``:N,...`` the preset's own
sweep. ``--hidden-teacher/--hidden-student/--vocab`` override the preset's shapes. ``--beta``
takes one or more β: each β is a problem of its own (its own rows, table section and plot
panels). ``--impl`` chooses among ``matmul-floor`` (the four matmuls alone),
``matmul-floor-chunked`` (the same four inside the fused path's scan over chunks, no loss math),
``xla`` and ``pallas`` (:func:`jaxdistill.fused_linear_jsd_loss`), ``reference`` (materialized
logits + autodiff) and ``liger`` (Liger-Kernel's LigerFusedLinearJSDLoss through torch; a
``skipped`` row where torch or liger-kernel is missing) — these six by default — and the
offline-teacher rows, selected by name or all at once with ``--impl topk``:
``matmul-floor-student`` (the student's three matmuls in the scan over chunks),
``matmul-teacher-logits`` (the teacher's logits matmul alone, in the same scan),
``teacher-topk`` (:func:`jaxdistill.teacher_topk` at k = 64) and ``topk-k=K-xla`` /
``topk-k=K-pallas`` for K in 16, 64, 256 (:func:`jaxdistill.fused_linear_topk_distill_loss`
against a cache made by ``teacher_topk`` from the same teacher, outside the timed calls). The
table's ``× own floor`` column and its "Top-k targets" lines give topk-k=64 over
matmul-floor-student and teacher-topk over matmul-teacher-logits. All get the same inputs and
β, T, soft/hard weights. Off a GPU, ``pallas`` and ``topk-k=K-pallas`` run their kernels in
Pallas interpret mode (an emulation: their rows say ``interpret`` and their times are not the
kernels').

Every case runs in a fresh worker process (:mod:`bench.suite`), so that its peak device memory
is its own and an out-of-memory or a crash is one row. ``--time-budget`` stops starting cases
(and cuts a running one) when the budget is spent; the remaining cases become ``skipped`` rows.
The float32 oracle of each problem is computed by its first worker that needs it and read back
by the others (files in a temporary directory, removed when the problem's cases are done).

Writes, in ``--out``: ``rows.jsonl`` (one JSON object per case, appended as each finishes, with
date, device, jax and jaxlib versions, git sha and full config), ``results.md`` (the table, one
section per β, rewritten after every row), ``time.png`` and ``memory.png`` (one line per
implementation against N, one panel per preset and β) and ``workers.log`` (the workers' output).
``--replot`` rebuilds table and plots from an existing ``rows.jsonl``. The table is printed last.

Set-up of the workers: ``XLA_PYTHON_CLIENT_PREALLOCATE=false`` (JAX and torch share the GPU in
the Liger rows) and ``XLA_PYTHON_CLIENT_MEM_FRACTION=0.95`` unless already set.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from tqdm import tqdm

from bench import common, report
from bench.cases import (
    ALL_IMPLEMENTATIONS,
    BETA_FREE_IMPLEMENTATIONS,
    IMPLEMENTATION_GROUPS,
    IMPLEMENTATIONS,
    PRESETS,
    TOPK_IMPLEMENTATIONS,
    Case,
    Problem,
    expand_implementations,
    is_oom,
    liger_missing_reason,
    presets_help,
)
from bench.common import REPO_ROOT, HelpFormatter, add_git_sha_flag

MIN_CASE_START_S = 15.0  # with less budget than this left, no new case is started
WORKER_ENV_DEFAULTS = {"XLA_PYTHON_CLIENT_PREALLOCATE": "false", "XLA_PYTHON_CLIENT_MEM_FRACTION": "0.95"}


def parse_preset(spec: str) -> tuple[str, tuple[int, ...] | None]:
    """``"llama:2048,8192"`` → ("llama", (2048, 8192)); ``"tiny"`` → ("tiny", None)."""
    name, _, sizes = spec.partition(":")
    if name not in PRESETS:
        raise argparse.ArgumentTypeError(f"unknown preset {name!r}; choose from {', '.join(PRESETS)}")
    if not sizes:
        return name, None
    try:
        ns = tuple(int(s) for s in sizes.split(","))
    except ValueError:
        raise argparse.ArgumentTypeError(f"bad N list in {spec!r}: expected NAME:N,N,...") from None
    if any(n <= 0 for n in ns):
        raise argparse.ArgumentTypeError(f"N must be positive in {spec!r}")
    return name, ns


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m bench",
        description=__doc__.split("\n")[0],
        epilog="presets (--preset NAME or NAME:N,N,...; Ht/Hs = teacher/student hidden size):\n" + presets_help(),
        formatter_class=HelpFormatter,
    )
    parser.add_argument("--out", type=Path, required=True, help="output directory (created)")
    parser.add_argument(
        "--preset",
        type=parse_preset,
        nargs="+",
        default=[("tiny", None)],
        metavar="NAME[:N,...]",
        help="presets (listed below) and the N to sweep (default: tiny with its own N)",
    )
    parser.add_argument(
        "--impl",
        nargs="+",
        choices=ALL_IMPLEMENTATIONS + tuple(IMPLEMENTATION_GROUPS),
        default=list(IMPLEMENTATIONS),
        metavar="IMPL",
        help=f"implementations, run in this order: {', '.join(ALL_IMPLEMENTATIONS)}; `topk` stands for the "
        f"{len(TOPK_IMPLEMENTATIONS)} offline-teacher rows from {TOPK_IMPLEMENTATIONS[0]} on "
        f"(default: the six dense ones, {', '.join(IMPLEMENTATIONS)}; no top-k row)",
    )
    parser.add_argument("--dtype", choices=("bfloat16", "float32"), default="bfloat16", help="inputs' dtype")
    parser.add_argument(
        "--beta",
        type=float,
        nargs="+",
        default=[0.5],
        metavar="BETA",
        help="JSD β in [0, 1]; several values give a set of rows per β (default: 0.5)",
    )
    parser.add_argument("--temperature", type=float, default=1.0, help="softmax temperature T of the soft loss")
    parser.add_argument("--soft-weight", type=float, default=0.5, help="weight of the JSD (soft) loss")
    parser.add_argument("--hard-weight", type=float, default=0.5, help="weight of the cross-entropy (hard) loss")
    parser.add_argument("--ignore-fraction", type=float, default=0.05, help="fraction of tokens with ignored labels")
    parser.add_argument(
        "--chunk-size",
        type=int,
        default=None,
        help="rows per chunk of the chunked implementations (default: jaxdistill.default_chunk_size(V))",
    )
    parser.add_argument("--hidden-teacher", type=int, default=None, help="override Ht (default: the preset's)")
    parser.add_argument("--hidden-student", type=int, default=None, help="override Hs (default: the preset's)")
    parser.add_argument("--vocab", type=int, default=None, help="override V (default: the preset's)")
    parser.add_argument("--seed", type=int, default=0, help="seed of the inputs (the same in every case)")
    parser.add_argument("--warmup", type=int, default=2, help="untimed calls before the timed ones")
    parser.add_argument("--iters", type=int, default=10, help="timed calls per measurement (>= 10)")
    parser.add_argument(
        "--error-max-n", type=int, default=16384, help="compute errors against the float32 reference up to this N"
    )
    parser.add_argument("--time-budget", type=float, default=None, help="seconds for the whole run (default: none)")
    parser.add_argument("--case-timeout", type=float, default=600.0, help="seconds for one case")
    add_git_sha_flag(parser)
    parser.add_argument("--append", action="store_true", help="keep the rows already in --out")
    parser.add_argument("--replot", action="store_true", help="only rebuild table and plots from --out's rows")
    return parser


def build_cases(args) -> list[Case]:
    """Cases in run order: for each β (as given), presets and N as given, within each problem the
    implementations in canonical order (``--impl`` groups such as ``topk`` expanded).

    The matmul floors go first in each problem (the top-k floors first among the top-k rows) so
    that later rows can report their ratio to them; the cases of one problem are consecutive (the
    float32 oracle is kept for one problem at a time).
    """
    impls = expand_implementations(args.impl)
    cases = []
    for beta, name, sizes in ((b, *p) for b in dict.fromkeys(args.beta) for p in args.preset):
        preset = PRESETS[name]
        for n in sizes or preset.sizes:
            problem = Problem(
                preset=name,
                n=n,
                hidden_teacher=args.hidden_teacher or preset.hidden_teacher,
                hidden_student=args.hidden_student or preset.hidden_student,
                vocab=args.vocab or preset.vocab,
                dtype=args.dtype,
                beta=beta,
                temperature=args.temperature,
                soft_weight=args.soft_weight,
                hard_weight=args.hard_weight,
                ignore_fraction=args.ignore_fraction,
                chunk_size=args.chunk_size,
                seed=args.seed,
            )
            cases += [
                Case(problem, impl, warmup=args.warmup, iters=args.iters, error_max_n=args.error_max_n)
                for impl in impls
            ]
    return cases


class Runner:
    """Runs cases in worker processes within a time budget; kills the running worker on demand."""

    def __init__(
        self,
        out_dir: Path,
        time_budget: float | None,
        case_timeout: float,
        compilation_cache_dir: str | None = None,
        oracle_dir: str | None = None,
    ):
        self.out_dir = out_dir
        self.deadline = None if time_budget is None else time.monotonic() + time_budget
        self.case_timeout = case_timeout
        self.oracle_dir = oracle_dir  # the workers' store of float32 oracles (see bench.suite)
        self.process: subprocess.Popen | None = None
        self.env = {**WORKER_ENV_DEFAULTS, **os.environ}
        self.cache_env = {}
        if compilation_cache_dir is not None:
            # Executables shared by the workers of a run (input generator, float32 oracle) compile
            # once. Each measured program is compiled by one worker only, so its compile time stays
            # cold; XLA's autotuning cache is left off so that no implementation inherits another's.
            self.cache_env = dict(
                JAX_COMPILATION_CACHE_DIR=compilation_cache_dir,
                JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS="0",
                JAX_PERSISTENT_CACHE_ENABLE_XLA_CACHES="none",
            )

    def worker_env(self, case: Case) -> dict:
        """The environment of the case's worker: with the run-wide compilation cache, except for
        the floors and ``teacher-topk``. Their programs do not depend on β or the loss weights, so
        with the cache the row of every β after the first would load the first one's executable
        and report no compile time; they need no oracle, so the cache would save them nothing else."""
        return self.env if case.impl in BETA_FREE_IMPLEMENTATIONS else {**self.env, **self.cache_env}

    def remaining(self) -> float | None:
        return None if self.deadline is None else self.deadline - time.monotonic()

    def kill(self) -> None:
        """Ends the running worker and its children (its own process group)."""
        if self.process is not None and self.process.poll() is None:
            try:
                os.killpg(self.process.pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
            self.process.wait()

    def forget_other_oracles(self, problem: Problem) -> None:
        """Deletes the stored oracles of every problem but ``problem`` (the cases of a problem are
        consecutive, so an earlier problem's oracle is not read again; each can be GBs)."""
        if self.oracle_dir is None:
            return
        for path in Path(self.oracle_dir).iterdir():
            if not path.name.startswith(problem.key() + "."):
                path.unlink(missing_ok=True)

    def run(self, case: Case) -> dict:
        """The measured part of the case's row (status ok, OOM, error, timeout or skipped)."""
        self.forget_other_oracles(case.problem)
        case = dataclasses.replace(case, oracle_dir=self.oracle_dir)
        if case.impl == "liger" and (reason := liger_missing_reason()):
            return {"status": "skipped", "reason": reason}
        remaining = self.remaining()
        if remaining is not None and remaining < MIN_CASE_START_S:
            return {"status": "skipped", "reason": "time budget spent"}
        timeout = self.case_timeout if remaining is None else min(self.case_timeout, remaining)
        with tempfile.TemporaryDirectory() as tmp, open(self.out_dir / "workers.log", "a") as log:
            result_path = Path(tmp) / "row.json"
            log.write(f"==== {case_name(case)}\n")
            log.flush()
            self.process = subprocess.Popen(
                [sys.executable, "-m", "bench.suite", case.to_json(), str(result_path)],
                cwd=REPO_ROOT,
                env=self.worker_env(case),
                stdout=log,
                stderr=subprocess.STDOUT,
                process_group=0,  # a group of its own, in this session: killable as one, ends with the run
            )
            try:
                code = self.process.wait(timeout=timeout)
            except subprocess.TimeoutExpired:
                self.kill()
                return {"status": "timeout", "reason": f"killed after {timeout:.0f} s"}
            except BaseException:  # interrupted (Ctrl-C, SIGTERM): take the worker down too
                self.kill()
                raise
            finally:
                self.process = None
            if result_path.exists():
                return json.loads(result_path.read_text())
        tail = _tail(self.out_dir / "workers.log")
        status = "OOM" if is_oom(tail) else "error"
        return {"status": status, "reason": f"worker exited with code {code}: {tail[-400:]}"}


def _tail(path: Path, n_bytes: int = 4000) -> str:
    with open(path, "rb") as f:
        f.seek(max(0, f.seek(0, os.SEEK_END) - n_bytes))
        return f.read().decode(errors="replace")


def case_name(case: Case) -> str:
    return f"{case.problem.preset} N={case.problem.n} β={case.problem.beta:g} {case.impl}"


def summary_line(row: dict) -> str:
    config = row["config"]
    head = f"{config['preset']:>6} N={config['n']:<6} β={config['beta']:<4g} {row['impl']:<21}"
    if row["status"] != "ok":
        return f"{head} {row['status']}: {(row.get('reason') or '')[:150]}"
    ratio, own = row.get("ratio_to_floor"), row.get("ratio_to_own_floor")
    extra = row["memory"].get("extra_bytes")
    fwd = row.get("fwd_ms")
    return (
        f"{head} vg {row['vg_ms']['median']:9.3f} ms  fwd "
        + ("        -" if fwd is None else f"{fwd['median']:9.3f}")
        + " ms"
        + (f"  ×floor {ratio:.2f}" if ratio else "")
        + (f"  ×own floor {own:.2f}" if own else "")
        + (f"  +peak {extra / 1e9:.2f} GB" if extra is not None else "")
        + (f"  grad_W err {row['errors']['grad_w_rel']:.1e}" if "grad_w_rel" in row.get("errors", {}) else "")
    )


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.iters < 10:
        parser.error("--iters must be at least 10")
    if not all(0.0 <= beta <= 1.0 for beta in args.beta):
        parser.error(f"--beta must be in [0, 1], got {args.beta}")
    out_dir: Path = args.out
    out_dir.mkdir(parents=True, exist_ok=True)
    if args.replot:
        print(report.render(out_dir))
        return 0
    if not args.append:
        for name in (report.ROWS_FILE, "workers.log"):
            (out_dir / name).unlink(missing_ok=True)

    meta = {"date": common.utc_now(), "git_sha": args.git_sha or common.git_sha()}
    with (
        tempfile.TemporaryDirectory(prefix="bench-jax-cache-") as cache_dir,
        tempfile.TemporaryDirectory(prefix="bench-oracles-") as oracle_dir,
    ):
        runner = Runner(
            out_dir, args.time_budget, args.case_timeout, compilation_cache_dir=cache_dir, oracle_dir=oracle_dir
        )
        completed = run_cases(build_cases(args), runner, out_dir, meta)
    print(report.render(out_dir))
    return 0 if completed else 130


def run_cases(cases: list[Case], runner: Runner, out_dir: Path, meta: dict) -> bool:
    """Runs the cases with a progress bar, writing each row as it lands; False if interrupted."""

    def on_sigterm(signum, frame):
        raise KeyboardInterrupt

    previous_handler = signal.signal(signal.SIGTERM, on_sigterm)
    rows = report.read_rows(out_dir)
    progress = tqdm(cases, desc="bench", unit="case", dynamic_ncols=True, file=sys.stderr)
    try:
        for case in progress:
            progress.set_postfix_str(case_name(case))
            start = time.monotonic()
            measured = runner.run(case)
            row = {
                "schema": 1,
                **meta,
                "impl": case.impl,
                "config": {**dataclasses.asdict(case.problem), "warmup": case.warmup, "iters": case.iters},
                "memory": {},
                "errors": {},
                **measured,
                "wall_s": round(time.monotonic() - start, 2),
            }
            row["ratio_to_floor"] = report.ratio_to_floor(row, report.floor_medians(rows + [row]))
            row["ratio_to_chunked_floor"] = report.ratio_to_floor(
                row, report.floor_medians(rows + [row], impl="matmul-floor-chunked")
            )
            row["ratio_to_own_floor"] = report.ratio_to_own_floor(row, report.own_floors(rows + [row]))
            rows.append(row)
            report.append_row(out_dir, row)
            (out_dir / report.TABLE_FILE).write_text(report.markdown(rows))
            progress.write(summary_line(row))
    except KeyboardInterrupt:
        return False
    finally:
        progress.close()
        signal.signal(signal.SIGTERM, previous_handler)
    return True


if __name__ == "__main__":
    sys.exit(main())
