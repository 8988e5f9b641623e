"""The seed's shared pruning utilities, over the suite's package.

The grid (levels, block shapes, norms) and pruning a DLRM's embedding tables with PyTorch's
stock DataNormSparsifier: every `emb_l.*.weight` at one (level, block shape, norm) point, one
step, the mask squashed. The sort-once engine that makes the same masks faster for a whole
grid is dlrm_sparsity.sort_once; the disk grid that uses both is dlrm_sparsity.disk.

    from sparse_utils import GridPoint, sparsify_embeddings
    pruned = sparsify_embeddings(state_dict, GridPoint("L1", (1, 4), 0.9), device).weights
"""

from dlrm_sparsity.grid import (
    SEED_BLOCK_SHAPES,
    SEED_LEVELS,
    SEED_NORMS,
    GridPoint,
    block_label,
    build_grid,
    parse_block_shape,
    parse_level,
    parse_norm,
    shared_weights,
)
from dlrm_sparsity.pruning import (
    Pruning,
    make_zeros_positive,
    same_bits,
    sparsify_embeddings,
    sparsify_table,
    tensor_bytes,
    zero_fraction,
)

__all__ = ["SEED_BLOCK_SHAPES", "SEED_LEVELS", "SEED_NORMS", "GridPoint", "Pruning",
           "block_label", "build_grid", "make_zeros_positive", "parse_block_shape",
           "parse_level", "parse_norm", "same_bits", "shared_weights", "sparsify_embeddings",
           "sparsify_table", "tensor_bytes", "zero_fraction"]
