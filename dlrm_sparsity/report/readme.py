"""The README's results at a glance: the demo report's answer and its trade-off figure, copied
between two markers by `make_report.py --readme README.md`, never typed by hand."""

from __future__ import annotations

import os
import re
from pathlib import Path

from dlrm_sparsity.errors import UserInputError
from dlrm_sparsity.report.render import TRADEOFFS

START = "<!-- the demo's answer: made by make_report.py --readme, do not edit -->"
END = "<!-- end of the demo's answer -->"


def answer_section(report_text: str) -> str:
    """The text of the report's "## The answer" section."""
    match = re.search(r"^## The answer\n(.*?)(?=^## |\Z)", report_text, re.M | re.S)
    if match is None:
        raise UserInputError("the report has no answer section")
    return match.group(1).strip()


def block(report: Path, readme: Path) -> str:
    """What stands between the markers: the answer, then the figure, linked from the README."""
    figure = os.path.relpath(report.parent / TRADEOFFS, readme.parent)
    link = os.path.relpath(report, readme.parent)
    return (f"{START}\nFrom [the demo's report]({link}):\n\n{answer_section(report.read_text())}"
            f"\n\n![trade-offs]({figure})\n{END}")


def refresh_readme(readme: Path, report: Path) -> None:
    """Replace the block between the markers with the report's; an error if they are missing."""
    text = readme.read_text(encoding="utf-8")
    pattern = re.compile(re.escape(START) + r".*?" + re.escape(END), re.S)
    if not pattern.search(text):
        raise UserInputError(f"{readme}: no block between the markers {START!r} and {END!r}")
    readme.write_text(pattern.sub(lambda _: block(report, readme), text), encoding="utf-8")
