"""Write a synthetic Criteo-like train.txt, in the exact Kaggle format, with a planted signal;
optionally also as torchrec's preprocessed .npy day files.

See dlrm_sparsity/criteo/synthetic.py for what the data holds, and npy_write.py for the
.npy layout.
"""

from __future__ import annotations

from pathlib import Path

from dlrm_sparsity.criteo.npy_write import write_npy_days
from dlrm_sparsity.criteo.synthetic import write_synthetic_raw
from dlrm_sparsity.demo import ensure_processed
from dlrm_sparsity.errors import UserInputError
from dlrm_sparsity.runner.cli import exit_for, make_parser, positive_int


def parse_args(argv=None):
    p = make_parser(__doc__)
    p.add_argument("output", help="path of the train.txt to write")
    p.add_argument("--num-lines", type=positive_int, default=500_000, help="samples to write")
    p.add_argument("--seed", type=int, default=0, help="random seed")
    p.add_argument("--max-cardinality", type=positive_int, default=20000,
                   help="cap on distinct values per categorical column")
    p.add_argument("--torchrec-npy", metavar="DIR", default=None,
                   help="also write the data as torchrec's day_<i>_{dense,sparse,labels}.npy "
                        "in DIR (through dlrm's processed .npz, written beside train.txt)")
    p.add_argument("--multi-hot", action="store_true",
                   help="with --torchrec-npy, write MLPerf DLRM v2's multi-hot "
                        "day_<i>_sparse_multi_hot.npz instead of day_<i>_sparse.npy")
    args = p.parse_args(argv)
    if args.multi_hot and args.torchrec_npy is None:
        p.error("--multi-hot needs --torchrec-npy")
    return args


def main(argv=None) -> None:
    args = parse_args(argv)
    try:
        raw = write_synthetic_raw(args.output, args.num_lines, args.seed, args.max_cardinality)
        if args.torchrec_npy is not None:
            processed = raw.parent / f"{raw.stem}_processed.npz"
            ensure_processed(raw, processed)
            write_npy_days(processed, raw, Path(args.torchrec_npy), args.multi_hot, args.seed)
            print(f"wrote torchrec's .npy days in {args.torchrec_npy}")
    except (UserInputError, KeyboardInterrupt) as exc:
        exit_for(exc)


if __name__ == "__main__":
    main()
