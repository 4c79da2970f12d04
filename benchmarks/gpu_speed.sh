#!/usr/bin/env bash
# SPEED.md's GPU tables in one go on one CUDA GPU: ResNet-18 PGD-10 in bf16 with channels-last weights (images
# per second per recipe, the module against the plain loop, the share of the measured bf16 peak, and a profile
# of robust and selective training), then the same without channels-last, then with torch.compile. Each stage
# appends to OUT/gpu.json and keeps its printout in OUT/; a stage that fails or runs out of its time
# (STAGE_SECONDS, 180 by default: at most 9 minutes for the three stages) does not stop the next. The first
# stage is the whole measurement; the other two are comparisons. Needs torch, lightning and torchmetrics only;
# the package is used from this checkout (no install).
#
#   benchmarks/gpu_speed.sh [OUT]                 # default OUT: gpu-speed/
#   COMPILE=0 benchmarks/gpu_speed.sh OUT         # without the torch.compile stage
#   CUDAGRAPHS=1 benchmarks/gpu_speed.sh OUT      # and a fourth: torch.compile's reduce-overhead mode (CUDA graphs)
#   GPU_SPEED_ARGS="--device cpu --quick --precision 32-true" COMPILE=0 benchmarks/gpu_speed.sh OUT  # CPU check
#   MODEL=wrn34_10 benchmarks/gpu_speed.sh OUT    # another network: a configs/models/ overlay's name
set -uo pipefail
cd "$(dirname "$0")/.."
out="${1:-gpu-speed}"
mkdir -p "$out"
python="${PYTHON:-python3}"
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1
read -r -a extra <<< "${GPU_SPEED_ARGS:-}"
[ -n "${MODEL:-}" ] && extra+=(--model "$MODEL")
stage_seconds="${STAGE_SECONDS:-180}"
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader > "$out/gpu.txt" 2>&1 || true
failed=0

stage() {  # stage NAME ARGS...: one run of gpu_speed.py, its printout in OUT/NAME.txt
  local name="$1"
  shift
  echo "== $name: gpu_speed.py $*"
  if ! timeout "$stage_seconds" "$python" benchmarks/gpu_speed.py --json "$out/gpu.json" "$@" "${extra[@]}" \
      > "$out/$name.txt" 2>&1; then
    echo "   failed or out of its ${stage_seconds} s (see $out/$name.txt)"
    failed=1
  fi
  grep -E '^\||^busy|^whole script|^network' "$out/$name.txt" || tail -5 "$out/$name.txt"
}

stage bf16_channels_last --profile robust "selective margin"
stage bf16_nchw --no-channels-last
if [ "${COMPILE:-1}" = 1 ]; then
  stage bf16_channels_last_compile --compile --rounds 1  # a compilation per recipe and round
fi
if [ "${CUDAGRAPHS:-0}" = 1 ]; then
  stage bf16_channels_last_cudagraphs --compile-mode reduce-overhead --rounds 1  # torch.compile's CUDA graphs
fi
exit "$failed"
