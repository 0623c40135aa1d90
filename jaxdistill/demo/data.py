"""Corpus, tokenizer and batches of the demo: English text that every Python installation has.

The corpus is documentation that ships with the code, so the demo needs no download:

- ``"pydoc"``: ``pydoc_data.topics``, the Language Reference sections that ``help("if")``
  prints (0.37 M characters after de-duplication);
- ``"stdlib"`` adds the docstrings of the standard library's modules, classes and functions
  (read with ``ast`` from the ``.py`` sources; ``test``/``idlelib``/``site-packages`` are
  skipped): 1.9 M characters in all on Python 3.11;
- ``"stdlib+deps"`` also adds the docstrings of the demo's own dependencies (numpy, jax,
  flax, optax, matplotlib), which every machine that runs the demo has: about 4× more text,
  for the larger GPU models.

The texts are split into paragraphs and de-duplicated (pydoc topics repeat each other:
``compound`` contains ``if``), so no held-out paragraph also appears in the training text.
Paragraphs go to the held-out set in contiguous blocks (every ``1/heldout_fraction``-th block
of ``BLOCK_PARAGRAPHS``), so held-out text is whole passages. The split does not depend on the
seed: runs with different seeds are evaluated on the same text.
"""

from __future__ import annotations

import ast
import dataclasses
import importlib
import os
import re
import sys
import sysconfig
import warnings

import numpy as np
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

CORPORA = ("pydoc", "stdlib", "stdlib+deps")
DEPENDENCIES = ("numpy", "jax", "flax", "optax", "matplotlib")
EOS = "<|endoftext|>"
BLOCK_PARAGRAPHS = 16
_SKIPPED_DIRS = {"test", "tests", "idlelib", "site-packages", "dist-packages", "lib2to3", "__pycache__"}


def pydoc_topics() -> list[str]:
    """The pydoc topic texts (Python's Language Reference sections), in sorted-key order."""
    from pydoc_data.topics import topics

    return [topics[key] for key in sorted(topics)]


def docstrings(directory: str) -> list[str]:
    """Docstrings of the modules, classes and functions of the ``.py`` files under ``directory``, in path order."""
    texts = []
    for root, dirs, files in os.walk(directory):
        dirs[:] = sorted(d for d in dirs if d not in _SKIPPED_DIRS and not d.startswith("."))
        for name in sorted(files):
            if not name.endswith(".py"):
                continue
            try:
                with open(os.path.join(root, name), encoding="utf-8") as f, warnings.catch_warnings():
                    warnings.simplefilter("ignore")  # e.g. SyntaxWarning: invalid escape sequence
                    tree = ast.parse(f.read())
            except (OSError, SyntaxError, UnicodeDecodeError, ValueError):
                continue
            for node in ast.walk(tree):
                if isinstance(node, ast.Module | ast.ClassDef | ast.FunctionDef | ast.AsyncFunctionDef):
                    doc = ast.get_docstring(node)
                    if doc:
                        texts.append(doc)
    return texts


def unique_paragraphs(texts: list[str]) -> list[str]:
    """Blank-line-separated paragraphs of ``texts``, stripped, first occurrence of each kept."""
    seen, paragraphs = set(), []
    for text in texts:
        for paragraph in re.split(r"\n\s*\n", text):
            paragraph = paragraph.strip()
            if paragraph and paragraph not in seen:
                seen.add(paragraph)
                paragraphs.append(paragraph)
    return paragraphs


@dataclasses.dataclass(frozen=True)
class Corpus:
    """Train and held-out paragraphs, and where they came from."""

    train: list[str]
    heldout: list[str]
    description: str

    def stats(self) -> dict:
        return {
            "source": self.description,
            "python": sys.version.split()[0],
            "train_paragraphs": len(self.train),
            "heldout_paragraphs": len(self.heldout),
            "train_chars": sum(map(len, self.train)),
            "heldout_chars": sum(map(len, self.heldout)),
        }


