#!/usr/bin/env bash
# The worker pool on every GPU of this host (bench/gpu_pool.py), with the wheels in .whl/ installed
# first as in run_device.sh. Results land in $OUT (or ./bench-out): pool.json, pool.log, gpus.txt.
set -uo pipefail
source "$(dirname "$0")/device_env.sh"
nvidia-smi --query-gpu=index,name,memory.total,driver_version --format=csv | tee "$OUT/gpus.txt"
python3 -m bench.gpu_pool --json "$OUT/pool.json" "$@" 2>&1 | grep -v "UserWarning\|warnings.warn" | tee "$OUT/pool.log"
