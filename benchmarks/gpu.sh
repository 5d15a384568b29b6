#!/usr/bin/env bash
# The GPU runs of RESULTS.md in one script: both benchmarks on CUDA, bf16, the ffhq1024 sample at batch 16.
# Run from the repository root with the package importable (`pip install -e ".[bench]"`, or PYTHONPATH=src).
# PYTHON picks the interpreter (default python3: on some GPU images `python` is another one). Each benchmark
# has its own time limit (STAGE_SECONDS, default 240) and its log beside its JSON, so a stuck stage still
# leaves the results of the ones before it.
set -uo pipefail
cd "$(dirname "$0")/.."
PY="${PYTHON:-python3}"
LIMIT="${STAGE_SECONDS:-240}"
export PYTHONUNBUFFERED=1
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv
"$PY" -c "import torch; print('torch', torch.__version__, 'cuda', torch.cuda.is_available())" || exit 1
status=0
timeout "$LIMIT" "$PY" benchmarks/sampling.py --device cuda --precision bf16 --step-batches 1,8,16 --full-batch 16 \
    --out benchmarks/results/sampling_cuda.json "$@" 2>&1 | tee benchmarks/results/sampling_cuda.log || status=1
timeout "$LIMIT" "$PY" benchmarks/hourglass_vs_flat.py --device cuda --precision bf16 --batch 8 --repeats 10 \
    --out benchmarks/results/hourglass_vs_flat_cuda.json 2>&1 | tee benchmarks/results/hourglass_vs_flat_cuda.log \
    || status=1
exit $status
