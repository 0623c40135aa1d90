"""The demo's offline teacher: the teacher's top-k next tokens over the training stream, on disk.

``--teacher offline[:K]`` runs the trained teacher once over every batch that the distilled
student will see (the same windows, in the same order), keeps the K most likely next tokens of
softmax(z_t/T) at each position (:func:`jaxdistill.teacher_topk`) and writes them here. The
offline-distilled student then trains from this directory alone, with
:func:`jaxdistill.fused_linear_topk_distill_loss`; no teacher runs during its training.

A cache is a directory of three files:

- ``ids.int32``: (steps, batch, seq_len, k) int32 token ids, raw little-endian (a ``numpy.memmap``);
- ``logprobs.float32``: (steps, batch, seq_len, k) float32 log-probabilities of those ids at
  temperature T, in descending order;
- ``header.json``: the format, k, T, the vocabulary size, each file's shape and dtype, the
  identity of what was cached (preset, corpus, tokenizer, training stream, teacher) and
  provenance (git commit, build time).

:func:`build` writes the files into a hidden sibling directory and renames it into place after
``header.json`` is written, so a cache directory is complete or absent. :func:`open_cache`
checks the header against what the caller expects (:func:`expected_header`) and the file sizes
against the header before mapping the files; any difference raises :class:`CacheMismatchError`
naming each field.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import pathlib
import shutil
import subprocess
import tempfile
import time

import jax
import numpy as np
from flax import nnx
from tqdm import tqdm

from jaxdistill.demo import data
from jaxdistill.topk import teacher_topk

FORMAT = "jaxdistill-demo-topk-cache/1"
HEADER = "header.json"
# field → dtype; the file of a field is named f"{field}.{dtype}".
FIELDS = {"ids": np.dtype(np.int32), "logprobs": np.dtype(np.float32)}
# Header entries that record provenance only; every other entry must match the expected header.
PROVENANCE = ("git_sha", "created", "build_seconds")


class CacheMismatchError(ValueError):
    """A cache directory is missing, incomplete, or was made for other settings than the run's."""


def file_name(field: str) -> str:
    """``ids.int32``, ``logprobs.float32``."""
    return f"{field}.{FIELDS[field].name}"


def sha256_of_arrays(*arrays) -> str:
    """SHA-256 of the arrays' dtypes, shapes and bytes (C order), in order."""
    digest = hashlib.sha256()
    for array in arrays:
        array = np.ascontiguousarray(array)
        digest.update(f"{array.dtype.str}{array.shape}".encode())
        digest.update(array.tobytes())
    return digest.hexdigest()


def params_sha256(model: nnx.Module) -> str:
    """SHA-256 of a module's ``nnx.Param`` leaves (tree order): the identity of a trained teacher."""
    return sha256_of_arrays(*jax.device_get(jax.tree.leaves(nnx.state(model, nnx.Param))))


def git_sha() -> str | None:
    """The commit of the checkout this package runs from, or None outside a git checkout."""
    try:
        result = subprocess.run(
            ["git", "rev-parse", "HEAD"],
            cwd=pathlib.Path(__file__).resolve().parent,
            capture_output=True,
            text=True,
            timeout=10,
            check=False,
        )
    except (OSError, subprocess.SubprocessError):
        return None
    if result.returncode != 0:
        return None
    return result.stdout.strip() or None


def expected_header(
    *, k: int, temperature: float, vocab_size: int, steps: int, batch_size: int, seq_len: int, identity: dict
) -> dict:
    """The header a cache of these settings must have, provenance (:data:`PROVENANCE`) left out.

    ``identity``: JSON-serializable description of what was cached (in the demo: preset, corpus,
    tokenizer and training-stream hashes, the teacher's settings and parameter hash).
    """
    shape = [steps, batch_size, seq_len, k]
    return {
        "format": FORMAT,
        "k": k,
        "temperature": float(temperature),
        "vocab_size": vocab_size,
        "layout": "(steps, batch, seq_len, k): the top-k of log softmax(z_t / T) per position, descending",
        "fields": {
            field: {"file": file_name(field), "dtype": dtype.name, "shape": shape} for field, dtype in FIELDS.items()
        },
        "identity": identity,
    }


