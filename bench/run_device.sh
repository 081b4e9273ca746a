#!/usr/bin/env bash
# Runs the GPU benchmarks and GPU-only tests on a CUDA machine that has torch, transformers, peft
# and accelerate but no diffusers: the wheels in .whl/ (see bench/README.md) are installed first.
# Results land in $OUT (or ./bench-out): train.json, generate.json, job.json and the logs.
# bench/profile_speed.py (kernel tables, layout and compile variants) runs separately.
set -uo pipefail
source "$(dirname "$0")/device_env.sh"
nvidia-smi --query-gpu=name,memory.total,driver_version,clocks.max.sm --format=csv | tee "$OUT/gpu.txt"
python3 -c "import torch, diffusers, transformers, peft, accelerate; print('torch', torch.__version__, 'diffusers', diffusers.__version__, 'transformers', transformers.__version__, 'peft', peft.__version__, 'accelerate', accelerate.__version__)" | tee -a "$OUT/gpu.txt"
python3 -m bench.train_speed --json "$OUT/train.json" "$@" 2>&1 | tee "$OUT/train.log"
python3 -m bench.generate_speed --json "$OUT/generate.json" 2>&1 | tee "$OUT/generate.log"
python3 -m bench.job_speed --json "$OUT/job.json" 2>&1 | tee "$OUT/job.log"
if [ -f tests/trainer/test_gpu.py ]; then
  python3 -m pytest -q --noconftest -p no:cacheprovider -m "not worker_start" tests/trainer/test_gpu.py 2>&1 | tee "$OUT/gpu_tests.log"
fi
