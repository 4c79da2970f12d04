#!/usr/bin/env bash
# SPEED.md's GPU tables in one go on one CUDA GPU, the most telling stage first, within TOTAL_SECONDS (480 by
# default: about 8 minutes) for the whole call:
#
#   1. attack_compiled: the training step with its PGD attack compiled into one graph (CUDA graphs) against the
#      same step with the eager attack and the plain loop, for robust, selective margin and ds
#      (benchmarks/compiled_speed.py: images per second, device busy share, launches per step, compile seconds,
#      share of the bf16 peak, and the issue's three targets). The option off and on, side by side.
#   2. bf16_channels_last: the module under a Trainer, ResNet-18 PGD-10 in bf16 with channels-last weights, against
#      the plain loop, with a profile of robust and selective training (benchmarks/gpu_speed.py).
#   3. attack_compiled_loop (LOOP=1, the default): stage 1 with the whole PGD loop as one graph instead of one step
#      replayed.
#   4. bf16_nchw (NCHW=1), bf16_channels_last_compile (COMPILE=1), bf16_channels_last_cudagraphs (CUDAGRAPHS=1):
#      the earlier comparisons, off by default.
#   5. cli_epoch (CLI_EPOCH=1, the default): one epoch from the command line on CIFAR-10's JPEG copy through
#      CIFAR10DataModule, data loading included, eager then --model.init_args.compile_attack true, for robust and
#      selective_margin (benchmarks/cli_epoch.py: the images per second a user sees). Its data: CIFAR10_DIR, by
#      default .gpu/data (what `benchmarks/gpu_preset.sh stage` leaves); it needs jsonargparse, installed from
#      .gpu/wheels into a folder of its own when the machine lacks it.
#
# Each stage writes its results as it finishes (OUT/compiled.json, compiled_speed.py's, recipe by recipe;
# OUT/gpu.json, gpu_speed.py's) and keeps its printout in OUT/NAME.txt; a stage that fails or runs out of its time
# (STAGE_SECONDS, 240 by default, or what is left of TOTAL_SECONDS) does not stop the next, and a stage that would
# start with less than 30 s left is skipped and named. Needs torch, lightning and torchmetrics only; the package
# is used from this checkout (no install).
#
#   benchmarks/gpu_speed.sh [OUT]                 # default OUT: gpu-speed/
#   LOOP=0 benchmarks/gpu_speed.sh OUT            # without stage 3
#   MODEL=wrn34_10 benchmarks/gpu_speed.sh OUT    # another network: a configs/models/ overlay's name
#   GPU_SPEED_ARGS="--device cpu --quick --precision 32-true" \
#     COMPILED_SPEED_ARGS="--device cpu --quick --precision 32-true --attack-backend aot_eager" \
#     CLI_EPOCH_ARGS="--device cpu --attack-backend aot_eager --trainer.limit_train_batches 2" \
#     CIFAR10_DIR=../shared/data benchmarks/gpu_speed.sh OUT   # the code path on CPU
set -uo pipefail
cd "$(dirname "$0")/.."
out="${1:-gpu-speed}"
mkdir -p "$out"
python="${PYTHON:-python3}"
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1
read -r -a gpu_args <<< "${GPU_SPEED_ARGS:-}"
read -r -a compiled_args <<< "${COMPILED_SPEED_ARGS:-}"
read -r -a cli_epoch_args <<< "${CLI_EPOCH_ARGS:-}"
if [ -n "${MODEL:-}" ]; then
  gpu_args+=(--model "$MODEL")
  compiled_args+=(--model "$MODEL")
  # The command line knows a network by its overlay; resnet18 is the base config's own.
  [ -f "configs/models/$MODEL.yaml" ] && cli_epoch_args+=(--config "configs/models/$MODEL.yaml")
fi
stage_seconds="${STAGE_SECONDS:-240}"
deadline=$((SECONDS + ${TOTAL_SECONDS:-480}))
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader > "$out/gpu.txt" 2>&1 || true
failed=0

stage() {  # stage NAME SCRIPT ARGS...: one run of benchmarks/SCRIPT, its printout in OUT/NAME.txt
  local name="$1" script="$2" left=$((deadline - SECONDS))
  shift 2
  if [ "$left" -lt 30 ]; then
    echo "== $name: skipped, ${left} s left of the call's ${TOTAL_SECONDS:-480} s"
    failed=1
    return
  fi
  local limit=$((left < stage_seconds ? left : stage_seconds))
  echo "== $name: $script $*"
  if ! timeout "$limit" "$python" "benchmarks/$script" "$@" > "$out/$name.txt" 2>&1; then
    echo "   failed or out of its ${limit} s (see $out/$name.txt)"
    failed=1
  fi
  grep -E '^\||^busy|^whole script|^network|^compiled attack check|compiled / eager' "$out/$name.txt" ||
    tail -5 "$out/$name.txt"
}

stage attack_compiled compiled_speed.py --json "$out/compiled.json" "${compiled_args[@]}"
stage bf16_channels_last gpu_speed.py --json "$out/gpu.json" --profile robust "selective margin" "${gpu_args[@]}"
if [ "${LOOP:-1}" = 1 ]; then
  stage attack_compiled_loop compiled_speed.py --json "$out/compiled.json" --attack-graph loop "${compiled_args[@]}"
fi
if [ "${NCHW:-0}" = 1 ]; then
  stage bf16_nchw gpu_speed.py --json "$out/gpu.json" --no-channels-last "${gpu_args[@]}"
fi
if [ "${COMPILE:-0}" = 1 ]; then
  stage bf16_channels_last_compile gpu_speed.py --json "$out/gpu.json" --compile --rounds 1 "${gpu_args[@]}"
fi
if [ "${CUDAGRAPHS:-0}" = 1 ]; then  # torch.compile's CUDA graphs around the network only
  stage bf16_channels_last_cudagraphs gpu_speed.py --json "$out/gpu.json" --compile-mode reduce-overhead --rounds 1 \
    "${gpu_args[@]}"
fi
if [ "${CLI_EPOCH:-1}" = 1 ]; then
  # The command line's parser is the one package this stage needs beyond torch and lightning: a bare GPU machine
  # gets it from gpu_preset.sh's staged wheels, beside (not into) its environment.
  if ! "$python" -c "import jsonargparse" > /dev/null 2>&1 && compgen -G ".gpu/wheels/*.whl" > /dev/null; then
    site="${SITE_DIR:-/tmp/advsel_site}"
    "$python" -m pip install -q --no-index --no-deps --upgrade --target "$site" .gpu/wheels/*.whl &&
      export PYTHONPATH="$PYTHONPATH:$site"
  fi
  stage cli_epoch cli_epoch.py --data-dir "${CIFAR10_DIR:-.gpu/data}" --json "$out/cli_epoch.json" \
    "${cli_epoch_args[@]}"
fi
exit "$failed"
