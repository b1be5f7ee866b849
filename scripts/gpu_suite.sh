#!/usr/bin/env bash
# The GPU suite (ENGINE.md "The GPU machine"): build here, run on a lent GPU in one device call,
# commit what comes back.
#
#   Here:       bash scripts/gpu_suite.sh build
#                 release binary + the test executables with GPU checks, stripped, into
#                 target/gpu-suite/ (with the git revision they were built from)
#   On the GPU: bash scripts/gpu_suite.sh run [SECONDS]
#                 device tool: run(command="bash scripts/gpu_suite.sh run 540",
#                                  carry=["target/gpu-suite"], timeout_s=600)
#               or the two halves in calls of their own (the checks can share the GPU with other
#               work, say a training run; the benchmark must have it alone):
#                 bash scripts/gpu_suite.sh checks [SECONDS]   # kernel checks, end to end, sanitizer
#                 bash scripts/gpu_suite.sh bench [SECONDS]    # the benchmark and its baseline
#   Here:       bash scripts/gpu_suite.sh unpack FILES_AT
#                 copies gpu-suite*.json and .log into bench/results/, named by revision
#   Here:       bash scripts/gpu_suite.sh smoke
#                 the run phase on the PTX emulator with tiny sizes: checks the script itself
#
# `run` spends at most SECONDS (default 540) in its steps, most important first: the kernel checks
# on the real driver (every op against the CPU, the tensor-core kernels), the end-to-end
# comparisons (whole networks and purifications, CUDA against CPU), then the benchmark with the
# PyTorch baseline side by side, then compute-sanitizer. Each step has its own time limit; a step
# that fails or runs out of time is recorded as such and the suite goes on. Whatever happens,
# $OUT/gpu-suite.json (revision, device, every step's status and time, every benchmark's JSON) and
# $OUT/gpu-suite.log (everything printed) are written.
set -uo pipefail

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$ROOT"
SUITE=target/gpu-suite
MODE="${1:-}"

# The test executables with GPU checks (backend_ops: its `cuda` variants; cuda_end_to_end: all).
TESTS=(backend_ops cuda_end_to_end)

build() {
  set -e
  cargo build --release --bin purifier
  rm -rf "$SUITE" && mkdir -p "$SUITE/bin"
  cp target/release/purifier "$SUITE/bin/"
  local args=()
  for t in "${TESTS[@]}"; do args+=(--test "$t"); done
  # The executables cargo built, from its JSON messages.
  cargo test --release --no-run --message-format=json "${args[@]}" |
    python3 -c '
import json, sys, shutil
for line in sys.stdin:
    m = json.loads(line)
    if m.get("reason") == "compiler-artifact" and m.get("executable") and m["target"]["kind"] == ["test"]:
        shutil.copy(m["executable"], sys.argv[1] + "/" + m["target"]["name"])
' "$SUITE/bin"
  strip "$SUITE"/bin/*
  { git rev-parse HEAD; git status --porcelain | grep -q . && echo dirty || echo clean; } > "$SUITE/REVISION"
  du -sh "$SUITE"
  echo "carry target/gpu-suite; revision $(head -n1 "$SUITE/REVISION") ($(tail -n1 "$SUITE/REVISION"))"
}

# ---- run: on the GPU machine (or, for `smoke`, here on the emulator) ----

find_nvrtc() {
  # NVRTC 13.0 (PTX ISA 9.0, what the driver of the GPU machines loads): PyTorch's wheel for
  # CUDA 13.0 brings it, the toolkit too.
  local dirs=("${NVRTC_LIB_DIR:-}")
  dirs+=("$(python3 -c 'import nvidia, os; print(os.path.join(list(nvidia.__path__)[0], "cu13", "lib"))' 2>/dev/null)")
  dirs+=(/usr/local/cuda/lib64 "$ROOT"/target/nvrtc-venv/lib/python3*/site-packages/nvidia/cu13/lib)
  for d in "${dirs[@]}"; do
    if [ -n "$d" ] && [ -e "$d/libnvrtc.so.13" ]; then echo "$d"; return; fi
  done
}

