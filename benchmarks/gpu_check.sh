#!/usr/bin/env bash
# One pass over what needs a GPU: the GPU tests, the demo's three experiments on cuda, and
# torchrun with nccl. Results go to $OUT (or ./gpu_check) for the README's GPU figures.
set -uo pipefail
OUT=${OUT:-gpu_check}
mkdir -p "$OUT/demo"
export PYTHONUNBUFFERED=1
{
  nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader
  python3 -c "import torch; print('torch', torch.__version__, torch.cuda.get_device_name(0), 'cpus', __import__('os').cpu_count())"
  python3 -m pytest -q -p no:cacheprovider tests/test_gpu.py tests/test_dlrm_model.py
  python3 -c "import demo; demo.ensure_demo()"
  time python3 evaluate_disk_savings.py --output-dir "$OUT/demo" --device cuda \
      --sparsified-model-dump-path /tmp/dump
  time python3 evaluate_model_metrics.py --output-dir "$OUT/demo" --device cuda
  time python3 evaluate_forward_time.py --output-dir "$OUT/demo" --device cuda
  python3 -m torch.distributed.run --standalone --nproc_per_node=1 evaluate_model_metrics.py \
      --output-dir /tmp/torchrun --sparse-model-metadata "$OUT/demo/sparse_model_metadata.csv" \
      --device cuda | tail -n 2
  python3 benchmarks/bench_disk_savings.py | tail -n 7
  python3 benchmarks/bench_model_metrics.py | tail -n 4
} 2>&1 | grep -v '%|' | tee "$OUT/gpu_check.log"