@dataclasses.dataclass(frozen=True)
class TopKCache:
    """An opened cache: the header and read-only memmaps of the two fields."""

    directory: pathlib.Path
    header: dict
    ids: np.memmap
    logprobs: np.memmap

    def batch(self, step: int) -> dict[str, np.ndarray]:
        """The teacher's top-k of training step ``step``: ``teacher_ids``, ``teacher_logprobs`` (batch, seq_len, k)."""
        return {"teacher_ids": np.asarray(self.ids[step]), "teacher_logprobs": np.asarray(self.logprobs[step])}

    def file_sizes(self) -> dict[str, int]:
        """Bytes of each file of the cache, ``header.json`` included."""
        names = [HEADER] + [file_name(field) for field in FIELDS]
        return {name: (self.directory / name).stat().st_size for name in names}

    def mean_mass(self) -> float:
        """The teacher's mean probability mass in the cached ids, Σ_i P_i averaged over the positions
        (1 − this is the mean mass of the tail bucket)."""
        flat = self.logprobs.reshape(-1, self.logprobs.shape[-1])
        step = 1 << 16
        total = sum(float(np.exp(flat[i : i + step], dtype=np.float64).sum()) for i in range(0, len(flat), step))
        return total / len(flat)

    @property
    def nbytes(self) -> int:
        """Bytes on disk (the sum of :meth:`file_sizes`)."""
        return sum(self.file_sizes().values())


def _differences(expected, found, path: str = "") -> list[str]:
    """``"path: expected …, cache has …"`` for every leaf where two JSON trees differ."""
    if isinstance(expected, dict) and isinstance(found, dict):
        lines = []
        for key in expected.keys() | found.keys():
            where = f"{path}.{key}" if path else key
            if key not in found:
                lines.append(f"{where}: expected {expected[key]!r}, missing from the cache")
            elif key not in expected:
                if not path and key in PROVENANCE:
                    continue
                lines.append(f"{where}: not expected, cache has {found[key]!r}")
            else:
                lines += _differences(expected[key], found[key], where)
        return sorted(lines)
    if expected != found:
        return [f"{path}: expected {expected!r}, cache has {found!r}"]
    return []


def open_cache(directory: os.PathLike, expected: dict) -> TopKCache:
    """Open the cache in ``directory``, checked against ``expected`` (from :func:`expected_header`).

    Every header entry except :data:`PROVENANCE` must equal ``expected``, and each file must hold
    exactly its header's shape and dtype.

    Raises:
      CacheMismatchError: no readable header, a header that differs from ``expected`` (the
        message lists every differing field), or a file of the wrong size.
    """
    directory = pathlib.Path(directory)
    try:
        header = json.loads((directory / HEADER).read_text())
    except FileNotFoundError:
        raise CacheMismatchError(f"{directory} is not a top-k teacher cache: it has no {HEADER}") from None
    except (OSError, ValueError) as error:
        raise CacheMismatchError(f"{directory / HEADER} cannot be read as JSON: {error}") from None
    differences = _differences(expected, header)
    if differences:
        raise CacheMismatchError(
            f"the top-k teacher cache in {directory} does not match this run:\n  "
            + "\n  ".join(differences)
            + "\nit was made for other settings: use another cache directory, or delete this one to rebuild it"
        )
    arrays = {}
    for field, dtype in FIELDS.items():
        spec = header["fields"][field]
        path, shape = directory / spec["file"], tuple(spec["shape"])
        size = int(np.prod(shape)) * dtype.itemsize
        actual = path.stat().st_size if path.exists() else None
        if actual != size:
            raise CacheMismatchError(
                f"{path} should hold {shape} {dtype.name} ({size:,} bytes), "
                + ("but it is missing" if actual is None else f"but it has {actual:,} bytes")
            )
        arrays[field] = np.memmap(path, dtype=dtype.newbyteorder("<"), mode="r", shape=shape)
    return TopKCache(directory=directory, header=header, **arrays)


