#!/usr/bin/env bash
# One pass over what needs a GPU, most important first: the GPU tests, the Kaggle-size
# disk-savings grid (benchmarks/bench_kaggle_grid.py: the full grid with the defaults; add
# its --compare-workers to time worker counts side by side), then the demo's five
# experiments on cuda (the two newest first) and torchrun with nccl. Every step is
# time-boxed within a deadline for the whole pass (GPU_CHECK_SECONDS, default 570), so a slow
# step costs only the steps after it, and the log of each step is kept. The log, the grid's
# CSV and the demo's CSVs, figures and report (a tarball, without the zips) go to $OUT (or
# ./gpu_check).
#
#   bash benchmarks/gpu_check.sh
set -uo pipefail
OUT=${OUT:-gpu_check}
DEADLINE=${GPU_CHECK_SECONDS:-570}
DEMO=$(mktemp -d)
mkdir -p "$OUT"
export PYTHONUNBUFFERED=1

step() {  # step LIMIT COMMAND...: run it for at most LIMIT s, and never past the deadline
  local limit=$1; shift
  local left=$((DEADLINE - SECONDS))
  ((left < limit)) && limit=$left
  if ((limit < 5)); then echo "== skipped (deadline): $*"; return; fi
  echo "== $* (at most ${limit} s)"
  local start=$SECONDS
  timeout "$limit" "$@"
  echo "== exit $? after $((SECONDS - start)) s"
}

# The grid's 56 zips come to about 45 GB (deleted once its figures are printed): in memory
# when /dev/shm holds them with room.
if (($(df --output=avail -B1G /dev/shm 2>/dev/null | tail -n 1 || echo 0) > 50)); then
  KAGGLE=/dev/shm/kaggle_grid
else
  KAGGLE=$PWD/kaggle_grid
fi

{
  nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader
  python3 -c "import os, torch; print('torch', torch.__version__, torch.cuda.get_device_name(0))
print('CPUs', len(os.sched_getaffinity(0)), 'RAM', os.sysconf('SC_PAGE_SIZE') * os.sysconf('SC_PHYS_PAGES') >> 30, 'GiB')"
  echo "Kaggle grid in $KAGGLE"
  step 100 python3 -m pytest -q -p no:cacheprovider tests/test_gpu.py
  step 380 python3 benchmarks/bench_kaggle_grid.py --no-side-by-side --keep "$KAGGLE"
  for run in "$KAGGLE"/*/sparse_model_metadata.csv; do  # the full grid's, and any other run's
    cp "$run" "$OUT/kaggle_$(basename "$(dirname "$run")")_metadata.csv" 2>/dev/null
  done
  rm -rf "$KAGGLE"
  step 60 python3 -c "from dlrm_sparsity.demo import ensure_demo; ensure_demo()"
  for script in evaluate_disk_savings evaluate_memory_savings evaluate_activation_sparsity \
      evaluate_model_metrics evaluate_forward_time; do
    step 120 python3 "$script.py" --output-dir "$DEMO" --device cuda --no-report
  done
  step 30 python3 make_report.py --output-dir "$DEMO"
  step 60 python3 -m torch.distributed.run --standalone --nproc_per_node=1 \
      evaluate_model_metrics.py --output-dir /tmp/torchrun --device cuda --no-report \
      --sparse-model-metadata "$DEMO/sparse_model_metadata.csv"
  tar -czf "$OUT/demo_outputs.tar.gz" -C "$DEMO" --exclude=sparsified_models .
} 2>&1 | grep --line-buffered -v '%|' | tee "$OUT/gpu_check.log"
