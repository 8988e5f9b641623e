"""What the command-line scripts share: flags declared once, device choice, error handling."""

from __future__ import annotations

import argparse
import os
import sys
from typing import Callable, Sequence

import torch

from errors import UserInputError


class HelpFormatter(argparse.ArgumentDefaultsHelpFormatter, argparse.RawDescriptionHelpFormatter):
    """Help shows defaults and keeps the description's line breaks."""


class OneLineErrorParser(argparse.ArgumentParser):
    """Usage mistakes are one line on stderr and exit code 2, like every other user error."""

    def error(self, message: str):
        print(f"error: {self.prog}: {message} (see --help)", file=sys.stderr)
        sys.exit(2)


def make_parser(description: str) -> argparse.ArgumentParser:
    return OneLineErrorParser(description=description, formatter_class=HelpFormatter)


def add_data_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--raw_data_file", "--raw-data-file", dest="raw_data_file", default=None,
                   help="Criteo train.txt; its folder and stem locate dlrm's "
                        "<stem>_day_count.npz (default: the built-in demo data)")
    p.add_argument("--processed_data_file", "--processed-data-file", dest="processed_data_file",
                   default=None, help="dlrm's kaggleAdDisplayChallenge_processed.npz; built "
                   "from the raw file if it does not exist (default: the demo's)")
    p.add_argument("--skip-bad-lines", action="store_true",
                   help="when building the processed file, drop malformed raw lines (and "
                        "report how many) instead of stopping at the first")


def add_run_args(p: argparse.ArgumentParser, output_help: str) -> None:
    p.add_argument("--output-dir", default=".", help=output_help)
    p.add_argument("--device", default=None, choices=["cpu", "cuda"],
                   help="where to run (default: cuda when available, else cpu; under "
                        "torchrun each rank uses cuda:LOCAL_RANK)")
    p.add_argument("--overwrite", action="store_true",
                   help="redo every row instead of resuming from an earlier run's outputs")


def resolve_device(name: str | None) -> torch.device:
    if name is None:
        name = "cuda" if torch.cuda.is_available() else "cpu"
    if name == "cuda":
        if not torch.cuda.is_available():
            raise UserInputError("--device cuda: no CUDA device is available")
        return torch.device("cuda", int(os.environ.get("LOCAL_RANK", 0)))
    return torch.device("cpu")


def positive_int(text: str) -> int:
    value = int(text)
    if value <= 0:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {text}")
    return value


def run_main(body: Callable[[], int | None]) -> None:
    """Run a script's body; a UserInputError becomes one line on stderr and exit code 2."""
    try:
        code = body()
    except UserInputError as exc:
        print(f"error: {exc}", file=sys.stderr)
        sys.exit(2)
    except KeyboardInterrupt:
        print("interrupted: finished rows are kept; rerun to resume", file=sys.stderr)
        sys.exit(130)
    sys.exit(code or 0)


def describe(argv: Sequence[str] | None) -> str:
    """The command line, for the reproducibility columns of the CSVs."""
    return " ".join(sys.argv[:1] + list(sys.argv[1:] if argv is None else argv))
