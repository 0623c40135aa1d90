"""Presets and command-line flags of the demo.

A preset fixes every setting; flags given on the command line override single settings.
Bad flags or values exit with an argparse error (status 2).
"""

from __future__ import annotations

import argparse
import dataclasses
import pathlib

from jaxdistill.demo.data import CORPORA


@dataclasses.dataclass(frozen=True)
class ModelSize:
    """Shape of one :class:`~jaxdistill.transformer.TransformerLM`: one head per 64 dims (at least one), MLP 4×."""

    d_model: int
    n_layers: int

    @property
    def n_heads(self) -> int:
        return max(1, self.d_model // 64)

    @property
    def d_ff(self) -> int:
        return 4 * self.d_model


@dataclasses.dataclass(frozen=True)
class DemoConfig:
    """Every setting of one run (recorded in the report's ``metrics.json``)."""

    preset: str
    corpus: str
    vocab_size: int
    seq_len: int
    batch_size: int
    teacher: ModelSize
    student: ModelSize
    teacher_steps: int
    student_steps: int
    teacher_lr: float
    student_lr: float
    beta: float
    temperature: float
    hard_weight: float
    eval_every: int
    curve_eval_tokens: int
    eval_tokens: int
    seed: int
    out: pathlib.Path
    progress: bool = True
    # "online": the distilled student's teacher runs at every step (the default). "offline":
    # also a third student, distilled from the teacher's top-``topk`` cached in ``cache_dir``
    # (None: ``teacher-topk`` inside the report directory); see :mod:`jaxdistill.demo.cache`.
    teacher_mode: str = "online"
    topk: int | None = None
    cache_dir: pathlib.Path | None = None


# β = 0 (forward KL(teacher‖student)), T = 1 and hard weight 0.25: see the package docstring.
_LOSS = dict(beta=0.0, temperature=1.0, hard_weight=0.25)
PRESETS: dict[str, dict] = {
    # The default: about 2 minutes on an idle 2-core CPU (4 when the cores are shared).
    "cpu": dict(
        corpus="stdlib",
        vocab_size=4096,
        seq_len=64,
        batch_size=16,
        teacher=ModelSize(192, 3),
        student=ModelSize(96, 2),
        teacher_steps=600,
        student_steps=200,
        teacher_lr=2e-3,
        student_lr=2e-3,
        eval_every=20,
        curve_eval_tokens=4096,
        eval_tokens=32768,
        **_LOSS,
    ),
    # One H200: larger models, a 32k vocabulary and 4× the text (1.7 M training tokens); the teacher
    # sees it ~6 times (more would overfit: TransformerLM has no dropout), each student ~4 times.
    "gpu": dict(
        corpus="stdlib+deps",
        vocab_size=32768,
        seq_len=256,
        batch_size=32,
        teacher=ModelSize(512, 8),
        student=ModelSize(256, 4),
        teacher_steps=1200,
        student_steps=800,
        teacher_lr=1e-3,
        student_lr=1e-3,
        eval_every=50,
        curve_eval_tokens=65536,
        eval_tokens=196608,
        **_LOSS,
    ),
    # A smoke test (CI): seconds, not meaningful numbers.
    "tiny": dict(
        corpus="pydoc",
        vocab_size=512,
        seq_len=32,
        batch_size=8,
        teacher=ModelSize(32, 1),
        student=ModelSize(16, 1),
        teacher_steps=12,
        student_steps=8,
        teacher_lr=3e-3,
        student_lr=3e-3,
        eval_every=4,
        curve_eval_tokens=512,
        eval_tokens=1024,
        **_LOSS,
    ),
}


def _bounded(kind, low, high=None, *, low_inclusive=True):
    """An argparse ``type`` that parses ``kind`` and checks low ≤ (or <) value ≤ high."""

    def parse(text):
        try:
            value = kind(text)
        except ValueError:
            raise argparse.ArgumentTypeError(
                f"must be {'an integer' if kind is int else 'a number'}, got {text!r}"
            ) from None
        if value != value or (value < low if low_inclusive else value <= low) or (high is not None and value > high):
            bound = f"{'≥' if low_inclusive else '>'} {low}" + ("" if high is None else f" and ≤ {high}")
            raise argparse.ArgumentTypeError(f"must be {bound}, got {text!r}")
        return value

    parse.metavar = "N" if kind is int else "X"
    return parse


DEFAULT_TOPK = 64
CACHE_NAME = "teacher-topk"


def parse_teacher(text: str) -> tuple[str, int | None]:
    """``--teacher``: ``online`` → ("online", None); ``offline`` → ("offline", 64); ``offline:K`` → ("offline", K)."""
    mode, sep, k = text.partition(":")
    if mode == "online" and not sep:
        return "online", None
    if mode == "offline":
        if not sep:
            return "offline", DEFAULT_TOPK
        if k.isdigit() and int(k) >= 1:
            return "offline", int(k)
        raise argparse.ArgumentTypeError(f"the K of offline:K must be an integer ≥ 1, got {text!r}")
    raise argparse.ArgumentTypeError(f"must be online, offline or offline:K, got {text!r}")


def _preset_values(getter) -> str:
    """``(cpu: …, gpu: …, tiny: …)``: a setting in every preset, for the help text."""
    return "(" + ", ".join(f"{name}: {getter(settings)}" for name, settings in PRESETS.items()) + ")"


# flag → (help, type, the setting in a preset)
_PRESET_FLAGS = {
    "--teacher-steps": ("teacher optimizer steps", _bounded(int, 1), lambda p: p["teacher_steps"]),
    "--student-steps": ("optimizer steps of each student", _bounded(int, 1), lambda p: p["student_steps"]),
    "--teacher-d-model": ("teacher hidden size", _bounded(int, 1), lambda p: p["teacher"].d_model),
    "--teacher-layers": ("teacher blocks", _bounded(int, 1), lambda p: p["teacher"].n_layers),
    "--student-d-model": ("student hidden size", _bounded(int, 1), lambda p: p["student"].d_model),
    "--student-layers": ("student blocks", _bounded(int, 1), lambda p: p["student"].n_layers),
    "--batch-size": ("sequences per batch", _bounded(int, 1), lambda p: p["batch_size"]),
    "--seq-len": ("tokens per sequence", _bounded(int, 1, 4096), lambda p: p["seq_len"]),
    "--vocab-size": ("BPE vocabulary size", _bounded(int, 512, 262144), lambda p: p["vocab_size"]),
    "--corpus": (f"text: {', '.join(CORPORA)} (see jaxdistill/demo/data.py)", CORPORA, lambda p: p["corpus"]),
    "--eval-every": (
        "student steps between the held-out points of the curves",
        _bounded(int, 1),
        lambda p: p["eval_every"],
    ),
    "--eval-tokens": (
        "held-out tokens of the final evaluation (at most)",
        _bounded(int, 1),
        lambda p: p["eval_tokens"],
    ),
    "--beta": (
        "JSD β in [0, 1]: 0 forward KL(teacher‖student), 1 reverse KL",
        _bounded(float, 0.0, 1.0),
        lambda p: p["beta"],
    ),
    "--temperature": ("T > 0", _bounded(float, 0.0, 100.0, low_inclusive=False), lambda p: p["temperature"]),
    "--hard-weight": ("weight of the hard CE term", _bounded(float, 0.0, 100.0), lambda p: p["hard_weight"]),
}


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m jaxdistill.demo",
        description=(
            "Distill a small transformer LM on Python's bundled documentation: train a byte-level BPE "
            "tokenizer and a teacher, then two identical smaller students on the same batches (cross-entropy "
            "only vs. the fused JSD loss against the teacher plus hard CE), and compare them on held-out text. "
            "Writes metrics.json, summary.md and curves.png to --out."
        ),
    )
    parser.add_argument("--preset", choices=sorted(PRESETS), default="cpu", help="the settings (default: cpu)")
    parser.add_argument(
        "--out", type=pathlib.Path, metavar="DIR", help="report directory (default: reports/demo-PRESET)"
    )
    parser.add_argument(
        "--seed", type=_bounded(int, 0), default=0, metavar="N", help="model init and batch order (default: 0)"
    )
    parser.add_argument("--no-progress", action="store_true", help="no progress bars")
    parser.add_argument(
        "--teacher",
        dest="teacher_mode",
        type=parse_teacher,
        default=("online", None),
        metavar="{online,offline,offline:K}",
        help=(
            "online (default): the distilled student runs the teacher at every step; offline[:K]: also cache "
            f"the teacher's top-K next tokens (default K = {DEFAULT_TOPK}) over the training stream to disk and "
            "train a third student from the cache (jaxdistill.fused_linear_topk_distill_loss)"
        ),
    )
    parser.add_argument(
        "--cache-dir",
        type=pathlib.Path,
        metavar="DIR",
        help=f"where --teacher offline writes its cache (default: OUT/{CACHE_NAME}); replaces a previous cache there",
    )
    group = parser.add_argument_group("settings (default: the preset's value, in parentheses)")
    for flag, (help_text, kind, getter) in _PRESET_FLAGS.items():
        values = _preset_values(getter)
        if isinstance(kind, tuple):
            group.add_argument(flag, choices=kind, metavar="NAME", help=f"{help_text} {values}")
        else:
            group.add_argument(flag, type=kind, metavar=kind.metavar, help=f"{help_text} {values}")
    return parser


