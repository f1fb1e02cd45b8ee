#!/usr/bin/env bash
# One lent-GPU session of issue 7's measurements (see benchmarks/README.md), results under $OUT:
#   1. video-UNet steps: default vs channels-last, one segment and seven segments per step, with a
#      kernel profile                                                      -> unet_variants.json
#   2. jobs: the whole default job in high mode as before run 4 (channels-first, one segment at a
#      time; + --compare); the whole job with today's defaults (on a GPU: channels-last, all segments
#      as one batch); two segments in normal and in low mode (memory peaks, models moved once per
#      run); last (compilation takes minutes) the whole job with torch.compile; partial results
#      survive the timeout                                                 -> job.json
# The device image lacks diffusers: carry its wheel in .whl (see the device tool's README).
set -uo pipefail
OUT=${OUT:-benchmarks/results}
mkdir -p "$OUT"
export PYTHONUNBUFFERED=1
if ls .whl/*.whl >/dev/null 2>&1; then
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl \
    && export PYTHONPATH=/tmp/site
fi
budget=${BUDGET_S:-565}
nvidia-smi --query-gpu=name,memory.used,clocks.max.sm --format=csv,noheader
timeout 100 python3 benchmarks/unet_variants.py --quick --profile --segment-batch 7 --out "$OUT/unet_variants.json" 2>&1 \
  | grep -v USDT | tee "$OUT/log_variants.txt" | grep -v "^  "
left=$((budget - SECONDS))
echo "seconds left for the jobs: $left"
timeout "$left" python3 benchmarks/run.py --modes high-nchw-onebyone,high,normal,low,high-compile \
  --warmup --compare --other-modes-segments 2 --out "$OUT/job.json" 2>&1 | grep -v USDT | tee "$OUT/log_job.txt" \
  | grep -E "mode |ERROR|Error|error|compare" | cut -c1-700
echo "total ${SECONDS}s"
