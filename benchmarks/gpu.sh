#!/usr/bin/env bash
# Throughput of cmil_jax against its PyTorch twin on one GPU (H100/H200), in about 7 minutes
# on an H100 (at most 8: each backbone has a time budget, after which it reports what it has):
# ResNet-50 and ResNet-34 CMIL at 256 px, bfloat16, batch 128 (train step and inference; JAX,
# torch eager, torch.compile), each with the end-to-end rate of the training input pipeline on
# SBI training triples (when the data stack imports) against the device-only rate.
#
#   bash benchmarks/gpu.sh              # on the GPU machine, from the repository root
#   bash benchmarks/gpu.sh --profile    # then where the ResNet-50 step's time goes (+30-90 s)
#   bash benchmarks/gpu.sh --cpu-smoke  # (or CPU_SMOKE=1) tiny version on CPU, 1-2 minutes
#
# Writes $OUT/throughput_<backbone>.json and .log, $OUT/RESULTS_gpu.md, $OUT/env.txt and, with
# --profile, $OUT/profile_resnet50.md ($OUT defaults to ./bench_out). PYTHON selects the
# interpreter (default python3).
set -uo pipefail
cd "$(dirname "$0")/.."

SMOKE="${CPU_SMOKE:-0}"
PROFILE=0
for arg in "$@"; do
  case "$arg" in
    --cpu-smoke) SMOKE=1 ;;
    --profile) PROFILE=1 ;;
    *) echo "unknown argument: $arg" >&2; exit 2 ;;
  esac
done
PY="${PYTHON:-python3}"
OUT="${OUT:-$PWD/bench_out}"
mkdir -p "$OUT"

