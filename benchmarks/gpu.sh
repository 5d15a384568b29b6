#!/usr/bin/env bash
# The GPU runs of RESULTS.md in one script: both benchmarks on CUDA, bf16, the ffhq1024 sample at batch 16.
# Run from the repository root with the package installed (`pip install -e ".[bench]"`).
set -euo pipefail
cd "$(dirname "$0")/.."
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv
python benchmarks/sampling.py --device cuda --precision bf16 --step-batches 1,8,16 --full-batch 16 \
    --out benchmarks/results/sampling_cuda.json "$@"
python benchmarks/hourglass_vs_flat.py --device cuda --precision bf16 --batch 8 --repeats 10 \
    --out benchmarks/results/hourglass_vs_flat_cuda.json