def load_corpus(name: str = "stdlib", heldout_fraction: float = 0.1) -> Corpus:
    """The corpus ``name`` (one of :data:`CORPORA`), split into train and held-out paragraphs (see module doc)."""
    if name not in CORPORA:
        raise ValueError(f"unknown corpus {name!r}; choose one of {CORPORA}")
    texts = pydoc_topics()
    description = "CPython's bundled docs: pydoc_data.topics"
    if name != "pydoc":
        texts += docstrings(sysconfig.get_paths()["stdlib"])
        description += " + standard-library docstrings"
    if name == "stdlib+deps":
        for package in DEPENDENCIES:
            texts += docstrings(os.path.dirname(importlib.import_module(package).__file__))
        description += " + docstrings of " + ", ".join(DEPENDENCIES)
    period = max(2, round(1 / heldout_fraction))
    train, heldout = [], []
    for i, paragraph in enumerate(unique_paragraphs(texts)):
        (heldout if (i // BLOCK_PARAGRAPHS) % period == period - 1 else train).append(paragraph)
    return Corpus(train=train, heldout=heldout, description=description + " (unique paragraphs)")


def train_tokenizer(paragraphs: list[str], vocab_size: int) -> Tokenizer:
    """A byte-level BPE tokenizer (GPT-2 style: no unknown tokens) trained on ``paragraphs``.

    The vocabulary holds the 256 byte symbols, the ``<|endoftext|>`` separator and the learned
    merges; it can come out smaller than ``vocab_size`` if the text has too few distinct pairs.
    """
    tokenizer = Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=[EOS],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tokenizer.train_from_iterator(paragraphs, trainer=trainer)
    return tokenizer


def encode(tokenizer: Tokenizer, paragraphs: list[str]) -> np.ndarray:
    """One int32 token stream: the paragraphs, each followed by ``<|endoftext|>``."""
    eos = tokenizer.token_to_id(EOS)
    ids = []
    for encoding in tokenizer.encode_batch(paragraphs):
        ids.extend(encoding.ids)
        ids.append(eos)
    return np.asarray(ids, dtype=np.int32)


class CorpusTooShortError(ValueError):
    """The token stream is shorter than one training or evaluation window."""


def batch_starts(n_tokens: int, *, steps: int, batch_size: int, seq_len: int, seed: int) -> np.ndarray:
    """(steps, batch_size) random window starts in a stream of ``n_tokens`` tokens.

    A window is ``seq_len + 1`` tokens (inputs and their next-token labels), so the starts are
    uniform over 0 … n_tokens − seq_len − 1, both ends included. Drawn once from ``seed``, so
    every model trained with the same seed sees the same batches.
    """
    if n_tokens < seq_len + 1:
        raise CorpusTooShortError(f"the training stream ({n_tokens} tokens) is shorter than one window ({seq_len + 1})")
    rng = np.random.default_rng(seed)
    return rng.integers(0, n_tokens - seq_len, size=(steps, batch_size))


def windows(tokens: np.ndarray, starts: np.ndarray, seq_len: int) -> tuple[np.ndarray, np.ndarray]:
    """Inputs and next-token labels, both (*starts.shape, seq_len) int32, at the given starts."""
    index = starts[..., None] + np.arange(seq_len + 1)
    window = tokens[index]
    return window[..., :-1], window[..., 1:]


def heldout_windows(tokens: np.ndarray, seq_len: int, max_windows: int | None = None) -> tuple[np.ndarray, np.ndarray]:
    """Non-overlapping (n, seq_len) input/label windows covering the held-out stream in order."""
    n = (len(tokens) - 1) // seq_len
    if max_windows is not None:
        n = min(n, max_windows)
    if n < 1:
        raise CorpusTooShortError(
            f"the held-out stream ({len(tokens)} tokens) is shorter than one window ({seq_len + 1})"
        )
    return windows(tokens, np.arange(n) * seq_len, seq_len)