def parse_config(argv: list[str] | None = None) -> DemoConfig:
    """Parse ``argv`` (default: ``sys.argv[1:]``) into a :class:`DemoConfig`; exits 2 on bad input."""
    parser = build_parser()
    args = parser.parse_args(argv)
    settings = dict(PRESETS[args.preset])
    for key, value in vars(args).items():
        if key in settings and value is not None:
            settings[key] = value
    for role in ("teacher", "student"):
        size = settings[role]
        settings[role] = ModelSize(
            getattr(args, f"{role}_d_model") or size.d_model, getattr(args, f"{role}_layers") or size.n_layers
        )
    for role in ("teacher", "student"):
        size = settings[role]
        if size.d_model % size.n_heads:
            parser.error(
                f"--{role}-d-model {size.d_model} does not split into {size.n_heads} heads (one per 64 dims); "
                f"use a multiple of {size.n_heads}"
            )
    out = args.out if args.out is not None else pathlib.Path("reports") / f"demo-{args.preset}"
    if out.exists() and not out.is_dir():
        parser.error(f"--out {out} exists and is not a directory")
    teacher_mode, topk = args.teacher_mode
    if topk is not None and topk > settings["vocab_size"]:
        parser.error(f"--teacher offline:{topk}: K exceeds the vocabulary size {settings['vocab_size']}")
    if args.cache_dir is not None and teacher_mode != "offline":
        parser.error("--cache-dir applies to --teacher offline only")
    if args.cache_dir is not None and args.cache_dir.resolve().is_relative_to(out.resolve()):
        parser.error(
            f"--cache-dir {args.cache_dir} is inside --out {out}, which the report replaces; "
            f"leave --cache-dir out to keep the cache in {out / CACHE_NAME}"
        )
    return DemoConfig(
        preset=args.preset,
        seed=args.seed,
        out=out,
        progress=not args.no_progress,
        teacher_mode=teacher_mode,
        topk=topk,
        cache_dir=args.cache_dir,
        **settings,
    )
