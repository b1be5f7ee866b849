#!/usr/bin/env bash
# One device call of the training recipes, and the two local steps around it.
#
#   Here, once per session (copies the data the device cannot see into data-cache/):
#     bash weights/device_train.sh prepare
#   On the device (one call each, at most 10 minutes; see weights/README.md for the carry list):
#     bash weights/device_train.sh ddpm [SECONDS]   # train the DDPM UNet, resume if possible,
#                                                   # export + evaluate, bundle into $OUT
#     bash weights/device_train.sh aux  [SECONDS]   # the same for the auxiliary ResNet-20
#     bash weights/device_train.sh both [SECONDS]   # both at once, sharing the GPU
#   Here, after each call (files_at: the folder the device tool puts $OUT's files in):
#     bash weights/device_train.sh unpack FILES_AT
#
# SECONDS (default 540) is the whole call's budget: the trainer stops in time to save, export
# and evaluate, and this script then packs the results into $OUT as a tar split into 15 MiB
# parts (the device tool brings back at most 8 files of 16 MiB). Set COMPILE=0 to skip
# torch.compile, PY to choose the Python (default python3), EXTRA_ARGS to pass more flags to
# the DDPM trainer (EXTRA_ARGS_AUX to the auxiliary one), ALLOW_CPU=1 to run without a GPU
# (a smoke test of this script).
set -euo pipefail

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$ROOT"
PY="${PY:-python3}"
MODE="${1:-}"
SECONDS_TOTAL="${2:-540}"
SHARED="$(dirname "$ROOT")/shared"
export PYTHONUNBUFFERED=1

need_data() {
  for f in data-cache/train_jpeg.tar.gz data-cache/test_lossless.bin; do
    if [ ! -f "$f" ]; then
      echo "error: $f is missing: run 'bash weights/device_train.sh prepare' here and carry data-cache/ files (weights/README.md)" >&2
      exit 1
    fi
  done
}

gpu_banner() {
  nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader || true
  "$PY" -c 'import torch; print("torch", torch.__version__, "cuda", torch.cuda.is_available())'
  if [ "${ALLOW_CPU:-0}" != 1 ]; then
    "$PY" -c 'import torch, sys; sys.exit(0 if torch.cuda.is_available() else "error: no CUDA GPU visible to PyTorch (ALLOW_CPU=1 for a smoke test)")'
  fi
}

bundle() {  # bundle NAME FILE... : tar the files (those that exist) into $OUT/NAME.tar.part-XX
  local name="$1"; shift
  local out="${OUT:-$ROOT/data-cache/out}"
  mkdir -p "$out"
  local files=()
  for f in "$@"; do [ -e "$f" ] && files+=("$f"); done
  tar cf - "${files[@]}" | split -b 15m -d - "$out/$name.tar.part-"
  ls -l "$out"
}

train_ddpm() {  # the trainer's own budget leaves ~40 s for this script's start and the bundling;
                # inside it, 100 s are kept for export and evaluation
  mkdir -p data-cache/runs/ddpm
  local compile_flag
  compile_flag=$([ "${COMPILE:-1}" = 1 ] && echo --compile || true)
  "$PY" weights/train_ddpm.py --run-dir data-cache/runs/ddpm --resume --steps 800000 \
    --time-budget $((SECONDS_TOTAL - 40)) --reserve 100 $compile_flag --export --evaluate ${EXTRA_ARGS:-} \
    2>&1 | tee data-cache/runs/ddpm/last_call.log
}

train_aux() {
  mkdir -p data-cache/runs/auxiliary
  "$PY" weights/train_auxiliary.py --run-dir data-cache/runs/auxiliary --train --resume \
    --time-budget $((SECONDS_TOTAL - 40)) --reserve 60 --export --evaluate ${EXTRA_ARGS_AUX:-} \
    2>&1 | tee data-cache/runs/auxiliary/last_call.log
}

bundle_ddpm() {
  bundle ddpm_bundle weights/ddpm_cifar10_small.safetensors weights/ddpm_cifar10_small.md \
    weights/ddpm_cifar10_small_loss.png weights/ddpm_cifar10_small_samples.png \
    weights/ddpm_cifar10_small_purified.png data-cache/runs/ddpm/portable \
    data-cache/runs/ddpm/config.json data-cache/runs/ddpm/loss_log.csv \
    data-cache/runs/ddpm/evaluation.json data-cache/runs/ddpm/last_call.log
}

