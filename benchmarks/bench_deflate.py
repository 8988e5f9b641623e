"""How fast this machine deflates a pruned embedding table: what bounds the disk grid.

The disk-savings grid's time on a large model is mostly deflate at level 6 (the seed's
level). This measures, on a buffer like a Kaggle-size table pruned at level 0.5 (random
float32 values, the half of smallest magnitude zeroed, as L1 1x1 leaves them):
  1. one stream deflated by ParallelDeflate on 1, 2, 4, ... threads up to the CPU count;
  2. several streams side by side, as the grid's workers deflate several zips at once: each
     on a pool of its own share of the CPUs, and all on one pool of every CPU (the suite's
     way: deflate.shared_pool);
and prints the best rate and the time of one Kaggle-size zip at level 0.5 at that rate. (The
grid's zips average less: its higher levels hold more zeros, which deflate faster.) Also the
CRC-32 that zipfile computes on the writing thread, by the stdlib's zlib and by zlib-ng.

    python benchmarks/bench_deflate.py            # 192 MiB, each case 3 times (median)
"""

from __future__ import annotations

import argparse
import os
import statistics
import time
import zlib
from concurrent.futures import ThreadPoolExecutor

import bench_common  # noqa: F401  (puts the suite on the path)
import torch
from zlib_ng import zlib_ng

from dlrm_sparsity.deflate import ParallelDeflate

KAGGLE_MODEL_BYTES = 2_160_000_000  # the Kaggle-size model's state dict, about 2.01 GiB


def pruned_table(mib: int) -> bytes:
    torch.manual_seed(0)
    values = torch.randn(mib * 2**20 // 4)
    values[values.abs() < values.abs().median()] = 0.0
    return values.numpy().tobytes()


def deflate(data: bytes, threads: int, level: int, shared: bool = False) -> int:
    d = ParallelDeflate(zlib_ng, level, threads, shared=shared)
    return len(d.compress(data)) + len(d.flush())


def timed(work) -> float:
    start = time.perf_counter()
    work()
    return time.perf_counter() - start


def rate(data: bytes, streams: int, threads: int, level: int, repeat: int,
         shared: bool = False) -> float:
    """MB/s of input over all streams, the median of `repeat` runs."""
    with ThreadPoolExecutor(streams) as pool:
        times = [timed(lambda: list(pool.map(lambda _: deflate(data, threads, level, shared),
                                             range(streams))))
                 for _ in range(repeat)]
    return streams * len(data) / 1e6 / statistics.median(times)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--mib", type=int, default=192, help="size of the buffer (MiB)")
    p.add_argument("--level", type=int, default=6)
    p.add_argument("--repeat", type=int, default=3)
    args = p.parse_args()
    cpus = len(os.sched_getaffinity(0))
    data = pruned_table(args.mib)
    print(f"{cpus} CPUs, zlib-ng {zlib_ng.ZLIBNG_VERSION} level {args.level}, "
          f"{args.mib} MiB of a table pruned at 0.5; median of {args.repeat} runs")
    counts = sorted({2**i for i in range(cpus.bit_length()) if 2**i <= cpus} | {cpus})
    one = None
    best = (0.0, "")
    for threads in counts:
        mbs = rate(data, 1, threads, args.level, args.repeat)
        one = one or mbs
        print(f"  one stream on {threads:2d} threads: {mbs:7.1f} MB/s ({mbs / one:.2f}x one "
              "thread)")
        best = max(best, (mbs, f"one stream on {threads} threads"))
    for streams in (2, 4):
        if streams <= cpus:
            mbs = rate(data, streams, cpus // streams, args.level, args.repeat)
            print(f"  {streams} streams on {cpus // streams:2d} threads each: {mbs:7.1f} MB/s "
                  "in all")
            best = max(best, (mbs, f"{streams} streams"))
            mbs = rate(data, streams, cpus, args.level, args.repeat, shared=True)
            print(f"  {streams} streams on one pool of {cpus:2d} threads: {mbs:7.1f} MB/s "
                  "in all")
            best = max(best, (mbs, f"{streams} streams, one pool"))
    print(f"best: {best[0]:.1f} MB/s ({best[1]}): a Kaggle-size zip at level 0.5 in "
          f"{KAGGLE_MODEL_BYTES / 1e6 / best[0]:.1f} s of the machine's deflate")
    crc = {name: len(data) / 1e6 / min(timed(lambda f=f: f(data)) for _ in range(args.repeat))
           for name, f in (("zlib", zlib.crc32), ("zlib-ng", zlib_ng.crc32))}
    print(f"CRC-32 (zipfile's, on the writing thread): zlib {crc['zlib']:.0f} MB/s, zlib-ng "
          f"{crc['zlib-ng']:.0f} MB/s ({crc['zlib-ng'] / crc['zlib']:.1f}x)")


if __name__ == "__main__":
    main()