step() { # step NAME SECONDS COMMAND...: runs it with a time limit, logs it, records it
  local name=$1 limit=$(($2 * LIMIT_SCALE)); shift 2
  local left=$((DEADLINE - $(date +%s)))
  if [ "$left" -lt 20 ]; then
    echo "== $name: not run (the suite's time is spent)"
    printf '%s\tnot-run\t0\t-\n' "$name" >> "$STEPS"
    return
  fi
  [ "$limit" -gt "$left" ] && limit=$left
  echo "== $name (at most ${limit} s): $*"
  local started=$(date +%s.%N) rc status
  timeout --kill-after=10 "$limit" "$@" 2>&1 | tee "$WORK/step.out"
  rc=${PIPESTATUS[0]}
  case $rc in
    # A test that found no GPU passes after saying so: that is no pass.
    0) if grep -q "skipped: no CUDA device" "$WORK/step.out"; then status=skipped; else status=passed; fi ;;
    124|137) status=timed-out ;;
    *) status=failed ;;
  esac
  local seconds=$(python3 -c "import time; print(round(time.time() - $started, 1))")
  echo "== $name: $status (rc $rc, ${seconds} s)"
  printf '%s\t%s\t%s\t%s\n' "$name" "$status" "$seconds" "$rc" >> "$STEPS"
}

bench() { # bench NAME SECONDS ARGS...: one `purifier bench` into $WORK/NAME.json
  # With a baseline in ARGS, the baseline is stopped BASELINE_SHARE percent (default 70) of the way
  # into the step's limit, so that a slow one (torch.compile) leaves its finished rows, and ours,
  # instead of the step timing out with nothing.
  local name=$1 limit=$2; shift 2
  local stop=()
  if [[ " $* " == *" --baseline "* ]]; then
    local allowed=$((limit * LIMIT_SCALE)) left=$((DEADLINE - $(date +%s)))
    [ "$allowed" -gt "$left" ] && allowed=$left  # as `step` will cut it
    stop=(--baseline-timeout $((allowed * ${BASELINE_SHARE:-70} / 100 + 1)))
  fi
  step "bench $name" "$limit" "$SUITE/bin/purifier" bench --device "$DEVICE" --json "$WORK/bench-$name.json" \
    --batches "$BATCHES" --repeats "$REPEATS" --t-star "$T_STAR" --purify-batch "$PURIFY_BATCH" \
    --profile-batch "$PROFILE_BATCH" "$@" "${stop[@]}"
}

write_report() {
  python3 - "$STEPS" "$WORK" "$SUITE/REVISION" "$OUT/$REPORT.json" "$DEVICE" "$NVRTC" "$PHASES" "${SUITE_NOTE:-}" <<'EOF'
import datetime, glob, json, os, subprocess, sys
steps_file, work, revision_file, out, device, nvrtc, phases, note = sys.argv[1:]
revision, tree = (open(revision_file).read().split() + ["?", "?"])[:2] if os.path.exists(revision_file) else ("?", "?")
steps = []
for line in open(steps_file):
    name, status, seconds, rc = line.rstrip("\n").split("\t")
    steps.append(dict(name=name, status=status, seconds=float(seconds), rc=rc))
try:
    gpu = subprocess.run(["nvidia-smi", "--query-gpu=name,memory.total,driver_version,clocks.max.sm",
                          "--format=csv,noheader"], capture_output=True, text=True, timeout=20).stdout.strip()
except Exception as e:  # no nvidia-smi: the smoke run
    gpu = f"none ({e.__class__.__name__})"
benches = {}
for path in sorted(glob.glob(os.path.join(work, "bench-*.json"))):
    with open(path) as f:
        benches[os.path.basename(path)[len("bench-"):-len(".json")]] = json.load(f)
report = dict(suite="scripts/gpu_suite.sh", phases=phases, note=note, revision=revision, tree=tree, device=device, gpu=gpu,
              nvrtc=nvrtc, finished=datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
              steps=steps, passed=sum(s["status"] == "passed" for s in steps), total=len(steps), bench=benches)
with open(out, "w") as f:
    json.dump(report, f, indent=1)
print(f"wrote {out}: {report['passed']} of {report['total']} steps passed, revision {revision} ({tree})")
EOF
}

