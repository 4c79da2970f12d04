#!/usr/bin/env bash
# The papers' CIFAR-10 setting on one GPU: PreActResNet-18, PGD-10 training at 8/255, bf16 autocast, robust vs ds
# vs selective margin vs selective_ds (the `cifar10_gpu` suite of benchmarks/reproduce.py), about 5 minutes on an
# H100/H200-class GPU. For a GPU machine without internet, stage what it needs first, on a machine with internet:
#
#   benchmarks/gpu_preset.sh stage /path/to/data     # wheels + CIFAR-10 archive into .gpu/ (git-ignored, ~21 MB)
#
# then, on the GPU machine, with a copy of the repository and .gpu/ (torch, torchvision, lightning, torchmetrics,
# tensorboard, scikit-learn and matplotlib installed there; PYTHON names the interpreter, python3 by default):
#
#   benchmarks/gpu_preset.sh run [RECORDS_DIR]        # one JSON record per recipe, then the report's table
#
# benchmarks/gpu_speed.sh's last stage (cli_epoch: one CLI epoch, eager against compile_attack) reads the same
# .gpu/: the archive from .gpu/data, and jsonargparse & co. from .gpu/wheels where the machine lacks them.
#
# MODEL names another network overlay of configs/models/ (preact_resnet18, the default, wrn34_10 or wrn28_10); its
# records go to the suite cifar10_gpu_MODEL. A WideResNet does 9-12x PreActResNet-18's work per image:
#
#   MODEL=wrn34_10 benchmarks/gpu_preset.sh run [RECORDS_DIR]
#
# Its AutoAttack tests use torchattacks' port (10 iterations per attack; its records and report say so), not the
# reference code: pyautoattack's wheel (42 MB, mostly example weights) does not fit beside the 21 MB staged here in
# the 64 MiB a lent GPU machine takes. For the reference's numbers, evaluate a run's checkpoint afterwards on CPU:
# lightning-advsel evaluate (README, "Robust accuracy under AutoAttack").
set -euo pipefail
cd "$(dirname "$0")/.."
STAGE=.gpu
case "${1:-}" in
  stage)
    data="${2:?give the folder holding cifar10-jpeg/cifar10-jpeg.tar.gz (or cifar10-jpeg.tar.gz)}"
    mkdir -p "$STAGE/wheels" "$STAGE/data/cifar10-jpeg"
    # The packages the GPU image may lack, without their dependencies (torch & co. are already there).
    python -m pip download -q --no-deps -d "$STAGE/wheels" jsonargparse docstring-parser typeshed-client \
      torchattacks
    archive=""
    for f in "$data"/cifar10-jpeg/cifar10-jpeg.tar.gz "$data"/cifar10-jpeg.tar.gz; do
      [ -f "$f" ] && { archive="$f"; break; }
    done
    [ -n "$archive" ] || { echo "no cifar10-jpeg.tar.gz under $data" >&2; exit 2; }
    cp "$archive" "$STAGE/data/cifar10-jpeg/"
    du -sh "$STAGE"
    ;;
  run)
    records="${2:-benchmarks/records}"
    python="${PYTHON:-python3}"
    # The staged wheels into a folder of their own, and this checkout itself, on the path: no install into the
    # machine's environment (which may lack a setuptools recent enough to build this package).
    site="${SITE_DIR:-/tmp/advsel_site}"
    "$python" -m pip install -q --no-index --no-deps --upgrade --target "$site" "$STAGE"/wheels/*.whl
    export PYTHONPATH="$PWD:$site${PYTHONPATH:+:$PYTHONPATH}"
    nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader || true
    PYTHONUNBUFFERED=1 "$python" benchmarks/reproduce.py run cifar10_gpu --data-dir "$STAGE/data" \
      --records "$records" --runs "${RUNS_DIR:-/tmp/advsel_gpu_runs}" ${MODEL:+--model "$MODEL"}
    "$python" benchmarks/reproduce.py report --records "$records" --out "${REPORT:-/tmp/advsel_gpu_RESULTS.md}"
    cat "${REPORT:-/tmp/advsel_gpu_RESULTS.md}"
    ;;
  *)
    echo "usage: $0 stage DATA_DIR | run [RECORDS_DIR]" >&2; exit 2 ;;
esac
