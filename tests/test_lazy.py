"""pandas stays out of the disk step until its CSVs (lazy.py's stand-in module), numba until
its first ties at a cut."""

import subprocess
import sys
from pathlib import Path

import pytest

from dlrm_sparsity.lazy import LazyModule

REPO = Path(__file__).resolve().parents[1]


def run_python(code: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True,
                          text=True, timeout=120)


def test_the_disk_step_imports_without_pandas_or_numba():
    # Its imports sit under its peak memory: pandas waits for the CSVs, numba (about 120 MiB)
    # for the first ties at a cut (tie_order.py).
    done = run_python("import sys, evaluate_disk_savings; "
                      "print(sorted(m for m in sys.modules "
                      "if m.split('.')[0] in ('pandas', 'numba', 'llvmlite')))")
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == "[]"


def test_the_first_attribute_read_imports_the_module():
    done = run_python("import sys\n"
                      "from dlrm_sparsity.lazy import LazyModule\n"
                      "m = LazyModule('fractions')\n"
                      "print('fractions' in sys.modules)\n"
                      "print(m.Fraction(1, 3) + m.Fraction(1, 6))\n"
                      "print('fractions' in sys.modules)\n")
    assert done.returncode == 0, done.stderr
    assert done.stdout.split() == ["False", "1/2", "True"]


def test_threads_reading_it_at_once_all_get_the_whole_module():
    # The sweeps' worker threads may touch pandas first together; each must see it complete.
    done = run_python("import threading\n"
                      "from dlrm_sparsity.lazy import LazyModule\n"
                      "pd = LazyModule('pandas')\n"
                      "start = threading.Barrier(8)\n"
                      "seen = []\n"
                      "def read():\n"
                      "    start.wait()\n"
                      "    seen.append(len(pd.DataFrame({'a': [1, 2]})))\n"
                      "threads = [threading.Thread(target=read) for _ in range(8)]\n"
                      "[t.start() for t in threads]\n"
                      "[t.join() for t in threads]\n"
                      "print(seen)\n")
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == str([2] * 8)


def test_a_missing_module_fails_when_first_used():
    missing = LazyModule("no_such_module_here")
    with pytest.raises(ModuleNotFoundError, match="no_such_module_here"):
        missing.DataFrame()