run() { # run SECONDS: the phases named in $PHASES (checks, bench or both)
  local budget=${1:-420}
  DEADLINE=$(( $(date +%s) + budget ))
  OUT="${OUT:-$ROOT/out}"
  mkdir -p "$OUT"
  WORK=$(mktemp -d)
  STEPS="$WORK/steps.tsv"
  : > "$STEPS"
  if [ ! -x "$SUITE/bin/purifier" ]; then
    echo "error: $SUITE/bin/purifier is missing: run 'bash scripts/gpu_suite.sh build' here and carry target/gpu-suite" >&2
    exit 1
  fi
  NVRTC="$(find_nvrtc)"
  if [ -z "$NVRTC" ]; then
    echo "error: no libnvrtc.so.13 found (set NVRTC_LIB_DIR)" >&2
    exit 1
  fi
  export LD_LIBRARY_PATH="$NVRTC${LD_LIBRARY_PATH:+:$LD_LIBRARY_PATH}"
  export PURIFIER_KERNEL_CACHE="$WORK/kernel-cache"
  export PURIFIER_BASELINE_SCRIPT="$ROOT/bench/torch_baseline.py"
  export RUST_BACKTRACE=1 PYTHONUNBUFFERED=1
  trap write_report EXIT
  {
    echo "gpu suite ($PHASES): revision $(tr '\n' ' ' < "$SUITE/REVISION"), device $DEVICE, budget ${budget} s, NVRTC $NVRTC"
    [ -n "${SUITE_NOTE:-}" ] && echo "note: $SUITE_NOTE"
    nvidia-smi 2>/dev/null || echo "(no nvidia-smi)"
    if [[ $PHASES == *checks* ]]; then checks; fi
    if [[ $PHASES == *bench* ]]; then benchmarks; fi
  } 2>&1 | tee "$OUT/$REPORT.log"
}

checks() {
  # 1. Kernel checks: every op of the CUDA backend against the CPU on the real driver, then the
  # end-to-end comparisons.
  # The end-to-end tests hold a CPU reference of whole networks: minutes of CPU, so two at a time.
  step "tests backend_ops" 120 "$SUITE/bin/backend_ops" cuda --test-threads 1 --nocapture
  step "tests cuda_end_to_end" 300 "$SUITE/bin/cuda_end_to_end" --test-threads 2 --nocapture
  # 2. compute-sanitizer over the op checks (refused on some of the GPU machines' runtimes).
  if [ "$DEVICE" = cuda ] && command -v compute-sanitizer > /dev/null; then
    step "compute-sanitizer memcheck" 90 compute-sanitizer --tool memcheck --error-exitcode 9 \
      "$SUITE/bin/backend_ops" cuda --test-threads 1
  fi
}

benchmarks() {
  local py=python3
  python3 -c 'import torch; assert torch.cuda.is_available()' 2>/dev/null || py=""
  # 3. The benchmark, the PyTorch baseline side by side (when torch sees the GPU).
  local baseline=()
  [ -n "$py" ] && [ "$DEVICE" = cuda ] && baseline=(--baseline "$py")
  # Every row of one bench call is lost if the call runs out of time, so the long parts get
  # calls of their own, most wanted first: the guided purifications (UNet rows and the per-op
  # breakdown at batch 1, where launch latency and small tiles show, 3 repeats) with the attack
  # gradient at t* 100, batch 64 (about 5 s each on an H200, so the other steps skip it);
  # torch.compile, which compiles per shape (minutes), at batch 256 only, the target's, its forward
  # only (at dddc2c9, batches 1 and 256 with the VJP ran the step out of its 180 s after batch 1);
  # f32 last, with 3 repeats (one f32 purification at t* 100, batch 64 is 5 s on an H200: 10 of
  # them ran the first run's step out of its 60 s).
  # The kernels' start-up (every file compiled by NVRTC, then read from the cache) is measured in
  # the first call only (tens of seconds of NVRTC); the others --skip-start-up. The first call's
  # per-op profile is at batch 256 (TARGET_PROFILE_BATCH), where the forward + VJP target is set.
  PROFILE_BATCH=$TARGET_PROFILE_BATCH bench "$LARGE-bf16" 180 --config "$LARGE" --precision bf16 --modes none \
    --skip-attack-gradient \
    "${baseline[@]}" ${baseline:+--baseline-variants eager,graphs}
  BATCHES=1 REPEATS=3 PROFILE_BATCH=1 bench "$LARGE-bf16-guided" 120 --config "$LARGE" --precision bf16 \
    --modes pixel,adversarial --skip-start-up "${baseline[@]}" ${baseline:+--baseline-variants eager}
  # Split-K's worth at small batch: the same UNet rows with it off (PURIFIER_CONV_SPLIT_K=off).
  PURIFIER_CONV_SPLIT_K=off BATCHES=$SPLIT_BATCHES T_STAR=1 PROFILE_BATCH=1 bench "$LARGE-bf16-no-split-k" 60 \
    --config "$LARGE" --precision bf16 --modes none --skip-attack-gradient --skip-start-up
  # The wide conv tile's worth at large batch. By default only the input gradient takes it (the
  # forward ran faster without it at dddc2c9); the same rows with it nowhere (PURIFIER_CONV_WIDE=off:
  # what it does for the input gradient, on the 16-bit dout it reads since) and everywhere (=on:
  # whether the forward's loss still holds), each with its per-op profile at batch 64.
  PURIFIER_CONV_WIDE=off BATCHES=$WIDE_BATCHES T_STAR=1 bench "$LARGE-bf16-no-wide" 60 \
    --config "$LARGE" --precision bf16 --modes none --skip-attack-gradient --skip-start-up
  PURIFIER_CONV_WIDE=on BATCHES=$WIDE_BATCHES T_STAR=1 bench "$LARGE-bf16-wide-forward" 60 \
    --config "$LARGE" --precision bf16 --modes none --skip-attack-gradient --skip-start-up
  # The 16-bit copies of finished gradients (the convolutions' dout on cp.async) at the forward +
  # VJP target's batches: the same rows without them (PURIFIER_GRADIENT_COPIES=off).
  PURIFIER_GRADIENT_COPIES=off BATCHES=$WIDE_BATCHES T_STAR=1 bench "$LARGE-bf16-no-gradient-copies" 45 \
    --config "$LARGE" --precision bf16 --modes none --skip-attack-gradient --skip-start-up
  BATCHES=$COMPILE_BATCHES T_STAR=1 bench "$LARGE-bf16-compile" 180 --config "$LARGE" --precision bf16 --modes none \
    --skip-attack-gradient --skip-start-up \
    "${baseline[@]}" ${baseline:+--baseline-variants compile}
  # (The smoke run's LARGE is cifar10-small: this step would repeat, and overwrite, its first.)
  if [ "$LARGE" != cifar10-small ]; then
    bench cifar10-small-bf16 90 --config cifar10-small --precision bf16 --modes none --skip-attack-gradient \
      --skip-start-up "${baseline[@]}" ${baseline:+--baseline-variants eager}
  fi
  bench "$LARGE-f16" 45 --config "$LARGE" --precision f16 --modes none --skip-attack-gradient --skip-start-up
  REPEATS=$F32_REPEATS bench "$LARGE-f32" 120 --config "$LARGE" --precision f32 --modes none --skip-attack-gradient --skip-start-up \
    "${baseline[@]}" \
    ${baseline:+--baseline-variants eager,graphs}
}