# Wheels the GPU image lacks (it has jax[cuda], flax, optax, orbax, torch, timm), carried in
# .whl/ because the machine has no package index; installed without dependencies, so every
# missing one must be there:
#   always (the benchmark builds its config with cmil_jax.config_base):
#     ml_collections (and PyYAML where the image lacks it);
#   for the end-to-end rate (cmil_jax.data: the synthetic TFDS records read by grain):
#     grain, array_record (cp312 manylinux), tensorflow_datasets, opencv_python_headless and
#     those of their requirements the image lacks (from their metadata: etils, cloudpickle,
#     portpicker, immutabledict, promise, simple_parsing, tensorflow_metadata, termcolor, toml,
#     wrapt, dm_tree; `python -c "import cmil_jax.data.inputs"` names the next one missing).
#     Without them the end-to-end rate is skipped, not the run.
if [ -d .whl ] && ls .whl/*.whl >/dev/null 2>&1; then
  "$PY" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade \
    --target /tmp/site .whl/*.whl && export PYTHONPATH="/tmp/site:${PYTHONPATH:-}"
fi
export PYTHONPATH="$PWD:${PYTHONPATH:-}" PYTHONUNBUFFERED=1
if ! err=$("$PY" -c "import ml_collections" 2>&1); then
  echo "error: ml_collections does not import ($(tail -n1 <<<"$err")); the benchmark's" \
    "config is cmil_jax.config_base's: put ml_collections-*.whl (and PyYAML's if the image" \
    "lacks it) in .whl/" >&2
  exit 1
fi

# JAX: latency-hiding scheduler, a persistent compilation cache, and 45% of the GPU memory
# preallocated (JAX's BFC allocator, faster than cuda_malloc_async, so TF_GPU_ALLOCATOR stays
# unset); PyTorch's caching allocator takes what it needs from the rest in the same process.
export XLA_FLAGS="${XLA_FLAGS:-} --xla_gpu_enable_latency_hiding_scheduler=true"
export JAX_COMPILATION_CACHE_DIR=/tmp/jax_cache
export JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS=1
export XLA_PYTHON_CLIENT_PREALLOCATE=true
export XLA_PYTHON_CLIENT_MEM_FRACTION=0.45
unset TF_GPU_ALLOCATOR
export TORCHINDUCTOR_CACHE_DIR=/tmp/inductor_cache
export PYTORCH_CUDA_ALLOC_CONF=expandable_segments:True

if [ "$SMOKE" = 1 ]; then
  export JAX_PLATFORMS=cpu CUDA_VISIBLE_DEVICES=""
  # Small nets (compile time, not width, dominates on CPU); the same code paths as on the GPU
  # except torch.compile (minutes on a small CPU).
  COMMON=(--image-size 64 --batch 4 --dtype float32 --backbone-width 16 --steps 2 --warmup 1 --windows 2 --no-compile)
  RUNS=("resnet10 150 --jax-variant conv_xla" "resnet18 90")
  E2E=(--end-to-end --e2e-workers 1 --e2e-examples 16 --e2e-steps 2)
  PROFILE_ARGS=(--backbone resnet10 --image-size 64 --batch 4 --dtype float32 --backbone-width 16 --steps 2 --warmup 1)
else
  COMMON=(--image-size 256 --batch 128 --dtype bfloat16 --steps 20 --warmup 5 --windows 5)
  # backbone, seconds (JAX and torch.compile compiles take most of it), extra flags.
  RUNS=("resnet50 300" "resnet34 170")
  # SBI triples: 43 per step, the first 128 of their 129 images (the step's compiled shape).
  E2E=(--end-to-end --e2e-steps 20)
  PROFILE_ARGS=(--backbone resnet50 --image-size 256 --batch 128 --dtype bfloat16 --steps 5 --warmup 3)
fi

{
  date; uname -a; "$PY" --version
  nvidia-smi --query-gpu=name,memory.total,driver_version,clocks.max.sm --format=csv 2>/dev/null || true
  grep -m1 "model name" /proc/cpuinfo; nproc
  "$PY" - <<'EOF'
import importlib
for m in ("jax", "jaxlib", "flax", "optax", "numpy", "torch", "ml_collections", "grain",
          "tensorflow_datasets"):
    try:
        print(m, importlib.import_module(m).__version__)
    except Exception as e:
        print(m, "unavailable:", type(e).__name__)
EOF
} > "$OUT/env.txt" 2>&1
cat "$OUT/env.txt"

# The end-to-end rate needs the data stack (grain, TFDS, array_record, OpenCV).
HAVE_DATA=0
"$PY" -c "import cmil_jax.data.inputs, cmil_jax.data.synthetic_dataset" 2>/dev/null && HAVE_DATA=1

jsons=()
for run in "${RUNS[@]}"; do
  set -- $run
  backbone=$1 budget=$2
  shift 2
  extra=("$@")
  if [ "$HAVE_DATA" = 1 ]; then extra+=("${E2E[@]}"); fi
  json="$OUT/throughput_${backbone}.json"
  echo "=== $backbone (at most ${budget}s)"
  # SIGTERM at the budget makes the script report the windows measured so far.
  timeout -k 30 "$budget" "$PY" -m benchmarks.throughput --backbone "$backbone" "${COMMON[@]}" \
    "${extra[@]}" --json "$json" 2>&1 | tee "$OUT/throughput_${backbone}.log" | grep -v "^W0000\|^I0000"
  [ -f "$json" ] && jsons+=("$json")
done
[ "$HAVE_DATA" = 1 ] || echo "end to end: skipped (the data stack does not import: grain," \
  "tensorflow_datasets, array_record, cv2; see the wheels above)" | tee -a "$OUT/env.txt"

if [ "${#jsons[@]}" -gt 0 ]; then
  {
    echo "## Throughput, $(date +%F) (device in each table's first line; versions in env.txt)"
    echo
    "$PY" -m benchmarks.throughput --report "${jsons[@]}"
  } > "$OUT/RESULTS_gpu.md"
  cat "$OUT/RESULTS_gpu.md"
fi

if [ "$PROFILE" = 1 ]; then
  echo "=== step profile (at most 90s)"
  timeout -k 10 90 "$PY" -m benchmarks.profile_step "${PROFILE_ARGS[@]}" --out "$OUT" 2>&1 \
    | grep -v "^W0000\|^I0000"
fi
