#!/usr/bin/env bash
# The worker pool on every GPU of this host (bench/gpu_pool.py), with the wheels in .whl/ installed
# first as in run_device.sh. Results land in $OUT (or ./bench-out): pool.json, pool.log, gpus.txt.
set -uo pipefail
OUT=${OUT:-bench-out}
mkdir -p "$OUT"
if ls .whl/*.whl >/dev/null 2>&1; then
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl || exit 1
  export PYTHONPATH=/tmp/site:$PWD
fi
export PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1 NCCL_NVLS_ENABLE=0 TORCH_SYMM_MEM_DISABLE_MULTICAST=1 NVSHMEM_DISABLE_NVLS=1
nvidia-smi --query-gpu=index,name,memory.total,driver_version --format=csv | tee "$OUT/gpus.txt"
python3 -m bench.gpu_pool --json "$OUT/pool.json" "$@" 2>&1 | grep -v "UserWarning\|warnings.warn" | tee "$OUT/pool.log"