case "$MODE" in
  build) build ;;
  run|checks|bench)
    DEVICE=cuda LIMIT_SCALE=1 LARGE=cifar10 T_STAR=100 PURIFY_BATCH=64 PROFILE_BATCH=64 BATCHES=1,16,64,256 REPEATS=10
    F32_REPEATS=3
    TARGET_PROFILE_BATCH=256
    SPLIT_BATCHES=1,16 WIDE_BATCHES=64,256 COMPILE_BATCHES=256
    if [ "$MODE" = run ]; then PHASES=checks,bench REPORT=gpu-suite; else PHASES=$MODE REPORT=gpu-suite-$MODE; fi
    run "${2:-540}" ;;
  smoke)
    # Here, without a GPU: the same steps on the PTX emulator, tiny sizes, no baseline.
    # The emulator is some thousand times slower than a GPU: each step gets 6 times its limit.
    DEVICE=emulator LIMIT_SCALE=6 LARGE=cifar10-small T_STAR=1 PURIFY_BATCH=1 PROFILE_BATCH=1 BATCHES=1 REPEATS=1
    F32_REPEATS=1  # (3, as on the GPU, ran the f32 step out of its 720 s here)
    TARGET_PROFILE_BATCH=1
    SPLIT_BATCHES=1 WIDE_BATCHES=2 COMPILE_BATCHES=1
    OUT="${OUT:-$ROOT/target/gpu-suite-smoke}" PHASES=checks,bench REPORT=gpu-suite
    run "${2:-3600}" ;;
  unpack)
    files_at="${2:?usage: gpu_suite.sh unpack FILES_AT}"
    mkdir -p bench/results
    found=0
    for json in "$files_at"/gpu-suite*.json; do
      [ -e "$json" ] || continue
      report=$(basename "$json" .json)
      rev=$(python3 -c 'import json,sys; print(json.load(open(sys.argv[1]))["revision"][:10])' "$json")
      name="bench/results/$report-$(date -u +%Y-%m-%d)-$rev"
      cp "$json" "$name.json"
      cp "$files_at/$report.log" "$name.log"
      echo "wrote $name.json and $name.log: commit them"
      found=1
    done
    [ "$found" = 1 ] || { echo "error: no gpu-suite*.json in $files_at" >&2; exit 1; } ;;
  *)
    sed -n '2,22p' "$0"
    exit 2 ;;
esac
