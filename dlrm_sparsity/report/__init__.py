"""The report: one page that tells a user which pruning to ship, from whatever CSVs exist.

Every number comes from the experiments' CSVs (rounded only for reading); every sentence is
generated from them. Experiments that have not run, and rows that failed, are named.
results.py reads the CSVs, answer.py answers for each AUC budget, sections.py holds one
section per experiment, render.py puts the page together and writes it.
"""

from dlrm_sparsity.report.render import build, refresh_report, write_report
from dlrm_sparsity.report.results import EXPERIMENTS, Results

__all__ = ["EXPERIMENTS", "Results", "build", "refresh_report", "write_report"]