bundle_aux() {
  bundle auxiliary_bundle weights/auxiliary_resnet20_linf.safetensors weights/auxiliary_resnet20_linf.md \
    weights/auxiliary_resnet20_linf_loss.png weights/auxiliary_resnet20_linf_examples.png \
    data-cache/runs/auxiliary/checkpoint.pt data-cache/runs/auxiliary/config.json \
    data-cache/runs/auxiliary/loss_log.csv data-cache/runs/auxiliary/evaluation.json \
    data-cache/runs/auxiliary/last_call.log
}

case "$MODE" in
  prepare)
    mkdir -p data-cache
    install -v -m 0644 "$SHARED/data/cifar10/train_jpeg.tar.gz" "$SHARED/data/cifar10/test_lossless.bin" \
      "$SHARED/weights/resnet20_cifar10.safetensors" data-cache/
    # What travels: the working tree (tracked + untracked-not-ignored files) plus the carry;
    # the device tool refuses more than 64 MiB in all.
    tree=$(git ls-files -co --exclude-standard -z | xargs -0 -r du -cb 2>/dev/null | tail -1 | cut -f1)
    data=$(du -cb data-cache/train_jpeg.tar.gz data-cache/test_lossless.bin data-cache/resnet20_cifar10.safetensors | tail -1 | cut -f1)
    echo "working tree: $((tree / 1048576)) MiB; data: $((data / 1048576)) MiB"
    echo "carry (every call): data-cache/train_jpeg.tar.gz data-cache/test_lossless.bin data-cache/resnet20_cifar10.safetensors"
    for extra in data-cache/runs/ddpm/portable data-cache/runs/auxiliary; do
      if [ -d "$extra" ]; then
        size=$(du -cb "$extra" | tail -1 | cut -f1)
        total=$(( (tree + data + size) / 1048576 ))
        echo "  + $extra to resume that run: $((size / 1048576)) MiB, $total MiB in all (limit 64)"
        if [ "$total" -ge 64 ] && [ -f "$extra/model_f16.safetensors" ]; then
          echo "    over the limit: rm $extra/model_f16.safetensors (the run then restarts its model from the EMA)"
        fi
      fi
    done
    exit 0
    ;;
  unpack)
    DIR="${2:?usage: device_train.sh unpack FILES_AT}"
    found=0
    for name in ddpm_bundle auxiliary_bundle; do
      if ls "$DIR/$name.tar.part-"* >/dev/null 2>&1; then
        cat "$DIR/$name.tar.part-"* | tar xvf - -C "$ROOT"
        found=1
      fi
    done
    [ "$found" = 1 ] || { echo "error: no *_bundle.tar.part-* in $DIR" >&2; exit 1; }
    exit 0
    ;;
  ddpm)
    need_data
    gpu_banner
    status=0; train_ddpm || status=$?
    bundle_ddpm
    exit "$status"  # what was saved comes back even when a step failed
    ;;
  aux)
    need_data
    gpu_banner
    status=0; train_aux || status=$?
    bundle_aux
    exit "$status"
    ;;
  both)
    # Both recipes at once on the one GPU: the ResNet-20's small kernels should leave most of an
    # H100 idle (not yet measured), and the two processes take turns on it.
    need_data
    gpu_banner
    train_aux 2>&1 | sed -u 's/^/[aux] /' &
    aux_pid=$!
    ddpm_status=0; train_ddpm 2>&1 | sed -u 's/^/[ddpm] /' || ddpm_status=$?
    aux_status=0; wait "$aux_pid" || aux_status=$?
    bundle_aux
    bundle_ddpm
    [ "$ddpm_status" = 0 ] && [ "$aux_status" = 0 ] || { echo "ddpm exit $ddpm_status, aux exit $aux_status" >&2; exit 1; }
    exit 0
    ;;
  *)
    sed -n '2,22p' "$0"
    exit 2
    ;;
esac
