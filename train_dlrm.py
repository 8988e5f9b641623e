"""Train a DLRM on Criteo-format data with the seed's recipe; save it in dlrm's layout or
TorchRec's (DLRM, or DLRM_DCN with --dcn-num-layers).

The recipe of dlrm's bench/dlrm_s_criteo_kaggle.sh: SGD, learning rate 0.1, mini-batch 128,
binary cross-entropy, one epoch over the training days (shuffled), test on the test split.
dlrm's checkpoint is a dict with "state_dict" and dlrm's bookkeeping (numpy scalars included),
so the suite and dlrm's own scripts read it alike; TorchRec's is the model's bare state dict.
"""

from __future__ import annotations

from dlrm_sparsity.criteo.npy import is_npy_data
from dlrm_sparsity.demo import ensure_processed
from dlrm_sparsity.device import DEVICES
from dlrm_sparsity.errors import UserInputError
from dlrm_sparsity.layouts import DLRM, TORCHREC
from dlrm_sparsity.runner.cli import add_data_args, exit_for, make_parser, positive_int
from dlrm_sparsity.training import Recipe, train_and_save


def parse_args(argv=None):
    p = make_parser(__doc__)
    add_data_args(p, demo_default=False)
    p.add_argument("--save-model", "--save_model", dest="save_model", required=True,
                   help="where to write the checkpoint")
    p.add_argument("--arch-sparse-feature-size", type=positive_int, default=16,
                   help="embedding width m_spa")
    p.add_argument("--arch-mlp-bot", default="13-512-256-64-16", help="bottom MLP widths")
    p.add_argument("--arch-mlp-top", default="512-256-1",
                   help="top MLP widths after the interaction (its input width is implied)")
    p.add_argument("--learning-rate", type=float, default=0.1, help="SGD learning rate")
    p.add_argument("--mini-batch-size", type=positive_int, default=128, help="training batch")
    p.add_argument("--test-mini-batch-size", type=positive_int, default=16384,
                   help="evaluation batch")
    p.add_argument("--num-batches", type=int, default=0,
                   help="stop after this many batches (0: one full epoch)")
    p.add_argument("--seed", type=int, default=0, help="seed of the init and the shuffle")
    p.add_argument("--layout", choices=(DLRM, TORCHREC), default=DLRM,
                   help="whose model to save: dlrm's DLRM_Net, or TorchRec's DLRM / DLRM_DCN")
    p.add_argument("--dcn-num-layers", type=positive_int, default=None,
                   help="a TorchRec DLRM_DCN with this many cross layers (implies --layout "
                        "torchrec)")
    p.add_argument("--dcn-low-rank-dim", type=positive_int, default=None,
                   help="the cross net's rank (default: 4 x the embedding width, as MLPerf's "
                        "DLRM v2: 512 for 128)")
    p.add_argument("--device", choices=DEVICES, default=None,
                   help="default: cuda when available")
    args = p.parse_args(argv)
    if args.processed_data_file is None or (args.raw_data_file is None
                                            and not is_npy_data(args.processed_data_file)):
        p.error("--processed_data_file is required, and --raw_data_file with dlrm's .npz")
    if args.dcn_low_rank_dim is not None and args.dcn_num_layers is None:
        p.error("--dcn-low-rank-dim needs --dcn-num-layers")
    if args.dcn_num_layers is not None:
        args.layout = TORCHREC
    return args


def main(argv=None) -> None:
    args = parse_args(argv)
    try:
        if not is_npy_data(args.processed_data_file):
            ensure_processed(args.raw_data_file, args.processed_data_file, args.skip_bad_lines)
        layers, dim = args.dcn_num_layers or 0, args.arch_sparse_feature_size
        rank = (args.dcn_low_rank_dim or 4 * dim) if layers else 0
        recipe = Recipe(dim, args.arch_mlp_bot, args.arch_mlp_top,
                        args.learning_rate, args.mini_batch_size, args.test_mini_batch_size,
                        args.seed, args.num_batches, args.layout, layers, rank)
        result = train_and_save(args.processed_data_file, args.raw_data_file,
                                args.save_model, recipe, args.device)
    except (UserInputError, KeyboardInterrupt) as exc:
        exit_for(exc)
    print(f"test accuracy {result['accuracy']:.4f}, AUC {result['roc_auc']:.4f}, "
          f"log loss {result['log_loss']:.4f}; saved {args.save_model}")


if __name__ == "__main__":
    main()
