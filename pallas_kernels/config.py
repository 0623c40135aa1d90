"""Launch configuration of the row kernel (one validated, frozen config and its one default), and
the output types every ``pallas_call`` here shares."""

from __future__ import annotations

import dataclasses
import functools
import warnings

import jax
import jax.numpy as jnp
import numpy as np

# JAX 0.11 warns at every lowering of a Pallas kernel through Triton; this is that warning only.
_TRITON_DEPRECATION = r"The Pallas Triton backend is deprecated"
MAX_BLOCK_V = 1 << 16  # beyond this a tile no longer fits in registers at any num_warps (spills)
MAX_NUM_WARPS = 32  # 1024 threads, the CUDA limit per block


def ignore_triton_deprecation() -> None:
    """Silence exactly the Triton-backend DeprecationWarning (category and message).

    Installed on every launch rather than once at import: the warning fires when the enclosing
    jit lowers, and test runners reset the filter list around each test. ``filterwarnings``
    replaces an identical entry, so repeating it does not grow the list.
    """
    warnings.filterwarnings("ignore", message=_TRITON_DEPRECATION, category=DeprecationWarning)


def is_power_of_two(n: int) -> bool:
    return n > 0 and n & (n - 1) == 0


def _check_int(name: str, value) -> None:
    if isinstance(value, bool) or not isinstance(value, int | np.integer):
        raise ValueError(f"RowKernelConfig.{name} must be an int, got {value!r}")


@dataclasses.dataclass(frozen=True)
class RowKernelConfig:
    """Tiling and launch parameters of :func:`pallas_kernels.distill_rows_pallas` (also used, untuned,
    by the top-k teacher's one-stream passes in :mod:`pallas_kernels.tail_rows`).

    Every distinct config is a separate Triton compile; all of them compute the same values
    (up to float32 summation order).

    Attributes:
      block_v: vocabulary columns per tile (a power of 2, at most ``MAX_BLOCK_V``). Each
        program walks its row in tiles of ``block_v`` columns; the last, partial tile is masked.
        Triton requires power-of-2 tile sizes. Larger tiles amortize the per-tile reductions
        (a cross-warp round trip through shared memory) but need more registers.
      num_warps: warps per program (a power of 2 in 1..32). Each thread holds
        ``block_v / (32 · num_warps)`` elements of every live tile-sized value.
      num_stages: Triton software-pipelining depth of the vocabulary loops (>= 1; 1 = no
        pipelining). Its effect on a load/reduce loop without matmuls is empirical.
    """

    block_v: int
    num_warps: int
    num_stages: int

    def __post_init__(self):
        _check_int("block_v", self.block_v)
        _check_int("num_warps", self.num_warps)
        _check_int("num_stages", self.num_stages)
        if not (is_power_of_two(self.block_v) and self.block_v <= MAX_BLOCK_V):
            raise ValueError(f"RowKernelConfig.block_v must be a power of 2 in [1, {MAX_BLOCK_V}], got {self.block_v}")
        if not (is_power_of_two(self.num_warps) and self.num_warps <= MAX_NUM_WARPS):
            raise ValueError(
                f"RowKernelConfig.num_warps must be a power of 2 in [1, {MAX_NUM_WARPS}], got {self.num_warps}"
            )
        if self.num_stages < 1:
            raise ValueError(f"RowKernelConfig.num_stages must be >= 1, got {self.num_stages}")


def default_row_kernel_config(vocab_size: int, dtype, device_kind: str | None = None) -> RowKernelConfig:
    """The default :class:`RowKernelConfig` for a vocabulary size (the one tuning point).

    Reasoning (checked by the H200 sweep of ``bench/kernel_sweep.py`` on (1024, 128256), see
    ``bench/results/2026-11-28-h200/NOTES.md``: block_v {4096, 8192} × warps {4, 8, 16} × stages
    {1, 2} were all within ~10 % of each other, and this default at or near the best for β ∈ {0, 1};
    the second sweep, ``bench/results/2026-11-28-h200-run2/NOTES.md``, block_v 256…2048 × warps
    1…8, found nothing better at every β, and its best kernel sum made the whole step slower):

    * ``block_v = min(4096, next_pow2(vocab_size))``: the kernel streams two float32 rows, so a
      4096-column tile is 32 KiB of loads in flight per program per iteration, enough to cover
      HBM latency with a couple of programs per SM, while keeping 16 values per thread per stream
      at 8 warps (no spills). Small vocabularies get one tile that covers the row.
    * ``num_warps = clamp(block_v // 512, 1, 8)``: 8 elements per thread and stream, JAX's own
      row-kernel cap of 8 warps (``pallas/ops/gpu/layer_norm.py`` uses ``block // 256``).
    * ``num_stages = 1``: the loops have no matmul, so software pipelining buys nothing obvious
      and costs shared memory; JAX's softmax kernel uses 1 as well.

    Args:
      vocab_size: V, the number of columns of each row (>= 1).
      dtype: dtype of the dlogits the kernel writes (the activation dtype). It does not change
        the choice today, since the two float32 input streams dominate the traffic; it is part
        of the signature so that tuned per-(device, dtype) values land here without changing
        call sites.
      device_kind: ``jax.Device.device_kind`` of the target (e.g. ``"NVIDIA H200"``), or None.
        Same role as ``dtype``: accepted for tuned per-device values, not used yet.

    Returns:
      A validated :class:`RowKernelConfig`.

    Raises:
      ValueError: ``vocab_size`` is not a positive int, or ``dtype`` is not a floating dtype.

    Example:
      >>> default_row_kernel_config(128256, "bfloat16")
      RowKernelConfig(block_v=4096, num_warps=8, num_stages=1)
    """
    del device_kind  # one heuristic for every device until the sweep says otherwise
    if isinstance(vocab_size, bool) or not isinstance(vocab_size, int | np.integer) or vocab_size < 1:
        raise ValueError(f"vocab_size must be a positive int, got {vocab_size!r}")
    if not jnp.issubdtype(jnp.dtype(dtype), jnp.floating):
        raise ValueError(f"dtype must be a floating dtype, got {dtype!r}")
    block_v = min(4096, 1 << (int(vocab_size) - 1).bit_length())
    num_warps = min(8, max(1, block_v // 512))
    return RowKernelConfig(block_v=block_v, num_warps=num_warps, num_stages=1)


def out_shape_varying_like(*inputs):
    """``jax.ShapeDtypeStruct`` factory for ``pallas_call`` outputs that vary over the mesh axes
    any of ``inputs`` varies over (``None`` entries skipped): inside ``shard_map(check_vma=True)``
    an input's shard differs per device, so what a kernel computes from it does too."""
    varying = frozenset().union(*(jax.typeof(x).manual_axis_type.varying for x in inputs if x is not None))
    return functools.partial(jax.ShapeDtypeStruct, manual_axis_type=jax.sharding.ManualAxisType(varying=varying))
