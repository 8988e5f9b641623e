"""Write a synthetic Criteo-like train.txt, in the exact Kaggle format, with a planted signal.

See dlrm_sparsity/criteo/synthetic.py for what the data holds.
"""

from __future__ import annotations

from dlrm_sparsity.criteo.synthetic import write_synthetic_raw
from dlrm_sparsity.runner.cli import make_parser, positive_int


def parse_args(argv=None):
    p = make_parser(__doc__)
    p.add_argument("output", help="path of the train.txt to write")
    p.add_argument("--num-lines", type=positive_int, default=500_000, help="samples to write")
    p.add_argument("--seed", type=int, default=0, help="random seed")
    p.add_argument("--max-cardinality", type=positive_int, default=20000,
                   help="cap on distinct values per categorical column")
    return p.parse_args(argv)


def main(argv=None) -> None:
    args = parse_args(argv)
    write_synthetic_raw(args.output, args.num_lines, args.seed, args.max_cardinality)


if __name__ == "__main__":
    main()