@nnx.jit(static_argnames=("k", "temperature"))
def _teacher_topk_batch(teacher, inputs, *, k: int, temperature: float):
    """The teacher's top-k of log softmax(z_t/T) on (B, L) tokens: (B, L, k) ids and log-probs."""
    head = teacher.lm_head
    return teacher_topk(
        teacher.hidden_states(inputs),
        head.weight,
        k,
        teacher_bias=head.bias,
        temperature=temperature,
        weight_layout=head.layout,
    )


def _replace_directory(staging: pathlib.Path, directory: pathlib.Path) -> None:
    """Rename ``staging`` to ``directory``, replacing a previous cache there (never any other directory)."""
    if directory.exists():
        if not directory.is_dir() or (any(directory.iterdir()) and not (directory / HEADER).exists()):
            raise FileExistsError(
                f"{directory} exists and is not a top-k teacher cache (no {HEADER}); not replacing it"
            )
        previous = pathlib.Path(tempfile.mkdtemp(prefix=f".{directory.name}.old-", dir=directory.parent))
        os.replace(directory, previous / directory.name)
        os.replace(staging, directory)
        shutil.rmtree(previous)
    else:
        os.replace(staging, directory)


def build(
    directory: os.PathLike,
    teacher,
    tokens: np.ndarray,
    starts: np.ndarray,
    *,
    seq_len: int,
    k: int,
    temperature: float,
    identity: dict,
    progress: bool = False,
) -> TopKCache:
    """Cache ``teacher``'s top-k on every training batch and return the cache, opened and checked.

    Args:
      directory: where the cache goes; a previous cache there is replaced (any other existing,
        non-empty directory is an error). The files are written into a hidden sibling directory
        that is renamed into place once complete.
      teacher: the trained :class:`~jaxdistill.transformer.TransformerLM` (frozen).
      tokens, starts: the training stream and the (steps, batch) window starts of the student's
        batches (:func:`jaxdistill.demo.data.batch_starts`); step i of the cache is batch i.
      seq_len: tokens per window. k: cached tokens per position. temperature: T of softmax(z_t/T),
        the distillation temperature.
      identity: the header's ``identity`` (see :func:`expected_header`).
      progress: show a progress bar.

    Returns:
      :func:`open_cache` of the new directory against the header just written.
    """
    directory = pathlib.Path(directory)
    begin = time.perf_counter()
    steps, batch_size = starts.shape
    header = expected_header(
        k=k,
        temperature=temperature,
        vocab_size=teacher.lm_head.vocab_size,
        steps=steps,
        batch_size=batch_size,
        seq_len=seq_len,
        identity=identity,
    )
    shape = (steps, batch_size, seq_len, k)
    directory.parent.mkdir(parents=True, exist_ok=True)
    staging = pathlib.Path(tempfile.mkdtemp(prefix=f".{directory.name}.tmp-", dir=directory.parent))
    try:
        staging.chmod(0o755)  # mkdtemp makes it private
        files = {
            field: np.memmap(staging / file_name(field), dtype=dtype.newbyteorder("<"), mode="w+", shape=shape)
            for field, dtype in FIELDS.items()
        }

        def compute(step):
            inputs, _ = data.windows(tokens, starts[step], seq_len)
            return _teacher_topk_batch(teacher, inputs, k=k, temperature=float(temperature))

        with tqdm(total=steps, desc=f"teacher top-{k} cache", unit="batch", disable=not progress) as bar:
            pending = compute(0)
            for step in range(steps):
                ready, pending = pending, (compute(step + 1) if step + 1 < steps else None)  # one batch ahead
                files["ids"][step] = np.asarray(ready.ids)
                files["logprobs"][step] = np.asarray(ready.logprobs)
                bar.update(1)
        for array in files.values():
            array.flush()
        del files
        provenance = {
            "git_sha": git_sha(),
            "created": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
            "build_seconds": time.perf_counter() - begin,
        }
        (staging / HEADER).write_text(json.dumps({**header, **provenance}, indent=2) + "\n")
        _replace_directory(staging, directory)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    return open_cache(directory, header)
