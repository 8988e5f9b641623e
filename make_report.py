"""The report: one page, report.md, that tells which pruning to ship, from the experiments' CSVs.

Reads whatever CSVs the experiments left in --output-dir (any subset), and writes report.md
with its figures beside them (or into --report-dir, images copied, links relative, so the
folder can be moved or opened on a code-hosting page). Each experiment script also refreshes
it at its end (--no-report skips that).
"""

from __future__ import annotations

import sys
from pathlib import Path

from dlrm_sparsity.analysis import AUC_DROP_BUDGETS
from dlrm_sparsity.errors import UserInputError
from dlrm_sparsity.report import write_report
from dlrm_sparsity.report.readme import refresh_readme
from dlrm_sparsity.runner.cli import make_parser


def parse_args(argv=None):
    p = make_parser(__doc__)
    p.add_argument("--output-dir", default=".", help="folder holding the experiments' CSVs")
    p.add_argument("--report-dir", default=None,
                   help="where report.md and its images go (default: OUTPUT_DIR)")
    p.add_argument("--auc-budgets", nargs="+", type=float, default=list(AUC_DROP_BUDGETS),
                   metavar="DROP", help="AUC drops the answer is given for")
    p.add_argument("--readme", default=None, metavar="README",
                   help="also copy the report's answer into this README's marked block")
    return p.parse_args(argv)


def main(argv=None) -> None:
    args = parse_args(argv)
    path = write_report(args.output_dir, tuple(args.auc_budgets), args.report_dir)
    if path is None:
        print(f"error: {args.output_dir}: no experiment CSVs found (run "
              "evaluate_disk_savings.py first)", file=sys.stderr)
        raise SystemExit(2)
    print(f"wrote {path}")
    if args.readme:
        try:
            refresh_readme(Path(args.readme), path)
        except (UserInputError, OSError) as exc:
            print(f"error: {exc}", file=sys.stderr)
            raise SystemExit(2) from None
        print(f"refreshed the demo's answer in {args.readme}")


if __name__ == "__main__":
    main()
