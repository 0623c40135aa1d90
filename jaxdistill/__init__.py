"""jaxdistill: fused, chunked LM-head distillation losses for JAX.

The public entry points are :func:`fused_linear_jsd_loss` (a teacher head) and
:func:`fused_linear_topk_distill_loss` (a cached top-k teacher, made by :func:`teacher_topk`);
:mod:`jaxdistill.reference` holds the unfused oracle of the dense loss (the top-k loss's is
``tests/topk_oracle.py``).
"""

from jaxdistill import reference
from jaxdistill.fused import FusedPlan, default_chunk_size, fused_linear_jsd_loss
from jaxdistill.topk import TopK, fused_linear_topk_distill_loss, teacher_topk

__all__ = [
    "FusedPlan",
    "TopK",
    "default_chunk_size",
    "fused_linear_jsd_loss",
    "fused_linear_topk_distill_loss",
    "reference",
    "teacher_topk",
]
__version__ = "0.1.0"
