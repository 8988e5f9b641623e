"""Experiment 1, disk savings: prune every embedding table over the grid, zip each checkpoint.

For each (norm, block shape, sparsity level) the stock DataNormSparsifier's masks prune every
emb_l.*.weight; the model-only state dict is streamed into a deflated zip under the dump path.
sparse_model_metadata.csv records sizes, timings and paths (relative to the CSV) for the other
experiments; disk_savings.png plots them. With no arguments it runs on the built-in demo model.
Reruns resume; runs unchanged under torchrun. docs/usage.md explains every flag in depth.
"""

from __future__ import annotations

from dlrm_sparsity.checkpoints import COMPRESSORS
from dlrm_sparsity.disk import GridSettings, run_disk_grid
from dlrm_sparsity.grid import (
    SEED_BLOCK_SHAPES,
    SEED_LEVELS,
    SEED_NORMS,
    parse_block_shape,
    parse_level,
    parse_norm,
)
from dlrm_sparsity.mask_engine import ENGINES
from dlrm_sparsity.mask_engine import NAME as MASK_ENGINE
from dlrm_sparsity.report import refresh_report
from dlrm_sparsity.runner.cli import add_run_args, make_parser, positive_int
from dlrm_sparsity.runner.session import Session


def parse_args(argv=None):
    p = make_parser(__doc__)
    p.add_argument("--model_path", "--model-path", dest="model_path", default=None,
                   help="dlrm's or TorchRec's (DLRM, DLRM_DCN) checkpoint, state dict, zip, "
                        "or torchsnapshot or DCP folder (default: the demo model)")
    p.add_argument("--sparsified_model_dump_path", "--sparsified-model-dump-path",
                   dest="dump_path", default=None,
                   help="folder for the pruned zips (default: OUTPUT_DIR/sparsified_models)")
    p.add_argument("--sparsity-levels", nargs="+", default=[str(x) for x in SEED_LEVELS],
                   metavar="LEVEL", help="levels in [0, 1] (default: the seed's 20)")
    p.add_argument("--norms", nargs="+", default=list(SEED_NORMS), metavar="NORM",
                   help="block norms, L1 and/or L2")
    p.add_argument("--block-shapes", nargs="+", default=[f"{r}x{c}" for r, c in SEED_BLOCK_SHAPES],
                   metavar="RxC", help="sparse block shapes")
    p.add_argument("--keep-l2-1x1", action="store_true",
                   help="also run L2 with 1x1 blocks (same masks as L1 1x1, so skipped)")
    add_run_args(p, "folder for sparse_model_metadata.csv and disk_savings.png")
    p.add_argument("--workers", type=int, default=None, choices=range(0, 65), metavar="N",
                   help="grid points in flight at once (default: from the model's size, the "
                        "CPUs and the RAM)")
    p.add_argument("--compressor", default="zlib-ng", choices=COMPRESSORS,
                   help="deflate implementation; both write standard zips")
    p.add_argument("--deflate-threads", type=positive_int, default=None, metavar="N",
                   help="threads deflating the zips, shared by all in flight (default: every "
                        "CPU for a model over 64 MiB, else 1)")
    p.add_argument("--compress-level", type=int, default=6, choices=range(10), metavar="0-9",
                   help="deflate level (the seed's)")
    p.add_argument("--mask-engine", choices=ENGINES, default=MASK_ENGINE,
                   help="sort-once: the stock masks from one sort per config; stock: the "
                        "stock sparsifier at every point, as the seed")
    p.add_argument("--no-stock-check", dest="stock_check", action="store_false",
                   help="do not check one point per config against the stock sparsifier")
    p.add_argument("--whole-stock-check", action="store_true",
                   help="check whole tables, even where the check outgrows the model's size")
    p.add_argument("--positive-zeros", action="store_true",
                   help="store pruned weights as +0.0, not the stock -0.0 of negative ones")
    return p.parse_args(argv)


def grid_settings(args) -> GridSettings:
    return GridSettings(
        model_path=args.model_path, dump_dir=args.dump_path,
        levels=tuple(parse_level(x) for x in args.sparsity_levels),
        norms=tuple(parse_norm(x) for x in args.norms),
        block_shapes=tuple(parse_block_shape(x) for x in args.block_shapes),
        keep_l2_1x1=args.keep_l2_1x1, workers=args.workers, compressor=args.compressor,
        deflate_threads=args.deflate_threads, compress_level=args.compress_level,
        mask_engine=args.mask_engine, stock_check=args.stock_check,
        whole_stock_check=args.whole_stock_check, positive_zeros=args.positive_zeros)


def main(argv=None) -> None:
    args = parse_args(argv)
    with Session(argv, args.output_dir, args.device, args.overwrite) as run:
        run_disk_grid(run, grid_settings(args))
        refresh_report(run.output_dir, args.report, run.is_main)


if __name__ == "__main__":
    main()
