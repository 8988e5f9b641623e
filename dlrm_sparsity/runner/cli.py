"""The scripts' command-line conventions: one parser style, and the flags they share."""

from __future__ import annotations

import argparse
import sys

import torch

from dlrm_sparsity.device import DEVICES
from dlrm_sparsity.errors import StopRun, UserInputError


class HelpFormatter(argparse.RawDescriptionHelpFormatter):
    """Keeps the description's line breaks; states each default the help does not already."""

    def _get_help_string(self, action: argparse.Action) -> str:
        text = action.help or ""
        default = action.default
        flag = isinstance(action, (argparse._StoreTrueAction, argparse._StoreFalseAction))
        if "default" in text or flag or default is None or default is argparse.SUPPRESS:
            return text
        shown = " ".join(map(str, default)) if isinstance(default, list) else default
        return f"{text} (default: {shown})"


class OneLineErrorParser(argparse.ArgumentParser):
    """Usage mistakes are one line on stderr and exit code 2, like every other user error."""

    def error(self, message: str):
        print(f"error: {self.prog}: {message} (see --help)", file=sys.stderr)
        sys.exit(2)


def make_parser(description: str) -> argparse.ArgumentParser:
    return OneLineErrorParser(description=description, formatter_class=HelpFormatter,
                              allow_abbrev=False)  # a typo must not pick a flag


def add_data_args(p: argparse.ArgumentParser, demo_default: bool = True) -> None:
    demo = " (default: the built-in demo's)" if demo_default else " (required)"
    p.add_argument("--raw_data_file", "--raw-data-file", dest="raw_data_file", default=None,
                   help="Criteo train.txt; its folder and stem locate dlrm's "
                        "<stem>_day_count.npz (not needed with torchrec's .npy files)" + demo)
    p.add_argument("--processed_data_file", "--processed-data-file", dest="processed_data_file",
                   default=None, help="dlrm's kaggleAdDisplayChallenge_processed.npz (built "
                   "from the raw file if it does not exist), or torchrec's preprocessed "
                   "Criteo: a folder of day_<i>_{dense,sparse,labels}.npy, or one "
                   "<name>_dense.npy beside its siblings" + demo)
    p.add_argument("--test-half", choices=("second", "first"), default="second",  # npy.py's
                   help="with torchrec's files, which half of the last day is the test split: "
                        "torchrec's (second) or MLPerf inference's (first)")
    p.add_argument("--skip-bad-lines", action="store_true",
                   help="when building the processed file, drop malformed raw lines (and "
                        "report how many) instead of stopping at the first")


def add_run_args(p: argparse.ArgumentParser, output_help: str) -> None:
    p.add_argument("--output-dir", default=".", help=output_help)
    p.add_argument("--device", default=None, choices=DEVICES,
                   help="where to run (default: cuda when available, else cpu; under "
                        "torchrun each rank uses cuda:LOCAL_RANK)")
    p.add_argument("--overwrite", action="store_true",
                   help="redo every row instead of resuming from an earlier run's outputs")
    p.add_argument("--no-report", dest="report", action="store_false",
                   help="do not refresh OUTPUT_DIR/report.md at the end (make_report.py)")


def add_metadata_arg(p: argparse.ArgumentParser) -> None:
    p.add_argument("--sparse_model_metadata", "--sparse-model-metadata", dest="metadata",
                   default=None, help="sparse_model_metadata.csv of evaluate_disk_savings.py "
                   "(default: OUTPUT_DIR/sparse_model_metadata.csv; for the demo it is made "
                   "if missing)")


def add_timing_args(p: argparse.ArgumentParser, min_run_time: float, time_budget: float,
                    why: str = "") -> None:
    """The flags of the experiments that time forward passes with experiment 3's harness."""
    p.add_argument("--batch-size", type=positive_int, default=16384,
                   help="samples in the timed batch (the first test batch, as the seed), and "
                        "per scoring pass")
    p.add_argument("--threads", type=positive_int, default=torch.get_num_threads(),
                   help="CPU threads for torch, recorded in the CSV (default: torch's)")
    p.add_argument("--time-budget", type=positive_float, default=time_budget, metavar="SECONDS",
                   help="the most seconds the run spends timing, drift guard included")
    p.add_argument("--min-run-time", type=positive_float, default=min_run_time,
                   help="seconds of timed calls per variant in a point's first rounds, after a "
                        "warm-up (shortened if the budget is too small)" + why)
    p.add_argument("--rounds", type=positive_int, default=5,
                   help="the first alternating rounds the variants compared are timed in "
                        "(fewer, 3 at least, where the budget would overrun otherwise)")
    p.add_argument("--min-effect", type=fraction, default=0.05,
                   help="the least difference of a time ratio from 1 claimed as faster or "
                        "slower; rounds are added until each ratio is clear or the budget ends")
    p.add_argument("--guard-share", type=fraction, default=0.20,
                   help="the most of the budget the drift guard spends on readings, repeats "
                        "and waits")
    p.add_argument("--drift-margin", type=fraction, default=None,
                   help="how much slower than its median the reference may read before a "
                        "point is measured again (default: twice the 90th percentile of the "
                        "machine's noise over the readings so far, at least 0.05)")
    p.add_argument("--drift-retries", type=int, default=2, choices=range(0, 11), metavar="N",
                   help="times a disturbed point is measured again before it is flagged")


def _number(text: str, cast, ok, expected: str):
    """text as a number that ok() accepts, or argparse's error naming what was expected."""
    try:
        value = cast(text)
    except ValueError:
        value = None  # not a number: the same message
    if value is None or not ok(value):
        raise argparse.ArgumentTypeError(f"expected {expected}, got {text}")
    return value


def positive_int(text: str) -> int:
    return _number(text, int, lambda v: v > 0, "a positive integer")


def positive_float(text: str) -> float:
    return _number(text, float, lambda v: 0 < v < float("inf"), "a positive number")


def fraction(text: str) -> float:
    return _number(text, float, lambda v: 0 <= v < 1, "a number in [0, 1)")


def exit_for(exc: BaseException, say: bool = True) -> None:
    """A user's mistake or Ctrl-C as one line on stderr (unless say is False: the line is
    rank 0's to say) and its exit code (2, 130)."""
    if isinstance(exc, (UserInputError, StopRun)):
        if say:
            print(f"error: {exc}", file=sys.stderr)
        raise SystemExit(2) from None
    if isinstance(exc, KeyboardInterrupt):
        if say:
            print("interrupted: finished rows are kept; rerun to resume", file=sys.stderr)
        raise SystemExit(130) from None
