#!/usr/bin/env bash
# Step time, saved activations, peak CUDA memory and critical path of backprop,
# HBLL-reference and HBLL-fused on one GPU, for N = 4 … 128 blocks of both families.
#   bash benchmarks/step_time_gpu.sh [RESULTS_DIR]
# RESULTS_DIR (default benchmarks/results/step_time_gpu) receives step_time.json, written
# after every configuration so a run cut short keeps what it measured, and tables.md,
# the printed report.
#
# NOTE: the 10-minute size for one H200 is an estimate, because this script has not run
# on a GPU yet. The reference engine at N = 128 makes about 900 forward module calls per
# step, and each HBLL row first runs N - 2 forward-only steps to fill the chained-exit
# pipeline. The timeout stops the run at 570 s. The script then prints the tables of the
# configurations that finished, and the JSON contains the same rows.
#
# Expected layout of tables.md (one table per family, then the growth table):
#
#   Machine: x86_64, 16 CPU cores, NVIDIA H200; torch 2.x; device cuda; threads: 1; <date>. Median of 10 timed steps ...
#
#   ### transformer: DecoderBlock d_model 64, 4 heads, sequence 32, batch 8, vocabulary 256, shared exit heads
#
#   | N | method | step (ms) | ratio to backprop | saved activations, whole step (MiB) | saved activations, largest node (MiB) | peak CUDA memory (MiB) | critical path |
#   |---|---|---|---|---|---|---|---|
#   | 4 | backprop | ... | 1.00 | ... | ... | ... | 12 |
#   | 4 | hbll-reference | ... | ... | ... | ... | ... | 7 |
#   | 4 | hbll-fused | ... | ... | ... | n/a | ... | 7 |
#   ... N = 8, 16, 32, 64, 128; a cell that ran out of memory reads OOM
#
#   ### residual: ResidualConvBlock width 16 on 8×8 maps, batch 32, 10 classes, local target-embedding exit heads
#   ... the same columns
#
#   ### Step time growth from N = 8 to N = 64
#
#   | family | method | t(8) (ms) | t(64) (ms) | t(64) / t(8) | GPU target |
#   |---|---|---|---|---|---|
#   | transformer | backprop | ... | ... | ... | ≥ 6: met or missed |
#   | transformer | hbll-reference | ... | ... | ... | — |
#   | transformer | hbll-fused | ... | ... | ... | ≤ 2: met or missed |
#   ... the same for residual, then notes on vmap fallbacks and unfused modules
set -euo pipefail
cd "$(dirname "$0")/.."
results_dir="${1:-benchmarks/results/step_time_gpu}"
if ! python -c "import sys, torch; sys.exit(0 if torch.cuda.is_available() else 1)"; then
  echo "no CUDA device found; run benchmarks/step_time.py for the CPU benchmark" >&2
  exit 1
fi
mkdir -p "$results_dir"
echo "writing $results_dir/step_time.json and $results_dir/tables.md"
timeout 570 python benchmarks/step_time.py --device cuda \
  --blocks 4 8 16 32 64 128 --families transformer residual \
  --steps 10 --warmup 3 --json "$results_dir/step_time.json" | tee "$results_dir/tables.md"
