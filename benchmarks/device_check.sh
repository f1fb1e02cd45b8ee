#!/usr/bin/env bash
# One lent-GPU session of issue 7's measurements (see benchmarks/README.md), results under $OUT:
#   1. the whole default job in high mode (+ --compare), then two segments (models now move once
#      per run, not per segment) in normal and in low mode and their memory peaks (banded video
#      decode); the whole job in high mode with all segments sampled as one batch; two segments in
#      high mode with the video UNet channels-last; low mode with two guidance passes (smaller
#      cards); partial results survive the timeout                         -> job.json
#   2. video-UNet step variants (channels-last included) with a kernel profile, and regional
#      compilation                                                         -> unet_variants.json
#   3. if time is left: high mode with torch.compile, one segment          -> job_compile.json
# The device image lacks diffusers: carry its wheel in .whl (see the device tool's README).
set -uo pipefail
OUT=${OUT:-benchmarks/results}
mkdir -p "$OUT"
export PYTHONUNBUFFERED=1
if ls .whl/*.whl >/dev/null 2>&1; then
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl \
    && export PYTHONPATH=/tmp/site
fi
budget=${BUDGET_S:-540}
nvidia-smi --query-gpu=name,memory.used --format=csv,noheader
timeout 330 python3 benchmarks/run.py --modes high,normal,low,high-segbatch,high-nhwc,low-twopass --warmup --compare --other-modes-segments 2 \
  --out "$OUT/job.json" 2>&1 | grep -v USDT | tee "$OUT/log_job.txt" | grep -E "mode |ERROR|Error|error" | cut -c1-600
timeout 210 python3 benchmarks/unet_variants.py --profile --compile-regional --out "$OUT/unet_variants.json" 2>&1 \
  | grep -v USDT | tee "$OUT/log_variants.txt"
left=$((budget - SECONDS))
echo "seconds left for compile: $left"
if [ "$left" -gt 200 ]; then
  timeout "$left" python3 benchmarks/run.py --modes high-compile --segments 1 \
    --out "$OUT/job_compile.json" 2>&1 | grep -v USDT | tee "$OUT/log_compile.txt" | grep -E "mode |ERROR|Error|error" | cut -c1-600
fi
echo "total ${SECONDS}s"
