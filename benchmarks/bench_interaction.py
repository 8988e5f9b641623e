"""The dot interaction's gather, as the model makes it against advanced indexing.

DLRMNet.interact takes z's pairs with one index_select over the flattened (F, F) products,
where dlrm and TorchRec write z[:, i, j]. This times both on the demo model's first test
batch (16,384 samples), in alternating rounds on the suite's paired timer, first the gather
alone and then the whole forward (the model's own against the same model with the gather
put back to advanced indexing), and checks that the outputs are the same bit for bit.

    python benchmarks/bench_interaction.py              # the demo model, 2 threads
"""

from __future__ import annotations

import argparse
import os

import bench_common  # noqa: F401  (puts the suite on the path)
import torch

from dlrm_sparsity.checkpoints import load_state_dict
from dlrm_sparsity.criteo.data import load_split
from dlrm_sparsity.demo import ensure_demo
from dlrm_sparsity.model import DLRMNet
from dlrm_sparsity.timing import Timing, measure_paired


class AdvancedIndexing(DLRMNet):
    """The model with the pairs gathered as dlrm and TorchRec gather them."""

    def interact(self, x, ly):
        batch, dim = x.shape
        t = torch.cat([x, *ly], dim=1).view(batch, -1, dim)
        z = torch.bmm(t, t.transpose(1, 2))
        return torch.cat([x, z[:, self.pair_i, self.pair_j]], dim=1)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--threads", type=int, default=min(2, os.cpu_count() or 1))
    p.add_argument("--run-time", type=float, default=2.0, help="seconds per variant")
    args = p.parse_args()
    demo = ensure_demo()
    state = load_state_dict(demo.model)
    model = DLRMNet.from_state_dict(state).eval()
    old = AdvancedIndexing.from_state_dict(state).eval()
    batch = next(load_split(demo.processed, demo.raw, "test").batches(16_384))
    args_ = (batch.dense, batch.offsets, batch.indices)
    with torch.inference_mode():
        x = model.bottom(batch.dense)
        t = torch.cat([x, *model.embed(batch.offsets, batch.indices)], 1).view(len(x), -1,
                                                                                  x.shape[1])
        z = torch.bmm(t, t.transpose(1, 2))
        same = (torch.equal(z.flatten(1).index_select(1, model.pair_flat),
                            z[:, model.pair_i, model.pair_j])
                and torch.equal(model(*args_), old(*args_)))
    timing = Timing(args.threads, args.run_time)
    cases = {
        "the gather": {"index_select": lambda: z.flatten(1).index_select(1, model.pair_flat),
                       "advanced indexing": lambda: z[:, model.pair_i, model.pair_j]},
        "the whole forward": {"index_select": lambda: model(*args_),
                              "advanced indexing": lambda: old(*args_)},
    }
    print(f"demo model, batch {len(x)}, F = {model.config.num_features}, "
          f"{args.threads} thread(s); outputs identical: {same}")
    for name, calls in cases.items():
        paired = measure_paired(calls, timing, rounds=10, base="advanced indexing")
        r = paired.ratio("index_select", "advanced indexing")
        print(f"{name}: index_select / advanced indexing {r.ratio:.3f} "
              f"(95% interval {r.low:.3f} to {r.high:.3f})")


if __name__ == "__main__":
    main()
