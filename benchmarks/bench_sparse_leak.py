"""Does a torch.sparse product leak memory? The CSR lookup of experiment 4 in isolation.

A one-hot matrix of 16384 bags times a pruned 20,000 x 16 table (95% zeros), 300 times per
pairing of layouts, on the CPU, and 300 lookups of the same bags by the suite's CSR format
(formats.Csr, a gather over the CSR's own tensors); prints how much the resident size grew.
On torch 2.13, CSR x CSR grows by about 0.2 MB a call, COO x COO and the gather do not
(README, "Memory formats").

    python benchmarks/bench_sparse_leak.py
"""

from __future__ import annotations

import warnings

import torch
from bench_common import rss_bytes

from dlrm_sparsity.formats import Csr

CALLS = 300


def main() -> None:
    warnings.filterwarnings("ignore", message=".*[Ss]parse.*", category=UserWarning)
    torch.manual_seed(0)
    table = torch.randn(20_000, 16)
    table[torch.rand(20_000, 16) < 0.95] = 0
    pairs = torch.stack([torch.arange(16384), torch.randint(0, 20_000, (16384,))])
    one_hot = torch.sparse_coo_tensor(pairs, torch.ones(16384), (16384, 20_000)).coalesce()
    products = {
        "CSR x CSR": (one_hot.to_sparse_csr(), table.to_sparse_csr()),
        "COO x COO": (one_hot, table.to_sparse_coo().coalesce()),
    }
    csr = Csr(table)
    calls = {name: (lambda a=a, b=b: torch.sparse.mm(a, b)) for name, (a, b) in products.items()}
    calls["formats.Csr lookup (gather)"] = lambda: csr.lookup(pairs[1], pairs[0])
    print(f"torch {torch.__version__}, {CALLS} calls each")
    for name, call in calls.items():
        call()  # first call: lazy initialisation, not counted
        start = rss_bytes()
        for _ in range(CALLS):
            call()
        grown = (rss_bytes() - start) / 2**20
        print(f"{name}: resident size +{grown:.0f} MiB ({grown / CALLS * 1024:.0f} KiB a call)")


if __name__ == "__main__":
    main()
