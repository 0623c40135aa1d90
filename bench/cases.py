"""What the benchmark runs: presets, problems and cases (no JAX import; the driver uses it too)."""

from __future__ import annotations

import dataclasses
import hashlib
import importlib.util
import json

IMPLEMENTATIONS = ("matmul-floor", "matmul-floor-chunked", "xla", "pallas", "reference", "liger")
# Rows whose ratio other rows are reported against (the first one is "× floor").
FLOOR_IMPLEMENTATIONS = ("matmul-floor", "matmul-floor-chunked")
IGNORE_INDEX = -100

# The offline (cached top-k) teacher: the top-k loss at each k, on both implementations, its floor
# (the student's three matmuls alone), and the cache's maker next to its floor (the teacher's
# logits matmul alone). ``--impl topk`` selects them all, floors first.
TOPK_KS = (16, 64, 256)
TOPK_TEACHER_K = 64  # k of the ``teacher-topk`` row
STUDENT_FLOOR, TEACHER_FLOOR, TEACHER_TOPK = "matmul-floor-student", "matmul-teacher-logits", "teacher-topk"
TOPK_LOSS_IMPLEMENTATIONS = tuple(f"topk-k={k}-{impl}" for k in TOPK_KS for impl in ("xla", "pallas"))
TOPK_IMPLEMENTATIONS = (STUDENT_FLOOR, TEACHER_FLOOR, TEACHER_TOPK) + TOPK_LOSS_IMPLEMENTATIONS
ALL_IMPLEMENTATIONS = IMPLEMENTATIONS + TOPK_IMPLEMENTATIONS
IMPLEMENTATION_GROUPS = {"topk": TOPK_IMPLEMENTATIONS}  # names --impl expands
# Programs that do not depend on β or the loss weights: they compile outside the run-wide cache.
BETA_FREE_IMPLEMENTATIONS = FLOOR_IMPLEMENTATIONS + (STUDENT_FLOOR, TEACHER_FLOOR, TEACHER_TOPK)
# Rows without gradients: their time ("vg") is the call's, and they have no separate forward.
NO_GRADIENT_IMPLEMENTATIONS = (TEACHER_FLOOR, TEACHER_TOPK)
# The acceptance targets of the top-k rows: (row, its floor, the largest ratio of their medians).
TOPK_TARGETS = (
    *((f"topk-k={TOPK_TEACHER_K}-{impl}", STUDENT_FLOOR, 1.15) for impl in ("xla", "pallas")),
    (TEACHER_TOPK, TEACHER_FLOOR, 1.1),
)


def expand_implementations(names) -> list[str]:
    """``--impl`` names (implementations or groups, e.g. ``topk``) → implementations in run order."""
    chosen = {impl for name in names for impl in IMPLEMENTATION_GROUPS.get(name, (name,))}
    return [impl for impl in ALL_IMPLEMENTATIONS if impl in chosen]


def topk_of(impl: str) -> int | None:
    """k of a ``topk-k=K-IMPL`` row, or None."""
    if impl not in TOPK_LOSS_IMPLEMENTATIONS:
        return None
    return int(impl.removeprefix("topk-k=").split("-")[0])


def library_implementation(impl: str) -> str | None:
    """The ``implementation=`` a row passes to jaxdistill ("xla" or "pallas"), or None (no loss)."""
    if impl in ("xla", "pallas"):
        return impl
    if impl in TOPK_LOSS_IMPLEMENTATIONS:
        return impl.rsplit("-", 1)[1]
    return None


def own_floor(impl: str) -> str | None:
    """The floor a top-k row is reported against ("× own floor"): the student's three matmuls for
    the top-k losses (and that floor itself), the teacher's logits matmul for ``teacher-topk``."""
    if impl in TOPK_LOSS_IMPLEMENTATIONS or impl == STUDENT_FLOOR:
        return STUDENT_FLOOR
    if impl in (TEACHER_TOPK, TEACHER_FLOOR):
        return TEACHER_FLOOR
    return None


def matmul_heads(impl: str) -> tuple[int, int]:
    """(teacher, student) matmuls over (N, V) of a row: (1, 3) for the dense rows (logits of both
    heads, grad_x, grad_W), (0, 3) for the student-only rows, (1, 0) for the teacher-only ones."""
    if impl in TOPK_LOSS_IMPLEMENTATIONS or impl == STUDENT_FLOOR:
        return 0, 3
    if impl in NO_GRADIENT_IMPLEMENTATIONS:
        return 1, 0
    return 1, 3


