"""Pallas kernels lowered through Triton (interpret mode off the GPU). Does not import jaxdistill.

* :func:`distill_rows_pallas`: the row kernel of the ``"pallas"`` implementation (statistics,
  JSD/KL/CE losses and dlogits of whole rows of float32 logits).
* :func:`logits_and_partials_pallas`: both heads' logits with per-tile softmax partials from the
  matmul's epilogue (the stage-1 kernel of the next design; timed by ``bench.chunk_stages``).
"""

from pallas_kernels.config import RowKernelConfig, default_row_kernel_config
from pallas_kernels.distill_rows import distill_rows_pallas
from pallas_kernels.logits_partials import (
    ChunkLogits,
    LogitsKernelConfig,
    TilePartials,
    default_logits_kernel_config,
    logits_and_partials_pallas,
)
from pallas_kernels.tail_rows import tail_dlogits_pallas, tail_statistics_pallas

__all__ = [
    "ChunkLogits",
    "LogitsKernelConfig",
    "RowKernelConfig",
    "TilePartials",
    "default_logits_kernel_config",
    "default_row_kernel_config",
    "distill_rows_pallas",
    "logits_and_partials_pallas",
    "tail_dlogits_pallas",
    "tail_statistics_pallas",
]
