"""The seed's forward-time harness, over the suite's package.

The forward variants of a DLRM (dlrm_sparsity.variants: the dense model, the seed's
torch.sparse top, the masked, compact and per-format forwards, each an nn.Module) and how the
suite times them (dlrm_sparsity.timing: torch.utils.benchmark with a warm-up, a floor on runs
and a steady CPU allocator).

    from dlrm_forward_time import Dense, TorchSparseTop, Timing, measure
    model_time = measure(TorchSparseTop(model).on(batch), "sparse", Timing(threads, 0.2))
"""

from dlrm_sparsity.timing import (
    AGREEMENT_TOLERANCE,
    Timing,
    measure,
    measure_paired,
    steady_cpu_allocator,
    timing_columns,
)
from dlrm_sparsity.variants import (
    COMPACT,
    DENSE,
    MASKED,
    MASKED_SPARSE,
    MASKED_VARIANTS,
    SPARSE,
    Compact,
    Dense,
    FormatTables,
    Masked,
    TorchSparseTop,
    interaction_density,
    masked_variants,
    max_difference,
    stage_calls,
)

__all__ = ["AGREEMENT_TOLERANCE", "COMPACT", "DENSE", "MASKED", "MASKED_SPARSE",
           "MASKED_VARIANTS", "SPARSE", "Compact", "Dense", "FormatTables", "Masked", "Timing",
           "TorchSparseTop", "interaction_density", "masked_variants", "max_difference",
           "measure", "measure_paired", "stage_calls", "steady_cpu_allocator", "timing_columns"]
