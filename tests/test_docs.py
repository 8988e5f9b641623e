"""The README and docs: a front page, links that resolve, no history, and the demo's answer
as the committed report gives it."""

import re
from pathlib import Path

import pytest

from dlrm_sparsity.report.readme import END, START, block

REPO = Path(__file__).resolve().parent.parent
README = REPO / "README.md"
PAGES = [README, *sorted((REPO / "docs").rglob("*.md"))]  # the demo report among them
HISTORY = ("earlier run", "previous version", "slow day", "before the", "latest run",
           "run before", "earlier version", "used to")


def history_in(text: str) -> list[str]:
    """The phrases of history that stand in text as whole words."""
    return [p for p in HISTORY if re.search(rf"\b{re.escape(p)}\b", text.lower())]


def links(text: str) -> list[str]:
    found = re.findall(r"\]\(([^)\s]+)\)", text) + re.findall(r'src="([^"]+)"', text)
    return [link for link in found if not re.match(r"[a-z]+:", link)]


def test_the_readme_is_a_front_page():
    assert len(README.read_text().splitlines()) <= 200


@pytest.mark.parametrize("page", PAGES, ids=lambda p: str(p.relative_to(REPO)))
def test_every_relative_link_resolves(page):
    for link in links(page.read_text()):
        target = link.split("#")[0]
        if target:
            assert (page.parent / target).exists(), f"{page.name}: {link}"


@pytest.mark.parametrize("page", PAGES, ids=lambda p: str(p.relative_to(REPO)))
def test_no_page_tells_of_earlier_runs(page):
    assert not history_in(page.read_text())


def test_the_readmes_answer_is_the_committed_reports():
    text = README.read_text()
    shown = text[text.index(START):text.index(END) + len(END)]
    assert shown == block(REPO / "docs" / "demo_report" / "report.md", README)


def test_the_checker_finds_a_broken_link(tmp_path):
    page = tmp_path / "p.md"
    page.write_text("[a](missing.md) [b](https://x.org) ![c](p.md)")
    assert links(page.read_text()) == ["missing.md", "p.md"]


def test_the_history_check_matches_whole_phrases_only():
    assert history_in("Both must agree before they are timed. It ran on a slow day.") == \
        ["slow day"]
