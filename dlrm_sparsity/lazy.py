"""A module imported on its first use rather than with the module that names it.

The disk step's peak memory is its largest sort, and pandas (33 MiB of imports) would sit
under that peak for nothing: the step reads and writes its CSVs with pandas only before and
after its tables. The modules on that path import it from here
(`from dlrm_sparsity.lazy import pandas as pd`), so it loads when a CSV or a frame is first
touched.

Written here rather than with importlib.util.LazyLoader: before Python 3.12.3 it can hand a
thread a module whose code is still running in another thread (CPython gh-114763), and the
sweeps run worker threads. importlib.import_module holds the module's import lock instead.
"""

from __future__ import annotations

import importlib
from types import ModuleType
from typing import Any


class LazyModule:
    """Stands for a module; the first attribute read imports it."""

    def __init__(self, name: str):
        self._name = name

    def _module(self) -> ModuleType:
        return importlib.import_module(self._name)

    def __getattr__(self, attr: str) -> Any:
        return getattr(self._module(), attr)

    def __repr__(self) -> str:
        return f"<module {self._name!r}, imported on first use>"


pandas = LazyModule("pandas")
