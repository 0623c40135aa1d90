"""How sparse are the distillation loss's logit gradients, in the tiles of the gradient matmuls?

    python -m bench.gradient_sparsity --source demo --preset cpu --out DIR   # the demo's trained models
    python -m bench.gradient_sparsity --source zipf --out DIR                # synthetic, llama vocabulary

The two gradient matmuls of the LM head (grad_x = dlogits · Wᵀ and grad_W = xᵀ · dlogits) read the
dlogits in (row block × vocabulary block) tiles. A tile whose entries are all negligible next to
the largest |dlogit| of their rows could be skipped. This script measures how many such tiles a
trained model's gradients have.

**dlogits.** Exactly the library's: :func:`jaxdistill.rowmath.distill_rows` (the whole-row
contract of the row kernel) on float32 logits, i.e. per row
dlogits = soft_weight/T · ∂JSD_β/∂s' + hard_weight · (softmax(z_s) − onehot(y)), in float32
(the criterion below is relative to each row's maximum, so the 1/N scale of ``"mean"`` drops out).
For each β in {0, 0.5, 1} it is measured with the demo's weights (soft 1, hard 0.25 at the
demo's T) and with the soft term alone (hard 0).

**Tiles.** The rows are the held-out tokens in order (the row blocks of a chunk are consecutive
tokens), cut into blocks of 128 rows; the vocabulary into blocks of 256 columns (the last one
padded with zeros where V is not a multiple of 256). A (128 × 256) tile is *skippable at ε* when,
for every one of its rows r, max_{j in tile} |dlogits[r, j]| < ε · max_j |dlogits[r, j]| (an
all-zero row, an ignored token, counts as negligible everywhere). Reported for
ε ∈ {2⁻⁸, 2⁻¹², 2⁻¹⁶}: the fraction of skippable tiles; the same fraction for (1 × 256) tiles
(one row alone: the bound that no row-block size can beat); and per row the number of
vocabulary entries with |dlogits| ≥ ε · max (median, 10th and 90th percentiles).

**Vocabulary order.** Tile skipping depends on where in the vocabulary a row's large entries
lie. A BPE tokenizer numbers its tokens in merge order, so frequent tokens have low ids and
the large entries of many rows share the low tiles. Every measurement is also made with the
vocabulary columns in a fixed random order (one permutation for all rows: a relabelling of the
vocabulary, which the loss does not see), and the difference is the effect of the tokenizer's
order.

**Sources.** ``--source demo`` trains the demo's teacher and both students with
:func:`jaxdistill.demo.run.run` at ``--preset`` and measures on the held-out windows of its final
evaluation: the distilled student, the CE-only student and the student at initialization (the
same init as both, ``make_model(config.student, seed=config.seed + 1)``). It also fits the
parameters of the synthetic generator to the teacher and the distilled student
(:func:`fit_calibration`). ``--source zipf`` draws teacher and student logits from that generator
(:func:`zipf_logits`; the fit of ``--calibration``, a ``sparsity-demo.json``, or by default
:data:`DEFAULT_CALIBRATION`, the committed CPU run's) and measures them the same way: at the
fit's own V (to compare with the real models), then at llama's vocabulary (V = 128256) in the
variants of :data:`ZIPF_VARIANTS` (the id clustering kept in ids or scaled with V; the teacher as
fitted or twice as sharp).

On one H200, ``--source demo --preset gpu`` takes about 3.5 minutes (demo 140 s, measurement and
fit 53 s); on a 2-core CPU ``--preset cpu`` about 13 minutes and ``--source zipf`` about 8.5.

Writes ``sparsity-SOURCE.json`` and ``sparsity-SOURCE.md`` (date, device, jax version, git sha)
into ``--out`` and prints the markdown and the total time.
"""

from __future__ import annotations

import argparse
import functools
import json
import sys
import tempfile
import time
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np

from bench.common import HelpFormatter, add_git_sha_flag, git_sha, package_version, utc_now

EPSILONS = (2.0**-8, 2.0**-12, 2.0**-16)
EPSILON_NAMES = ("2^-8", "2^-12", "2^-16")
BETAS = (0.0, 0.5, 1.0)
ROW_BLOCK, VOCAB_BLOCK = 128, 256
ORDERS = ("tokenizer", "random")


