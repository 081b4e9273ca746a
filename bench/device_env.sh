# Sourced by run_device.sh and run_pool.sh: the output folder, the wheels carried in .whl/ (the GPU
# machine has torch, transformers, peft and accelerate but not diffusers; see bench/README.md), and
# the environment every benchmark runs with (offline hub, NVLink multicast left off).
OUT=${OUT:-bench-out}
mkdir -p "$OUT"
if ls .whl/*.whl >/dev/null 2>&1; then
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl || exit 1
  export PYTHONPATH=/tmp/site:$PWD
fi
export PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1 NCCL_NVLS_ENABLE=0 TORCH_SYMM_MEM_DISABLE_MULTICAST=1 NVSHMEM_DISABLE_NVLS=1
