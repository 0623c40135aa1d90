"""jaxdistill: fused, chunked LM-head distillation losses for JAX.

The public entry point is :func:`fused_linear_jsd_loss`; :mod:`jaxdistill.reference` holds
the unfused oracle with the same math.
"""

from jaxdistill import reference
from jaxdistill.fused import FusedPlan, default_chunk_size, fused_linear_jsd_loss

__all__ = ["FusedPlan", "default_chunk_size", "fused_linear_jsd_loss", "reference"]
__version__ = "0.1.0"
