"""End-to-end demo: distill a small transformer LM on text that every Python installation has.

``python -m jaxdistill.demo`` (``--help`` for the flags) runs five phases, each with a progress bar:

1. data: Python's bundled documentation (``pydoc_data.topics`` and the standard library's
   docstrings; see :mod:`jaxdistill.demo.data`), split into training and held-out paragraphs,
   and a byte-level BPE tokenizer (HF ``tokenizers``) trained on the training part;
2. a teacher :class:`~jaxdistill.transformer.TransformerLM` trained with cross-entropy;
3. a smaller student trained with cross-entropy only;
4. an identical student (same initialization, same batches, same optimizer and steps) trained
   with :func:`jaxdistill.training.train_step`, i.e. the fused loss
   ``JSD_β(teacher, student) + hard_weight · CE`` (default implementation: XLA on CPU, the
   Pallas kernel on GPU);
5. held-out evaluation of both students in one pass (the frozen teacher runs once per batch):
   cross-entropy and perplexity, KL(teacher‖student) and top-1 agreement with the teacher; a
   difference between the students is called better or worse only beyond its noise threshold
   (see :func:`jaxdistill.demo.report.noise`).

The learning curves evaluate both students on the first held-out windows every ``eval_every``
steps against the teacher's outputs on them, computed once; their last point comes from the
final pass.

The report directory (``reports/demo-PRESET`` by default) gets ``metrics.json``, ``summary.md``
and ``curves.png``, written atomically (see :mod:`jaxdistill.demo.report`).

``--teacher offline[:K]`` adds an offline teacher: after phase 2 the teacher's top-K next tokens
(K = 64 by default) over the distilled student's batches are cached on disk
(:mod:`jaxdistill.demo.cache`; ``teacher-topk/`` in the report directory unless ``--cache-dir``),
and a third identical student is distilled from the cache alone with
:func:`jaxdistill.fused_linear_topk_distill_loss` (bucket tail, the same β, T and weights); the
report compares it with the CE-only and the online-distilled students.

Loss choices (defaults of every preset): β = 0, T = 1, hard_weight = 0.25, soft_weight = 1.

- β = 0 is forward KL(teacher‖student): cross-entropy against the teacher's whole next-token
  distribution, mass-covering like the held-out cross-entropy we measure. The interior JSD_β
  is a weaker signal (JSD_β ≈ β·KL(P‖Q) for small β, and JSD_0.5 ≤ log 2), and reverse KL
  (β = 1) is mode-seeking; GKD (arXiv:2306.13649) prefers those for on-policy generation, not
  for the teacher-forced likelihood scored here. Both help much less in the table below.
- T = 1: the soft target is then exactly the distribution whose KL is reported; with no T²
  factor a higher T also shrinks the soft gradient (at T = 2 the student agrees with the
  teacher less often than the CE-only one).
- hard_weight = 0.25: the real next token anchors the student where the small teacher is
  wrong. With this teacher 0 was slightly better still (0.035 nats, near the noise).

Measured on the CPU preset at commit c3aef67, before the window-start fix of
:func:`~jaxdistill.demo.data.batch_starts` changed every batch (seed 0: teacher held-out CE
5.164; 200 student steps; held-out cross-entropy in nats/token, top-1 agreement with the
teacher). The default run now gives teacher 5.137, CE only 6.321 / 32.5%, default 5.840 /
41.6% (``bench/results/2026-12-01-demo-cpu/``); the other rows were not re-run. The noise
threshold of the CE-only vs default comparison there is ±0.030 nats/token and ±0.6 points, so
differences of a few hundredths between the distilled rows below are near the noise::

    student loss                 held-out CE   agreement
    CE only                      6.320         33.1%
    β = 0,   T = 1, hard 0       5.805         43.7%
    β = 0,   T = 1, hard 0.25    5.840         42.7%   <- default
    β = 0,   T = 1, hard 0.5     5.888         41.0%
    β = 0,   T = 1, hard 1       5.948         39.4%
    β = 0,   T = 2, hard 0.25    6.143         32.0%
    β = 0.5, T = 1, hard 0.25    6.190         34.8%
    β = 1,   T = 1, hard 0.25    6.089         34.9%
"""
