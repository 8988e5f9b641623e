"""What the command-line scripts share: flags declared once, device choice, error handling."""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path
from typing import Callable, Sequence

import torch

from errors import UserInputError


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
                        "<stem>_day_count.npz" + demo)
    p.add_argument("--processed_data_file", "--processed-data-file", dest="processed_data_file",
                   default=None, help="dlrm's kaggleAdDisplayChallenge_processed.npz; built "
                   "from the raw file if it does not exist" + demo)
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


def add_metadata_arg(p) -> None:
    p.add_argument("--sparse_model_metadata", "--sparse-model-metadata", dest="metadata",
                   default=None, help="sparse_model_metadata.csv of evaluate_disk_savings.py "
                   "(default: OUTPUT_DIR/sparse_model_metadata.csv; for the demo it is made "
                   "if missing)")


def resolve_inputs(args, ctx) -> tuple[str, str, Path]:
    """(raw, processed, metadata) paths; the demo's (made if missing) when none are given."""
    from demo import ensure_demo, ensure_processed
    out_dir = Path(args.output_dir)
    metadata = Path(args.metadata) if args.metadata else out_dir / "sparse_model_metadata.csv"
    demo = args.raw_data_file is None and args.processed_data_file is None
    if not demo and (args.raw_data_file is None or args.processed_data_file is None):
        raise UserInputError("give both --raw_data_file and --processed_data_file "
                             "(or neither, for the demo)")
    if demo:
        paths = ensure_demo()
        raw, processed = str(paths.raw), str(paths.processed)
        if args.metadata is None and not metadata.exists():
            import evaluate_disk_savings
            print(f"{metadata} not found: running the disk-savings step first", flush=True)
            sub = evaluate_disk_savings.parse_args(
                ["--output-dir", str(out_dir), "--model-path", str(paths.model)]
                + (["--device", args.device] if args.device else []))
            sub.command = describe(None)
            evaluate_disk_savings.run(sub, ctx)
    else:
        raw, processed = args.raw_data_file, args.processed_data_file
        if ctx.is_main:
            ensure_processed(raw, processed, args.skip_bad_lines)
        ctx.barrier()
    return raw, processed, metadata


def log_progress(show: bool, bar, done: int, total: int, text: str) -> None:
    """Where no progress bar is drawn (a log file, a pipe), print one line per finished row."""
    if show and bar.disable:
        print(f"[{done}/{total}] {text}", flush=True)


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
    """Run a script's body; a UserInputError becomes one line on stderr and exit code 2.

    Progress bars draw only on a terminal (tqdm's disable=None), so in logs and pipes an
    error is the only line on stderr.
    """
    try:
        code = body()
    except UserInputError as exc:
        print(f"error: {exc}", file=sys.stderr)
        sys.exit(2)
    except KeyboardInterrupt:
        print("interrupted: finished rows are kept; rerun to resume", file=sys.stderr)
        sys.exit(130)
    sys.exit(code or 0)


def script_main(parse_args: Callable, run: Callable, argv: Sequence[str] | None) -> None:
    """What every experiment's main() does: parse, record the command, run under torchrun
    when launched by it, and turn user errors into one line and exit code 2."""
    from distributed import run_distributed

    args = parse_args(argv)
    args.command = describe(argv)
    run_main(lambda: run_distributed(run, args))


def describe(argv: Sequence[str] | None) -> str:
    """The command line, for the reproducibility columns of the CSVs."""
    return " ".join(sys.argv[:1] + list(sys.argv[1:] if argv is None else argv))
