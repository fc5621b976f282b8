#!/usr/bin/env bash
# The device check, in one call of at most ~9 minutes on a GPU machine (no network there):
# the gpu and interpret test tiers on CUDA, then the kernel and training benchmarks.
# Everything lands in $OUT (default benchmarks/results/gpu-check): test logs and the
# benchmark JSON files, which are then committed under benchmarks/results/.
#   OUT=/some/dir bash benchmarks/gpu_check.sh
set -uo pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:-benchmarks/results/gpu-check}
mkdir -p "$OUT"
export PYTHONUNBUFFERED=1 SPCL_FAST_CHECKS=0

# Without a GPU every step below would only skip and "pass": stop here instead.
python3 -c "import torch, sys; sys.exit(0 if torch.cuda.is_available() else 1)" ||
  { echo "!! no CUDA device visible to torch: nothing to check" >&2; exit 2; }
# The image has torch, triton, pytest and pytest-benchmark; install this checkout without deps.
python3 -m pip install -q --no-deps --no-build-isolation -e . >/dev/null 2>&1 ||
  ln -sfn ../kernels spcl_fast/kernels  # fallback: make spcl_fast.kernels importable in place
{ nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader
  python3 -c "import torch, triton; print('torch', torch.__version__, 'triton', triton.__version__)"
} | tee "$OUT/device.txt"

status=0
step() {  # step NAME SECONDS CMD...: run with a time limit, keep the log, remember failures
  local name=$1 limit=$2; shift 2
  echo "== $name"
  timeout "$limit" "$@" 2>&1 | tail -n 60 | tee "$OUT/$name.log"
  local rc=${PIPESTATUS[0]}
  [ "$rc" -eq 0 ] || { echo "!! $name exited $rc"; status=1; }
}

step tests 180 python3 -m pytest tests/test_kernel_partition_attention.py \
  tests/test_kernel_info_nce.py -q -m "gpu or interpret" -p no:cacheprovider
step bench-attention 120 python3 -m pytest benchmarks/bench_attention.py --benchmark-only -q \
  -p no:cacheprovider -k "cuda and (vitb-224 or vitl-224-r0.5 or vitb-512-r0.5)"
step bench-loss 60 python3 -m pytest benchmarks/bench_loss.py --benchmark-only -q \
  -p no:cacheprovider -k cuda
# S-PCL training steps, ViT-B/16 224 bf16 b256: eager and compiled (most of the time is the two
# compilations), packed and in-place; one session, so one train-<device>.json.
step bench-train 150 python3 -m pytest benchmarks/bench_train.py --benchmark-only -q \
  -p no:cacheprovider -k cuda
find benchmarks/results -maxdepth 1 -name "*.json" -newer "$OUT/device.txt" -exec cp {} "$OUT"/ \;
ls -l "$OUT"
# A benchmark step that ran but wrote no JSON measured nothing (e.g. every row skipped).
ls "$OUT"/*.json >/dev/null 2>&1 || { echo "!! no benchmark JSON was written" >&2; status=1; }
exit $status
