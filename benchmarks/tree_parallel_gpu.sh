#!/usr/bin/env bash
# Steps/s of tree-parallel HBLL, DDP and pipelined backprop on 1, 2, 4 and 8 GPUs (NCCL),
# as many of those counts as the machine has GPUs. Fits a 10-minute run on one node.
#   bash benchmarks/tree_parallel_gpu.sh
set -euo pipefail
cd "$(dirname "$0")/.."
gpus=$(python -c "import torch; print(torch.cuda.device_count())")
if [ "$gpus" -lt 1 ]; then
  echo "no CUDA device found; run benchmarks/tree_parallel.py for the CPU comparison" >&2
  exit 1
fi
counts=()
for p in 1 2 4 8; do
  if [ "$p" -le "$gpus" ]; then counts+=("$p"); fi
done
echo "GPUs: $gpus; process counts: ${counts[*]}"
timeout 570 python benchmarks/tree_parallel.py --device cuda --processes "${counts[@]}" \
  --batch-size 512 --width 64 --steps 20 --warmup 5