@dataclasses.dataclass(frozen=True)
class Preset:
    """A teacher/student pair: hidden sizes, vocabulary and the default N sweep."""

    hidden_teacher: int
    hidden_student: int
    vocab: int
    sizes: tuple[int, ...]
    models: str


PRESETS = {
    "tiny": Preset(64, 32, 1000, (64, 256), "synthetic, for the CPU"),
    "llama": Preset(4096, 2048, 128256, (2048, 8192, 32768), "Llama-3.1-8B → Llama-3.2-1B"),
    "qwen": Preset(4096, 2048, 151936, (2048, 8192, 32768), "Qwen3-8B → Qwen3-1.7B"),
    "gemma": Preset(3840, 1152, 262144, (2048, 8192), "Gemma-3-12B → Gemma-3-1B"),
}


def presets_help() -> str:
    """The presets as a text table (for ``--help``): name, Ht, Hs, V, default N sweep, models."""
    head = ("preset", "Ht", "Hs", "V", "default N", "models")
    lines = [head] + [
        (name, str(p.hidden_teacher), str(p.hidden_student), str(p.vocab), ",".join(map(str, p.sizes)), p.models)
        for name, p in PRESETS.items()
    ]
    widths = [max(len(line[i]) for line in lines) for i in range(len(head) - 1)]
    return "\n".join(
        "  " + "  ".join(cell.ljust(w) for cell, w in zip(line[:-1], widths, strict=True)) + "  " + line[-1]
        for line in lines
    )


@dataclasses.dataclass(frozen=True)
class Problem:
    """Shapes, dtype and hyper-parameters of one benchmark problem (a row's ``config``)."""

    preset: str
    n: int
    hidden_teacher: int
    hidden_student: int
    vocab: int
    dtype: str = "bfloat16"
    beta: float = 0.5
    temperature: float = 1.0
    soft_weight: float = 0.5
    hard_weight: float = 0.5
    ignore_fraction: float = 0.05
    chunk_size: int | None = None
    seed: int = 0

    def flops(self, impl: str = "xla") -> int:
        """2·N·V·(Ht + 3·Hs): teacher logits, student logits, grad_x and grad_W (the dense rows);
        2·N·V·3·Hs for the student-only rows, 2·N·V·Ht for the teacher-only ones (:func:`matmul_heads`)."""
        teacher, student = matmul_heads(impl)
        return 2 * self.n * self.vocab * (teacher * self.hidden_teacher + student * self.hidden_student)

    def key(self) -> str:
        """A short name of the whole problem (shapes, inputs and hyper-parameters), for file names."""
        text = json.dumps(dataclasses.asdict(self), sort_keys=True)
        return f"{self.preset}-{self.n}-{hashlib.sha256(text.encode()).hexdigest()[:16]}"

    def loss_kwargs(self) -> dict:
        """Keyword arguments of :func:`jaxdistill.fused_linear_jsd_loss` and its reference."""
        return dict(
            beta=self.beta,
            temperature=self.temperature,
            soft_weight=self.soft_weight,
            hard_weight=self.hard_weight,
            ignore_index=IGNORE_INDEX,
        )


@dataclasses.dataclass(frozen=True)
class Case:
    """One (problem, implementation) measurement, run by one worker process."""

    problem: Problem
    impl: str
    warmup: int = 2
    iters: int = 10
    error_max_n: int = 16384
    # Directory where the float32 oracle of each problem is stored by the first worker that
    # needs it and read by the others (None: every worker computes its own).
    oracle_dir: str | None = None

    def to_json(self) -> str:
        return json.dumps(dataclasses.asdict(self))

    @classmethod
    def from_json(cls, text: str) -> Case:
        fields = json.loads(text)
        return cls(problem=Problem(**fields.pop("problem")), **fields)


def is_oom(error: BaseException | str) -> bool:
    """Whether an exception (or an error text) is an out-of-memory of XLA or torch."""
    text = error if isinstance(error, str) else f"{type(error).__name__}: {error}"
    return any(s in text for s in ("RESOURCE_EXHAUSTED", "OutOfMemoryError", "out of memory", "PlannedOOM"))


def liger_missing_reason() -> str | None:
    """Why the Liger-Kernel row cannot run here (a package is not installed), or None."""
    missing = [name for name in ("torch", "liger_kernel") if importlib.util.find_spec(name) is None]
    return f"not installed: {', '.join(missing)}" if missing else None
