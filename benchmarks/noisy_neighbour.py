"""A noisy neighbour: a child process that, for as long as it runs, bursts on random cores at
random times, busy a given share of the time (the duty cycle). Standard library only, so that
it can run beside a command on a machine where nothing is installed yet.

Each burst lasts 0.05 to 0.5 s and spins one process on each of a random non-empty set of the
cores; the gaps between bursts are random (exponential), their mean set so that the
neighbour is busy `duty` of the time.

    python3 benchmarks/noisy_neighbour.py --duty 0.3 -- COMMAND ...   # time COMMAND beside it

bench_timing_stability.py starts and stops the same neighbour around a run.
"""

from __future__ import annotations

import argparse
import os
import signal
import subprocess
import sys
import time
from contextlib import contextmanager
from typing import Iterator

NEIGHBOUR = """
import os, random, sys, time
duty, rng = float(sys.argv[1]), random.Random(int(sys.argv[2]))
cores = sorted(os.sched_getaffinity(0))
while True:
    burst = rng.uniform(0.05, 0.5)
    spinners = []
    for core in rng.sample(cores, rng.randint(1, len(cores))):
        pid = os.fork()
        if pid == 0:
            os.sched_setaffinity(0, {core})
            end = time.monotonic() + burst
            while time.monotonic() < end:
                pass
            os._exit(0)
        spinners.append(pid)
    for pid in spinners:
        os.waitpid(pid, 0)
    time.sleep(rng.expovariate(duty / (burst * (1.0 - duty))))
"""
BUSY_LOOP = ("import os, sys, time\n"
             "os.sched_setaffinity(0, {0})\n"
             "time.sleep(float(sys.argv[1]))\n"
             "end = time.monotonic() + float(sys.argv[2])\n"
             "while time.monotonic() < end:\n    pass\n")


@contextmanager
def neighbour(kind: str | None, duty: float = 0.3, load: tuple[float, float] = (20, 60),
              seed: int = 0) -> Iterator[None]:
    """A neighbour for the block's length: 'noisy' (random bursts, busy `duty` of the time),
    'burst' (one busy loop on core 0 from load[0] s for load[1] s) or None (nothing)."""
    if kind is None:
        yield
        return
    code, args = ((NEIGHBOUR, [str(duty), str(seed)]) if kind == "noisy"
                  else (BUSY_LOOP, [str(load[0]), str(load[1])]))
    proc = subprocess.Popen([sys.executable, "-c", code, *args], start_new_session=True)
    try:
        yield
    finally:
        os.killpg(proc.pid, signal.SIGKILL)  # the neighbour and any burst in flight
        proc.wait()


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--duty", type=float, default=0.3,
                   help="the share of the time the neighbour is busy (default 0.3)")
    p.add_argument("--seed", type=int, default=0, help="its random bursts' seed (default 0)")
    p.add_argument("command", nargs=argparse.REMAINDER,
                   help="the command to time beside it (after --)")
    args = p.parse_args()
    command = args.command[1:] if args.command[:1] == ["--"] else args.command
    if not 0 < args.duty < 1 or not command:
        p.error("give --duty in (0, 1) and a command after --")
    print(f"beside a noisy neighbour busy {args.duty:.0%} of the time: {' '.join(command)}",
          flush=True)
    start = time.perf_counter()
    with neighbour("noisy", args.duty, seed=args.seed):
        code = subprocess.run(command).returncode
    wall = time.perf_counter() - start
    print(f"exit {code}; wall {wall:.0f} s ({wall // 60:.0f} min {wall % 60:.0f} s) beside the "
          f"neighbour at {args.duty:.0%}", flush=True)
    sys.exit(code)


if __name__ == "__main__":
    main()