def skippable_tiles(dlogits, epsilon, *, row_block: int = ROW_BLOCK, vocab_block: int = VOCAB_BLOCK):
    """Which (row_block × vocab_block) tiles of ``dlogits`` are negligible at ``epsilon``.

    A tile is negligible when, for each of its rows, every entry is below ``epsilon`` times that
    row's largest |entry| (an all-zero row is negligible everywhere). Rows and columns that do
    not fill a last block are padded with zeros.

    Args:
      dlogits: (N, V) array. epsilon: a positive scalar.

    Returns:
      ``(tiles, row_tiles)``: (⌈N/row_block⌉, ⌈V/vocab_block⌉) and (N, ⌈V/vocab_block⌉) bool; the
      second is the same test for each row alone (tiles of one row).
    """
    a = jnp.abs(dlogits.astype(jnp.float32))
    n, v = a.shape
    a = jnp.pad(a, ((0, 0), (0, (-v) % vocab_block)))
    row_max = jnp.max(a, axis=-1, keepdims=True)
    block_max = jnp.max(a.reshape(n, -1, vocab_block), axis=-1)
    row_tiles = (block_max < epsilon * row_max) | (row_max == 0.0)
    padded = jnp.pad(row_tiles, ((0, (-n) % row_block), (0, 0)), constant_values=True)
    return jnp.all(padded.reshape(-1, row_block, padded.shape[-1]), axis=1), row_tiles


def entries_above(dlogits, epsilon):
    """(N,) int32: per row, the number of nonzero entries with |dlogits| ≥ epsilon · the row's max |dlogits|."""
    a = jnp.abs(dlogits.astype(jnp.float32))
    above = (a >= epsilon * jnp.max(a, axis=-1, keepdims=True)) & (a > 0.0)
    return jnp.sum(above, axis=-1, dtype=jnp.int32)


def loss_settings(temperature: float, hard_weight: float) -> list[dict]:
    """Every (β, weights) of a measurement: the demo's weights, then the soft term alone."""
    weights = [("demo", 1.0, hard_weight), ("soft only", 1.0, 0.0)]
    return [
        dict(beta=beta, weights=name, soft_weight=soft, hard_weight=hard, temperature=temperature)
        for name, soft, hard in weights
        for beta in BETAS
    ]


def _hyper(setting: dict):
    from pallas_kernels import distill_rows as row_kernel

    beta = setting["beta"]
    branch = row_kernel.FORWARD_KL if beta == 0 else row_kernel.REVERSE_KL if beta == 1 else row_kernel.MIXTURE_JSD
    return row_kernel.row_hyper(
        beta,
        setting["temperature"],
        setting["soft_weight"],
        setting["hard_weight"],
        one_minus_beta=1.0 - beta,
        branch=branch,
    )


def row_statistics(student_logits, teacher_logits):
    """Per-row (R,) float32 of the untempered distributions: the teacher's entropy and top
    probability, KL(teacher‖student), and whether both have the same top-1 token (1.0 or 0.0)."""
    log_p = jax.nn.log_softmax(teacher_logits.astype(jnp.float32), axis=-1)
    log_q = jax.nn.log_softmax(student_logits.astype(jnp.float32), axis=-1)
    p = jnp.exp(log_p)
    return {
        "teacher_entropy": -jnp.sum(p * log_p, axis=-1),
        "teacher_top_probability": jnp.max(p, axis=-1),
        "kl_teacher_student": jnp.sum(p * (log_p - log_q), axis=-1),
        "top1_agreement": (jnp.argmax(log_p, axis=-1) == jnp.argmax(log_q, axis=-1)).astype(jnp.float32),
    }


@functools.partial(jax.jit, static_argnames=("settings",))
def _batch_counts(student_logits, teacher_logits, labels, permutation, settings):
    """Counts of one batch of rows (a multiple of ROW_BLOCK), for every setting, order and ε.

    Returns ``(counts, statistics)``: ``counts`` a tuple over ``settings`` of dicts
    ``{order: (tiles (3,), row_tiles (3,), above (3, R) or None)}`` (skippable tiles and one-row
    tiles per ε; per-row entry counts, for the tokenizer order only: a permutation does not change
    them), ``statistics`` the :func:`row_statistics` of the batch.
    """
    from jaxdistill import rowmath

    counts = []
    for setting in settings:
        _, _, d = rowmath.distill_rows(
            student_logits, teacher_logits, labels, _hyper(dict(setting)), dlogits_dtype=jnp.float32
        )
        per_order = {}
        for order, columns in (("tokenizer", d), ("random", jnp.take(d, permutation, axis=1))):
            tiles, row_tiles, above = [], [], []
            for eps in EPSILONS:
                t, rt = skippable_tiles(columns, eps)
                tiles.append(jnp.sum(t, dtype=jnp.int32))
                row_tiles.append(jnp.sum(rt, dtype=jnp.int32))
                if order == "tokenizer":
                    above.append(entries_above(d, eps))
            per_order[order] = (jnp.stack(tiles), jnp.stack(row_tiles), jnp.stack(above) if above else None)
        counts.append(per_order)
    return tuple(counts), row_statistics(student_logits, teacher_logits)


