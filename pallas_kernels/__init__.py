"""Pallas kernels lowered through Triton (interpret mode off the GPU). Does not import jaxdistill."""

from pallas_kernels.config import RowKernelConfig, default_row_kernel_config
from pallas_kernels.distill_rows import distill_rows_pallas

__all__ = ["RowKernelConfig", "default_row_kernel_config", "distill_rows_pallas"]
