#!/usr/bin/env bash
# One lent-GPU session of issue 7's measurements (see benchmarks/README.md), results under $OUT:
#   0. the fused Triton kernels are built and checked against PyTorch on the GPU first (seconds)
#                                                                          -> log_fused_check.txt
#   1. video-UNet steps: default, channels-last, channels-last + fused Triton kernels, + temporal
#      convolutions as 2D ones, + both; one and seven segments per step; kernel profiles
#                                                                          -> unet_variants.json
#   2. jobs: the whole default job in high mode with today's defaults (channels-last, all segments as
#      one batch) and with --fused-kernels (+ --compare: fused vs unfused latents); two segments in
#      normal and in low mode with today's defaults (channels-last: not yet timed in those modes);
#      partial results survive the timeout                                 -> job.json
# The device image lacks diffusers: carry its wheel in .whl (see the device tool's README).
set -uo pipefail
OUT=${OUT:-benchmarks/results}
mkdir -p "$OUT"
export PYTHONUNBUFFERED=1
if ls .whl/*.whl >/dev/null 2>&1; then
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl \
    && export PYTHONPATH=/tmp/site
fi
budget=${BUDGET_S:-520}
nvidia-smi --query-gpu=name,memory.used,clocks.max.sm --format=csv,noheader
timeout 60 python3 benchmarks/fused_check.py 2>&1 | grep -v USDT | tee "$OUT/log_fused_check.txt"
timeout 200 python3 benchmarks/unet_variants.py --quick --fused --temporal-conv-2d --profile --segment-batch 7 \
  --out "$OUT/unet_variants.json" 2>&1 | grep -v USDT | tee "$OUT/log_variants.txt" | grep -v "^  "
left=$((budget - SECONDS))
echo "seconds left for the jobs: $left"
timeout "$left" python3 benchmarks/run.py --modes high,high-fused,normal,low \
  --warmup --compare --other-modes-segments 2 --out "$OUT/job.json" 2>&1 | grep -v USDT | tee "$OUT/log_job.txt" \
  | grep -E "mode |ERROR|Error|error|compare" | cut -c1-700
echo "total ${SECONDS}s"