class Accumulator:
    """Sums the counts of :func:`_batch_counts` over batches of rows, for one student."""

    def __init__(self, settings: list[dict], vocab: int):
        self.settings = settings
        self.n_vocab_blocks = -(-vocab // VOCAB_BLOCK)
        self.rows = 0
        self.tiles = {(i, o): np.zeros(len(EPSILONS), np.int64) for i in range(len(settings)) for o in ORDERS}
        self.row_tiles = {key: np.zeros(len(EPSILONS), np.int64) for key in self.tiles}
        self.above = {i: [] for i in range(len(settings))}
        self.statistics = []

    def add(self, batch, rows: int):
        counts, statistics = jax.device_get(batch)
        self.rows += rows
        self.statistics.append(statistics)
        for i, per_order in enumerate(counts):
            for order, (tiles, row_tiles, above) in per_order.items():
                self.tiles[i, order] += tiles
                self.row_tiles[i, order] += row_tiles
                if above is not None:
                    self.above[i].append(above)

    def results(self) -> tuple[list[dict], dict]:
        n_tiles = (self.rows // ROW_BLOCK) * self.n_vocab_blocks
        n_row_tiles = self.rows * self.n_vocab_blocks
        out = []
        for i, setting in enumerate(self.settings):
            above = np.concatenate(self.above[i], axis=1)
            for order in ORDERS:
                for k, eps_name in enumerate(EPSILON_NAMES):
                    out.append(
                        dict(
                            order=order,
                            beta=setting["beta"],
                            weights=setting["weights"],
                            soft_weight=setting["soft_weight"],
                            hard_weight=setting["hard_weight"],
                            temperature=setting["temperature"],
                            epsilon=eps_name,
                            skippable_tiles=float(self.tiles[i, order][k] / n_tiles),
                            skippable_row_tiles=float(self.row_tiles[i, order][k] / n_row_tiles),
                            entries_above_median=float(np.median(above[k])),
                            entries_above_p10=float(np.percentile(above[k], 10)),
                            entries_above_p90=float(np.percentile(above[k], 90)),
                        )
                    )
        statistics = {
            key: float(np.median(np.concatenate([s[key] for s in self.statistics])))
            for key in self.statistics[0]
            if key != "top1_agreement"
        }
        statistics["top1_agreement"] = float(np.mean(np.concatenate([s["top1_agreement"] for s in self.statistics])))
        summary = dict(rows=self.rows, vocab_blocks=self.n_vocab_blocks, tiles=n_tiles, medians=statistics)
        return out, summary


def measure(batches, settings: list[dict], vocab: int, *, seed: int = 0) -> tuple[list[dict], dict]:
    """Measure every setting on an iterable of ``(student_logits, teacher_logits, labels)`` batches.

    Each batch holds a multiple of ROW_BLOCK rows: (R, V) float32 logits and (R,) int32 labels.
    The random vocabulary order is one permutation drawn from ``seed``.

    Returns ``(rows, summary)``: one dict per (setting, order, ε), and the number of rows and
    tiles with the medians of :func:`row_statistics` (the agreement as a mean).
    """
    permutation = jnp.asarray(np.random.default_rng(seed).permutation(vocab).astype(np.int32))
    frozen = tuple(tuple(sorted(s.items())) for s in settings)
    acc = Accumulator(settings, vocab)
    for student_logits, teacher_logits, labels in batches:
        rows = student_logits.shape[0]
        if rows % ROW_BLOCK:
            raise ValueError(f"a batch of {rows} rows is not a multiple of {ROW_BLOCK}")
        acc.add(_batch_counts(student_logits, teacher_logits, labels, permutation, frozen), rows)
    return acc.results()


# --- the synthetic generator ------------------------------------------------------------------

QUANTILE_LEVELS = (0.01, *np.round(np.arange(0.05, 0.951, 0.05), 2), 0.99)


def _quantile_draw(key, levels, values, shape):
    """Draws from the distribution whose quantiles at ``levels`` are ``values`` (piecewise linear)."""
    u = jax.random.uniform(key, shape, minval=levels[0], maxval=levels[-1])
    return jnp.interp(u, jnp.asarray(levels, jnp.float32), jnp.asarray(values, jnp.float32))


@functools.partial(jax.jit, static_argnames=("rows", "vocab"))
def zipf_logits(key, calibration: dict, *, rows: int, vocab: int, alpha_scale=1.0):
    """Synthetic ``(student_logits, teacher_logits, labels)``: (rows, vocab) float32 and (rows,) int32.

    Per row r (every parameter drawn independently per row from the quantiles in ``calibration``,
    see :func:`fit_calibration`):

    * teacher: the k-th most probable token has log-probability −α_r·log(k + k0) + const
      (Zipf–Mandelbrot), α_r from the fitted quantiles times ``alpha_scale``;
    * which token holds rank k: the ranks are a weighted draw without replacement from the
      vocabulary (Gumbel top-k), weights w_j ∝ (1 + j/j0)^−γ of the token id j: frequent tokens
      at low ids, as a BPE tokenizer numbers them (γ = 0 would be a uniform random order);
    * student: log q = τ_r·log p + σ_r·ξ, ξ ~ N(0, 1) per entry (τ < 1: flatter than the teacher);
    * label: a draw from the teacher's distribution.
    """
    k_alpha, k_rank, k_tau, k_sigma, k_noise, k_label = jax.random.split(key, 6)
    levels = calibration["levels"]
    alpha = _quantile_draw(k_alpha, levels, calibration["alpha"], (rows,)) * alpha_scale
    tau = _quantile_draw(k_tau, levels, calibration["tau"], (rows,))
    sigma = _quantile_draw(k_sigma, levels, calibration["sigma"], (rows,))
    ranks = jnp.arange(1, vocab + 1, dtype=jnp.float32)
    sorted_logp = -alpha[:, None] * jnp.log(ranks + calibration["k0"])[None, :]
    ids = jnp.arange(vocab, dtype=jnp.float32)
    prior = -calibration["gamma"] * jnp.log1p(ids / calibration["j0"])
    order = jnp.argsort(-(prior[None, :] + jax.random.gumbel(k_rank, (rows, vocab))), axis=1)
    teacher = jnp.zeros((rows, vocab), jnp.float32).at[jnp.arange(rows)[:, None], order].set(sorted_logp)
    teacher = jax.nn.log_softmax(teacher, axis=-1)
    student = tau[:, None] * teacher + sigma[:, None] * jax.random.normal(k_noise, (rows, vocab))
    labels = jax.random.categorical(k_label, teacher, axis=-1).astype(jnp.int32)
    return student, teacher, labels


def _log_spaced_ranks(vocab: int, count: int = 64) -> np.ndarray:
    """Distinct 0-based ranks, log-spaced from the first to the middle of the vocabulary."""
    return np.unique(np.geomspace(1, max(2, vocab // 2), count).astype(np.int64)) - 1


def _id_bins(vocab: int) -> np.ndarray:
    return np.unique(np.concatenate([[0], np.geomspace(16, vocab, 12).astype(np.int64)]))


def _top_histogram(top_ids: np.ndarray, vocab: int) -> np.ndarray:
    """Share of the ids in each of the log-spaced id bins of :func:`_id_bins`."""
    counts = np.histogram(top_ids, _id_bins(vocab))[0].astype(np.float64)
    return counts / counts.sum()


CLUSTER_TOP = 64  # the clustering fit matches where each row's CLUSTER_TOP most probable tokens lie
CLUSTER_ROWS = 256  # simulated rows per candidate of the clustering fit
CLUSTER_GAMMAS = (*np.arange(0.0, 2.0, 0.25), *np.arange(2.0, 8.0, 0.5), 8.0, 10.0, 12.0, 16.0, 24.0, 32.0)


@functools.partial(jax.jit, static_argnames=("rows",))
def _simulated_top_ids(key, gamma, j0, vocab_ids, *, rows: int):
    """The CLUSTER_TOP ids of a Gumbel top-k draw with weights (1 + j/j0)^−γ, for ``rows`` rows."""
    keys = -gamma * jnp.log1p(vocab_ids / j0)[None, :] + jax.random.gumbel(key, (rows, vocab_ids.shape[0]))
    return jax.lax.top_k(keys, CLUSTER_TOP)[1]


@jax.jit
def _sorted_rows(student_logits, teacher_logits):
    """Teacher and student log-probabilities, both in the order of decreasing teacher probability."""
    log_p = jax.nn.log_softmax(teacher_logits.astype(jnp.float32), axis=-1)
    log_q = jax.nn.log_softmax(student_logits.astype(jnp.float32), axis=-1)
    order = jnp.argsort(-log_p, axis=-1)
    return jnp.take_along_axis(log_p, order, -1), jnp.take_along_axis(log_q, order, -1), order[:, :CLUSTER_TOP]


def fit_calibration(student_logits, teacher_logits, *, seed: int = 0) -> dict:
    """Fit the generator of :func:`zipf_logits` to real (N, V) student and teacher logits.

    On the 0-based teacher ranks log-spaced from the first to V/2 (equal weight per octave of
    rank; the steep end of the vocabulary is left out):

    * k0 and α_r: per row, least squares of the sorted teacher log-probabilities against
      −log(k + k0); k0 the value of a grid that minimizes the mean squared residual over all rows.
    * τ_r and σ_r: per row, least squares of the student's log-probabilities on the teacher's at
      the same teacher ranks (slope τ, residual standard deviation σ).

    α, τ and σ are kept as quantiles over the rows (:data:`QUANTILE_LEVELS`). And the clustering:

    * γ and j0: the id weights (1 + j/j0)^−γ whose Gumbel top-64 draw (256 simulated rows) puts a
      row's 64 most probable tokens in the same log-spaced id bins as the teacher does (least
      KL divergence between the two bin histograms, over a grid of γ and j0 up to 16·V).

    Returns a JSON-ready dict (the fit's diagnostics under ``"fit"``).
    """
    sorted_p, sorted_q, top = jax.device_get(_sorted_rows(student_logits, teacher_logits))
    vocab = sorted_p.shape[1]
    levels = np.asarray(QUANTILE_LEVELS)
    ranks = _log_spaced_ranks(vocab)
    profile = sorted_p[:, ranks].astype(np.float64)
    centred = profile - profile.mean(axis=1, keepdims=True)
    best = None
    for k0 in (0.0, 0.5, 1.0, 2.0, 4.0, 8.0, 16.0, 32.0):
        x = -np.log(ranks + 1.0 + k0)
        x = x - x.mean()
        alpha = centred @ x / (x @ x)
        mse = float(np.mean((centred - alpha[:, None] * x[None, :]) ** 2))
        if best is None or mse < best[0]:
            best = (mse, k0, alpha)
    mse, k0, alpha = best
    student = sorted_q[:, ranks].astype(np.float64)
    student = student - student.mean(axis=1, keepdims=True)
    tau = np.sum(centred * student, axis=1) / np.sum(centred * centred, axis=1)
    sigma = np.std(student - tau[:, None] * centred, axis=1)
    # Clustering of the most probable tokens in id space.
    real = _top_histogram(top, vocab)
    vocab_ids = jnp.arange(vocab, dtype=jnp.float32)
    key = jax.random.key(seed)
    fit = None
    for gamma in CLUSTER_GAMMAS:
        for j0 in 2.0 ** np.arange(0, int(np.log2(vocab)) + 5):
            top_ids = _simulated_top_ids(key, jnp.float32(gamma), jnp.float32(j0), vocab_ids, rows=CLUSTER_ROWS)
            simulated = _top_histogram(np.asarray(top_ids), vocab)
            kl = float(np.sum(real * np.log((real + 1e-9) / (simulated + 1e-9))))
            if fit is None or kl < fit[0]:
                fit = (kl, float(gamma), float(j0), simulated)
            if gamma == 0.0:
                break  # j0 does not matter
    kl, gamma, j0, simulated = fit
    return {
        "vocab": vocab,
        "rows": len(sorted_p),
        "levels": levels.tolist(),
        "k0": k0,
        "alpha": np.quantile(alpha, levels).tolist(),
        "gamma": gamma,
        "j0": j0,
        "tau": np.quantile(tau, levels).tolist(),
        "sigma": np.quantile(sigma, levels).tolist(),
        "fit": {
            "profile_rms_residual": mse**0.5,
            "profile_ranks": (ranks + 1).tolist(),
            "teacher_median_profile": np.median(profile - profile[:, :1], axis=0).tolist(),
            "id_bins": _id_bins(vocab).tolist(),
            "top_ids_teacher": real.tolist(),
            "top_ids_generator": simulated.tolist(),
            "top_ids_kl": kl,
        },
    }


# The fit of the committed CPU run (bench/results/2026-12-02-gradient-sparsity-cpu/sparsity-demo.json,
# "calibration"; quantiles rounded to 4 digits): the generator's default.
DEFAULT_CALIBRATION = {
    "source": "demo preset cpu: teacher and distilled student on held-out text",
    "vocab": 4096,
    "rows": 4096,
    "temperature": 1.0,
    "hard_weight": 0.25,
    "levels": list(QUANTILE_LEVELS),
    "k0": 1.0,
    "alpha": [
        0.7860,
        0.8664,
        0.9166,
        0.9568,
        0.9810,
        0.9986,
        1.0196,
        1.0400,
        1.0629,
        1.0904,
        1.1211,
        1.1498,
        1.1719,
        1.1951,
        1.2241,
        1.2511,
        1.2775,
        1.3113,
        1.3517,
        1.3950,
        1.4539,
    ],
    "gamma": 24.0,
    "j0": 16384.0,
    "tau": [
        0.3856,
        0.5325,
        0.6033,
        0.6481,
        0.6775,
        0.7020,
        0.7216,
        0.7432,
        0.7608,
        0.7775,
        0.7913,
        0.8065,
        0.8191,
        0.8336,
        0.8474,
        0.8634,
        0.8805,
        0.9001,
        0.9260,
        0.9645,
        1.0223,
    ],
    "sigma": [
        0.4793,
        0.5651,
        0.6291,
        0.6698,
        0.7033,
        0.7342,
        0.7608,
        0.7901,
        0.8160,
        0.8462,
        0.8774,
        0.9048,
        0.9283,
        0.9618,
        0.9950,
        1.0323,
        1.0760,
        1.1210,
        1.1821,
        1.2772,
        1.4678,
    ],
}


# --- the demo's models ----------------------------------------------------------------------


def demo_batches(student, teacher, inputs, labels, *, windows_per_batch: int):
    """``(student_logits, teacher_logits, labels)`` of the held-out windows, ``windows_per_batch`` at a time.

    The rows of a batch are its windows' tokens in order; a last batch that does not fill whole
    row blocks is cut to whole blocks.
    """
    logits = nnx_logits()
    for start in range(0, len(inputs), windows_per_batch):
        x, y = jnp.asarray(inputs[start : start + windows_per_batch]), labels[start : start + windows_per_batch]
        rows = (y.size // ROW_BLOCK) * ROW_BLOCK
        if rows == 0:
            continue
        yield logits(student, x)[:rows], logits(teacher, x)[:rows], jnp.asarray(y.reshape(-1)[:rows], jnp.int32)


def _batch_rows(args, vocab: int) -> int:
    """Rows per measured batch: ``--batch-rows``, or about 2^24 (CPU) / 2^28 (GPU) logits, in row blocks."""
    if args.batch_rows:
        return args.batch_rows
    budget = 2**24 if jax.default_backend() == "cpu" else 2**28
    return max(ROW_BLOCK, budget // vocab // ROW_BLOCK * ROW_BLOCK)


def run_demo(args) -> dict:
    """Train the demo's models at ``args.preset`` and measure their dlogits on its held-out windows."""
    from jaxdistill.demo import report as demo_report
    from jaxdistill.demo.config import parse_config
    from jaxdistill.demo.run import run
    from jaxdistill.demo.train import make_model

    report = Path(args.demo_report) if args.demo_report else Path(tempfile.mkdtemp()) / "unused"
    flags = ["--preset", args.preset, "--seed", str(args.seed), "--out", str(report)]
    config = parse_config(flags + ([] if args.progress else ["--no-progress"]))
    begin = time.perf_counter()
    trained = {}
    metrics = run(config, trained=trained)
    if args.demo_report:
        demo_report.write_report(metrics, report)
    demo_seconds = time.perf_counter() - begin
    print(f"demo trained in {demo_seconds:.0f} s", flush=True)
    vocab = metrics["corpus"]["vocab_size"]
    students = {
        "distilled": trained["student_distilled"],
        "CE only": trained["student_ce"],
        # the initialization of both students, drawn as run() draws it
        "initialization": make_model(config.student, seed=config.seed + 1, vocab_size=vocab, max_len=config.seq_len),
    }
    inputs, labels = trained["heldout_inputs"], trained["heldout_labels"]
    if args.max_rows:
        windows = max(1, args.max_rows // config.seq_len)
        inputs, labels = inputs[:windows], labels[:windows]
    windows_per_batch = max(1, _batch_rows(args, vocab) // config.seq_len)
    settings = loss_settings(config.temperature, config.hard_weight)
    begin = time.perf_counter()
    measurements = []
    for name, student in students.items():
        batches = demo_batches(student, trained["teacher"], inputs, labels, windows_per_batch=windows_per_batch)
        rows, summary = measure(batches, settings, vocab, seed=args.seed)
        measurements.append(dict(name=name, vocab=vocab, **summary, rows_by_setting=rows))
        print(f"measured the {name} student ({summary['rows']} rows)", flush=True)
    measure_seconds = time.perf_counter() - begin
    begin = time.perf_counter()
    calibration_windows = max(1, args.calibration_rows // config.seq_len)
    x = jnp.asarray(inputs[:calibration_windows])
    logits = nnx_logits()
    calibration = fit_calibration(
        logits(trained["student_distilled"], x), logits(trained["teacher"], x), seed=args.seed
    )
    calibration.update(
        source=f"demo preset {args.preset}: teacher and distilled student on held-out text",
        temperature=config.temperature,
        hard_weight=config.hard_weight,
    )
    fit_seconds = time.perf_counter() - begin
    return {
        "demo": {
            "preset": args.preset,
            "config": {k: v for k, v in metrics["config"].items() if k != "out"},
            "vocab_size": vocab,
            "heldout": metrics["heldout"],
            "timings_s": metrics["timings_s"],
        },
        "measurements": measurements,
        "calibration": calibration,
        "timings_s": {"demo": demo_seconds, "measure": measure_seconds, "calibration_fit": fit_seconds},
    }


def nnx_logits():
    """A jitted ``(model, tokens (B, L)) -> (B·L, V)`` float32 logits."""
    from flax import nnx

    return nnx.jit(lambda model, tokens: model(tokens).reshape(-1, model.lm_head.vocab_size))


# --- the synthetic source -------------------------------------------------------------------

# (name, α scale, how j0 moves to another V): the calibrated generator with j0 in token ids (the
# frequent tokens keep their ids in a larger vocabulary) or scaled with V (they keep their share
# of it), then a teacher twice as sharp (not calibrated: a sensitivity check).
ZIPF_VARIANTS = (
    ("calibrated, j0 in ids", 1.0, "ids"),
    ("calibrated, j0 scaled with V", 1.0, "scaled"),
    ("alpha x2, j0 in ids", 2.0, "ids"),
    ("alpha x2, j0 scaled with V", 2.0, "scaled"),
)


def generator_parameters(calibration: dict, vocab: int, j0_transfer: str) -> dict:
    """The arrays :func:`zipf_logits` takes, with j0 moved to ``vocab`` (``"ids"``: unchanged,
    ``"scaled"``: times vocab / the fit's V)."""
    j0 = calibration["j0"] * (vocab / calibration["vocab"] if j0_transfer == "scaled" else 1.0)
    arrays = {key: jnp.asarray(calibration[key], jnp.float32) for key in ("levels", "alpha", "tau", "sigma")}
    return dict(arrays, k0=jnp.float32(calibration["k0"]), gamma=jnp.float32(calibration["gamma"]), j0=jnp.float32(j0))


def zipf_batches(parameters: dict, *, rows: int, vocab: int, batch_rows: int, alpha_scale: float, seed: int):
    for i, start in enumerate(range(0, rows, batch_rows)):
        n = min(batch_rows, rows - start)
        key = jax.random.fold_in(jax.random.key(seed), i)
        yield zipf_logits(key, parameters, rows=n, vocab=vocab, alpha_scale=alpha_scale)


def run_zipf(args) -> dict:
    """Measure the synthetic generator at ``--vocab`` (and at the calibration's own V, to compare)."""
    if args.calibration is None:
        calibration = DEFAULT_CALIBRATION
    else:
        calibration = json.loads(Path(args.calibration).read_text())["calibration"]
    settings = loss_settings(calibration["temperature"], calibration["hard_weight"])
    variants = [(f"{name}", scale, transfer, args.vocab, args.rows) for name, scale, transfer in ZIPF_VARIANTS]
    variants.insert(0, ("calibrated, at the fit's V", 1.0, "ids", calibration["vocab"], args.rows))
    begin = time.perf_counter()
    measurements = []
    for name, scale, transfer, vocab, rows in variants:
        parameters = generator_parameters(calibration, vocab, transfer)
        batches = zipf_batches(
            parameters,
            rows=rows,
            vocab=vocab,
            batch_rows=_batch_rows(args, vocab),
            alpha_scale=scale,
            seed=args.seed,
        )
        found, summary = measure(batches, settings, vocab, seed=args.seed)
        measurements.append(
            dict(
                name=name, vocab=vocab, alpha_scale=scale, j0=float(parameters["j0"]), **summary, rows_by_setting=found
            )
        )
        print(f"measured {name} at V = {vocab} ({time.perf_counter() - begin:.0f} s)", flush=True)
    return {
        "calibration": calibration,
        "measurements": measurements,
        "timings_s": {"measure": time.perf_counter() - begin},
    }


# --- report ---------------------------------------------------------------------------------


def _percent(x: float) -> str:
    return f"{100 * x:.1f}%"


def markdown(result: dict) -> str:
    """The report: a summary at ε = 2^-12, then every measurement in full."""
    meta = result["meta"]
    lines = [
        f"# Skippable (128 × 256) dlogit tiles: source {meta['source']}",
        "",
        f"{meta['date']} · {meta['device']} ({meta['backend']}) · jax {meta['jax']} · git {meta['git_sha']} · "
        f"`python -m bench.gradient_sparsity {' '.join(meta['argv'])}`",
        "",
        "A tile is skippable at ε when every one of its entries is below ε × its row's largest |dlogit|. "
        "Vocabulary order: the tokenizer's ids, or one fixed random permutation of them.",
        "",
    ]
    settings = [
        (w, b)
        for w, b in dict.fromkeys((r["weights"], r["beta"]) for r in result["measurements"][0]["rows_by_setting"])
    ]
    header = " | ".join(f"{w} β={b:g}" for w, b in settings)
    for eps in ("2^-12", "2^-8", "2^-16"):
        lines += [f"## Skippable tiles at ε = {eps}", "", f"| measurement | V | order | {header} |"]
        lines.append("|" + "---|" * (3 + len(settings)))
        for m in result["measurements"]:
            for order in ORDERS:
                cells = []
                for w, b in settings:
                    (row,) = [
                        r
                        for r in m["rows_by_setting"]
                        if (r["weights"], r["beta"], r["order"], r["epsilon"]) == (w, b, order, eps)
                    ]
                    cells.append(_percent(row["skippable_tiles"]))
                lines.append(f"| {m['name']} | {m['vocab']} | {order} | " + " | ".join(cells) + " |")
        lines.append("")
    lines += [
        "## Per row: entries ≥ ε × max (median [10th, 90th percentile]) and skippable one-row (1 × 256) tiles",
        "",
        "| measurement | weights | β | "
        + " | ".join(f"entries ≥ {e}·max" for e in EPSILON_NAMES)
        + " | "
        + " | ".join(f"1-row tiles {e} (tok / rand)" for e in EPSILON_NAMES)
        + " |",
        "|" + "---|" * (3 + 2 * len(EPSILON_NAMES)),
    ]
    for m in result["measurements"]:
        for w, b in settings:
            rows = {(r["order"], r["epsilon"]): r for r in m["rows_by_setting"] if (r["weights"], r["beta"]) == (w, b)}
            entries = [
                f"{rows['tokenizer', e]['entries_above_median']:.0f} "
                f"[{rows['tokenizer', e]['entries_above_p10']:.0f}, {rows['tokenizer', e]['entries_above_p90']:.0f}]"
                for e in EPSILON_NAMES
            ]
            one_row = [
                " / ".join(_percent(rows[order, e]["skippable_row_tiles"]) for order in ORDERS) for e in EPSILON_NAMES
            ]
            lines.append(f"| {m['name']} | {w} | {b:g} | " + " | ".join(entries + one_row) + " |")
    lines += [
        "",
        "## The distributions (medians over rows; top-1 agreement: mean)",
        "",
        "| measurement | V | rows | tiles | teacher entropy (nats) | teacher top probability "
        "| KL(teacher‖student) | top-1 agreement |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for m in result["measurements"]:
        s = m["medians"]
        lines.append(
            f"| {m['name']} | {m['vocab']} | {m['rows']} | {m['tiles']} | {s['teacher_entropy']:.2f} | "
            f"{s['teacher_top_probability']:.3f} | {s['kl_teacher_student']:.3f} | {_percent(s['top1_agreement'])} |"
        )
    lines += [
        "",
        f"Total time: {result['timings_s']['total']:.0f} s ("
        + ", ".join(f"{k} {v:.0f} s" for k, v in result["timings_s"].items() if k != "total")
        + ")",
        "",
    ]
    return "\n".join(lines)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m bench.gradient_sparsity",
        description=__doc__.split("\n\n")[0],
        formatter_class=HelpFormatter,
    )
    parser.add_argument("--source", choices=("demo", "zipf"), required=True, help="real models or the generator")
    parser.add_argument("--out", type=Path, required=True, help="directory for sparsity-SOURCE.json and .md")
    parser.add_argument("--preset", choices=("cpu", "gpu", "tiny"), default="cpu", help="demo preset (--source demo)")
    parser.add_argument("--seed", type=int, default=0, help="demo seed, random vocabulary order and generator")
    parser.add_argument(
        "--max-rows", type=int, default=None, help="measure at most this many held-out tokens (default: all)"
    )
    parser.add_argument("--calibration-rows", type=int, default=4096, help="held-out tokens the generator is fitted on")
    parser.add_argument(
        "--batch-rows",
        type=int,
        default=None,
        help="rows per measured batch (default: about 2^24 logits on CPU, 2^28 on GPU)",
    )
    parser.add_argument("--vocab", type=int, default=128256, help="V of the generator (--source zipf)")
    parser.add_argument("--rows", type=int, default=2048, help="rows drawn per generator variant (--source zipf)")
    parser.add_argument(
        "--calibration",
        default=None,
        help="sparsity-demo.json whose fit the generator uses (default: the fit of the committed CPU run)",
    )
    parser.add_argument(
        "--demo-report", default=None, help="also write the demo's own report (metrics.json, …) here (default: no)"
    )
    parser.add_argument("--no-progress", dest="progress", action="store_false", help="no progress bars of the demo")
    add_git_sha_flag(parser)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    for name in ("max_rows", "batch_rows", "rows"):
        value = getattr(args, name)
        if value is not None and (value < ROW_BLOCK or value % ROW_BLOCK):
            build_parser().error(f"--{name.replace('_', '-')} must be a positive multiple of {ROW_BLOCK}")
    begin = time.perf_counter()
    sha = args.git_sha or git_sha()  # the tree the run starts from
    args.out.mkdir(parents=True, exist_ok=True)
    result = run_demo(args) if args.source == "demo" else run_zipf(args)
    result["timings_s"]["total"] = time.perf_counter() - begin
    device = jax.devices()[0]
    result["meta"] = {
        "source": args.source,
        "date": utc_now(),
        "device": getattr(device, "device_kind", str(device)),
        "backend": jax.default_backend(),
        "jax": jax.__version__,
        "jaxlib": package_version("jaxlib"),
        "git_sha": sha,
        "argv": sys.argv[1:] if argv is None else list(argv),
        "row_block": ROW_BLOCK,
        "vocab_block": VOCAB_BLOCK,
        "epsilons": dict(zip(EPSILON_NAMES, EPSILONS, strict=True)),
    }
    result = {"meta": result.pop("meta"), **result}
    (args.out / f"sparsity-{args.source}.json").write_text(json.dumps(result, indent=1) + "\n")
    text = markdown(result)
    (args.out / f"sparsity-{args.source}.md").write_text(text)
    print(text)
    print(f"total time {result['timings_s']['total']:.0f} s; wrote {args.out}/sparsity-{args.source}.json and .md")
    return 0


if __name__ == "__main__":
    sys.exit(main())
