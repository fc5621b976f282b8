#!/usr/bin/env bash
# The device check, in calls of at most 9 minutes on one H100/H200 from a cold Triton cache
# (a fresh machine per call, no network, nothing installed):
#   bash benchmarks/gpu_check.sh [core]   # bf16/fp16 kernels at head dim 64: gpu tests, then the
#                                         # kernel (beside torch's varlen attention where the
#                                         # installed torch has it, and SDPA per segment, at 49-
#                                         # and 98-token segments), loss (and InfoNCE's two
#                                         # backward designs) and ViT-B/16 step benchmarks
#   bash benchmarks/gpu_check.sh tests    # the rest of the gpu tier and the interpret tier on CUDA
#   bash benchmarks/gpu_check.sh bench    # the rest of the benchmarks, autotuned
# Compiles dominate a cold start (each kernel specialisation is 1-3 s of CPU), so `core` runs
# one fixed config per kernel (SPCL_FAST_AUTOTUNE=0) and few specialisations. Every step has
# a time limit; pytest is stopped with SIGINT so the rows measured so far are still saved.
# Test logs (and JUnit XML), benchmark JSON and a summary table land in $OUT (default
# benchmarks/results/gpu-check); the exit status is non-zero if any step failed.
# DRY_RUN=1 prints each step's command instead of running it (tests/test_aot_gpu_check.py).
set -uo pipefail
cd "$(dirname "$0")/.."
PART=${1:-core}
OUT=${OUT:-benchmarks/results/gpu-check}
DRY_RUN=${DRY_RUN:-0}
# The benchmarks write their JSON straight into $OUT (benchmarks/common.py reads it).
export PYTHONUNBUFFERED=1 SPCL_FAST_CHECKS=0 SPCL_BENCH_RESULTS="$OUT"

status=0
step() {  # step NAME SECONDS CMD...: run with a time limit, keep the log, remember failures
  local name=$1 limit=$2; shift 2
  if [ "$DRY_RUN" = 1 ]; then printf '%q ' "$@"; echo; return; fi
  echo "== $name ($limit s at most)"
  timeout -s INT -k 20 "$limit" "$@" 2>&1 | tail -n 60 | tee "$OUT/$name.log"
  local rc=${PIPESTATUS[0]}
  [ "$rc" -eq 0 ] || { echo "!! $name exited $rc"; status=1; }
}
tests() { step "$1" "$2" python3 -m pytest -q -p no:cacheprovider --junitxml="$OUT/$1.xml" "${@:3}"; }
bench() { step "$1" "$2" python3 -m pytest -q -p no:cacheprovider --benchmark-only "${@:3}"; }

case "$PART" in
  core | tests | bench) ;;
  *) echo "usage: bash benchmarks/gpu_check.sh [core|tests|bench]" >&2; exit 2 ;;
esac

if [ "$DRY_RUN" != 1 ]; then
  # Without a GPU every step below would only skip and "pass": stop here instead.
  python3 -c "import torch, sys; sys.exit(0 if torch.cuda.is_available() else 1)" ||
    { echo "!! no CUDA device visible to torch: nothing to check" >&2; exit 2; }
  mkdir -p "$OUT"
  # No install: the kernels package lives at kernels/ and installs as spcl_fast.kernels.
  if ! python3 -c "import spcl_fast.kernels" 2>/dev/null; then
    ln -sn ../kernels spcl_fast/kernels && trap 'rm -f spcl_fast/kernels' EXIT
  fi
  { nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader
    python3 -c "import torch, triton; print('torch', torch.__version__, 'triton', triton.__version__)"
    echo "part $PART"
  } | tee "$OUT/device.txt"
fi

KERNEL_TESTS=(tests/test_kernel_partition_attention.py tests/test_kernel_info_nce.py)
CORE_TESTS="(vit_shapes and x12x64 and not 2x1024) or bitwise or host_sync or long_segment \
or (feature_sizes and (256-bf16 or 256-fp16)) or small_and_odd or large_batch or deterministic \
or linear_in_batch"
case "$PART" in
  core)
    export SPCL_FAST_AUTOTUNE=0
    tests tests-core 200 "${KERNEL_TESTS[@]}" -m gpu -k "$CORE_TESTS"
    # ViT-B/16 at 224 px, segments of 98 (r0.5) and 49 (k0.5) tokens: the kernel, torch's
    # varlen_attn (skips where torch lacks it) and gather+pad+SDPA at 256 images, SDPA per
    # segment at 32: every group holds its peers, so the summary's ratios come from this call.
    bench bench-attention 115 benchmarks/bench_attention.py \
      -k "cuda and (vitb-224-r0.5 or vitb-224-k0.5) and not Flex"
    bench bench-loss 45 benchmarks/bench_loss.py -k "cuda and bf16"
    # InfoNCE's backward in both designs at M = 16K beside the cost model's bound and choice.
    bench bench-info-nce-bwd 40 benchmarks/bench_info_nce_bwd.py -k "M16384"
    bench bench-step 60 benchmarks/bench_step.py -k cuda
    bench bench-train 60 benchmarks/bench_train.py -k "cuda and eager"
    ;;
  tests)
    tests tests-gpu 300 "${KERNEL_TESTS[@]}" -m gpu -k "not ($CORE_TESTS)"
    tests tests-interpret 150 "${KERNEL_TESTS[@]}" tests/test_kernel_autotune.py -m interpret
    ;;
  bench)
    bench bench-attention 240 benchmarks/bench_attention.py \
      -k "cuda and not ((vitb-224-r0.5 or vitb-224-k0.5) and not Flex)"
    bench bench-loss 60 benchmarks/bench_loss.py -k "cuda and fp32"
    bench bench-info-nce-bwd 30 benchmarks/bench_info_nce_bwd.py -k "M65536"
    bench bench-train 150 benchmarks/bench_train.py -k "cuda and compiled"
    ;;
esac
[ "$DRY_RUN" = 1 ] && exit 0

python3 benchmarks/gpu_summary.py "$OUT" | tee "$OUT/summary.md"
# A benchmark step that ran but wrote no JSON measured nothing (e.g. every row skipped).
if [ "$PART" != tests ] && ! ls "$OUT"/*.json >/dev/null 2>&1; then
  echo "!! no benchmark JSON was written" >&2; status=1
fi
exit $status
