#!/usr/bin/env bash
# The GPU measurements of cmil_jax in one call of at most ~7.5 minutes (one H100/H200): every
# part has its own time budget, writes its results as it goes, and a part that fails or runs
# out of time does not stop the next. ResNet-50 CMIL, 256 px, bfloat16, batch 128:
#   1. ceilings      copy bandwidth and bf16 matrix rate (benchmarks/ceilings.py)
#   2. train step    JAX with flax BatchNorm, with the fused BatchNorm (runtime.batchnorm 'jnp'
#                    and 'pallas'), one XLA-flag experiment (EXPERIMENT below), the PyTorch
#                    twin eager and torch.compile'd, in alternating windows of one process;
#                    numerics: each variant's first step against flax BatchNorm's
#                    (benchmarks/throughput.py)
#   3. profile       the fastest JAX variant's kernels per kind against the step's floor
#                    (benchmarks/profile_step.py, benchmarks/step_floor.py)
#   4. memory        the largest batch that trains, JAX (fastest variant) and the twin, and
#                    the images/s at it (benchmarks/max_batch.py)
#   5. end to end    the grain input pipeline feeding the step, if the data stack imports and
#                    time is left
#
#   bash benchmarks/gpu.sh              # on the GPU machine, from the repository root
#   bash benchmarks/gpu.sh --cpu-smoke  # (or CPU_SMOKE=1) tiny shapes on the CPU, the same
#                                       # code paths (Pallas in interpret mode), no torch.compile
#   bash benchmarks/gpu.sh --rehearsal  # instead of the above: the paper recipe end to end for
#                                       # the budget (benchmarks/rehearsal.py), its own call
#
# $OUT (default ./bench_out) receives gpu.log (everything printed, the environment first),
# RESULTS_gpu.md (the summary, printed last), gpu_results.json (every part's figures) and
# profile_resnet50.md: four files, rewritten after each part. GPU_TOTAL_S (default 450) is the
# whole run's budget in seconds; PYTHON the interpreter (default python3); EXPERIMENT the
# --jax-variant of the XLA-flag experiment ('' for none).
set -uo pipefail
cd "$(dirname "$0")/.."

SMOKE="${CPU_SMOKE:-0}"
REHEARSAL=0
for arg in "$@"; do
  case "$arg" in
    --cpu-smoke) SMOKE=1 ;;
    --profile) ;;  # the profile is always part of the run now
    --rehearsal) REHEARSAL=1 ;;
    *) echo "unknown argument: $arg" >&2; exit 2 ;;
  esac
done
PY="${PYTHON:-python3}"
OUT="${OUT:-$PWD/bench_out}"
PARTS="$(mktemp -d /tmp/cmil_gpu_parts.XXXXXX)"
mkdir -p "$OUT"
exec > >(tee -a "$OUT/gpu.log") 2>&1
TOTAL_S="${GPU_TOTAL_S:-450}"
[ "$SMOKE" = 1 ] && TOTAL_S="${GPU_TOTAL_S:-900}"

# Wheels the GPU image lacks (it has jax[cuda], flax, optax, orbax, torch, timm, OpenCV), carried
# in .whl/ because the machine has no package index; installed without dependencies, so every
# missing one must be there: ml_collections (the config) always; grain, array_record,
# tensorflow_datasets and their missing requirements for the end-to-end part (without them it
# is skipped, not the run).
if [ "$SMOKE" != 1 ] && [ -d .whl ] && ls .whl/*.whl >/dev/null 2>&1; then
  "$PY" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade \
    --target /tmp/site .whl/*.whl && export PYTHONPATH="/tmp/site:${PYTHONPATH:-}"
fi
export PYTHONPATH="$PWD:${PYTHONPATH:-}" PYTHONUNBUFFERED=1
if ! err=$("$PY" -c "import ml_collections" 2>&1); then
  echo "error: ml_collections does not import ($(tail -n1 <<<"$err")); the benchmark's" \
    "config is cmil_jax.config_base's: put ml_collections-*.whl in .whl/" >&2
  exit 1
fi

# JAX: latency-hiding scheduler, a persistent compilation cache (the parts after the train step
# load its executables instead of compiling again), 45% of the GPU memory preallocated with
# PyTorch in the same process (the memory part gives each framework the whole device).
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
  NET=(--backbone resnet10 --backbone-width 8 --image-size 64 --dtype float32)
  BATCH=4
  STEP=(--steps 2 --warmup 1 --windows 2 --no-compile)
  VARIANTS=(--jax-variant bn_pallas)
  EXPERIMENT="${EXPERIMENT-}"
  CEIL=(--copy-mib 64 --matmul-n 512)
  MEM=(--start 4 --limit-gb 0.3 --steps 2)
  E2E=(--e2e-workers 1 --e2e-examples 16 --e2e-steps 2 --steps 2 --warmup 1 --windows 2)
  PROFILE=(--steps 2 --warmup 1)
else
  NET=(--backbone resnet50 --image-size 256 --dtype bfloat16)
  BATCH=128
  STEP=(--steps 20 --warmup 5 --windows 5)
  VARIANTS=(--jax-variant bn_jnp --jax-variant bn_pallas)
  # XLA's Triton GEMM fusions off (cuBLAS for every product), on the jnp fused BatchNorm.
  EXPERIMENT="${EXPERIMENT-bn_jnp+xla_gpu_enable_triton_gemm=false}"
  CEIL=()
  MEM=(--start 128 --steps 5)
  E2E=(--e2e-steps 20 --steps 20 --warmup 5 --windows 3)
  PROFILE=(--steps 5 --warmup 3)
fi
[ -n "$EXPERIMENT" ] && VARIANTS+=(--jax-variant "$EXPERIMENT")

left() { echo $((TOTAL_S - SECONDS)); }
# part NAME WANT_S RESERVE_S MIN_S CMD...: runs CMD with a budget of WANT_S seconds, less where
# fewer are left after keeping RESERVE_S for the parts after it; skipped under MIN_S.
part() {
  local name=$1 want=$2 reserve=$3 min=$4
  shift 4
  local budget=$(( $(left) - reserve ))
  (( budget > want )) && budget=$want
  if (( budget < min )); then
    echo "=== $name: skipped ($(left) s left, needs $min)"
    return 1
  fi
  echo "=== $name (at most ${budget} s; $(left) s of ${TOTAL_S} left) $(date -u +%T)"
  local t0=$SECONDS
  timeout -k 20 "$budget" "$@" 2>&1 | grep -v "^W0000\|^I0000"
  local rc=${PIPESTATUS[0]}
  echo "=== $name: exit $rc after $((SECONDS - t0)) s"
  return "$rc"
}
summary() { "$PY" -m benchmarks.gpu_report "$PARTS" "$OUT" > /dev/null 2>&1 || true; }

{
  date -u; uname -a; "$PY" --version
  nvidia-smi --query-gpu=name,memory.total,driver_version,clocks.sm,clocks.max.sm \
    --format=csv 2>/dev/null || true
  grep -m1 "model name" /proc/cpuinfo; nproc
  "$PY" - <<'EOF'
import importlib
for m in ("jax", "jaxlib", "flax", "optax", "numpy", "torch", "triton", "ml_collections",
          "grain", "tensorflow_datasets"):
    try:
        print(m, importlib.import_module(m).__version__)
    except Exception as e:
        print(m, "unavailable:", type(e).__name__)
EOF
}

# --rehearsal: only the paper recipe's dress rehearsal (benchmarks/rehearsal.py), the whole
# budget less a minute of compilation and data build, then stop.
if [ "$REHEARSAL" = 1 ]; then
  R=(--minutes $(( (TOTAL_S - 150) / 60 )) --out "$OUT/rehearsal")
  [ "$SMOKE" = 1 ] && R=(--smoke --out "$OUT/rehearsal")
  part rehearsal $((TOTAL_S - 10)) 0 60 "$PY" -m benchmarks.rehearsal "${R[@]}"
  rm -rf "$OUT/rehearsal/data" "$OUT/rehearsal/run/checkpoints" "$OUT/rehearsal/run/best" \
    "$OUT/rehearsal/hf" "$OUT/rehearsal/weights" "$PARTS"
  exit 0
fi

# 1. Ceilings.
part ceilings 30 400 10 "$PY" -m benchmarks.ceilings "${CEIL[@]}" --json "$PARTS/ceilings.json"
read -r COPY MATMUL < <("$PY" - "$PARTS/ceilings.json" <<'EOF'
import json, sys
try:
    c = json.load(open(sys.argv[1]))
    print(c["copy_gbs"], c["matmul_tflops"])
except Exception:
    print(4300, 790)  # KINDS.md's H200 figures when the measurement is missing
EOF
)
summary

# 2. Train step: the JAX variants and the twin, alternating, one process. --deadline-s keeps
# compiles from starting when they could not finish inside the budget.
TP_BUDGET=$(( $(left) - 155 )); (( TP_BUDGET > 265 )) && TP_BUDGET=265
part "train step" 265 155 60 "$PY" -m benchmarks.throughput "${NET[@]}" --batch "$BATCH" \
  "${STEP[@]}" --no-infer --kernels xla "${VARIANTS[@]}" --deadline-s $((TP_BUDGET - 30)) \
  --json "$PARTS/throughput.json"
BEST=$("$PY" -m benchmarks.gpu_report "$PARTS" --best 2>/dev/null)
BEST_ARGS=(); [ -n "$BEST" ] && BEST_ARGS=(--variant "$BEST")
echo "fastest JAX train step: ${BEST:-jax_train (flax BatchNorm)}"
summary

# 3. Profile of the fastest JAX variant against the floor at the measured ceilings.
part profile 50 105 25 "$PY" -m benchmarks.profile_step "${NET[@]}" --batch "$BATCH" \
  "${PROFILE[@]}" --kernels xla --no-torch "${BEST_ARGS[@]}" --copy-gbs "$COPY" \
  --matmul-tflops "$MATMUL" --out "$PARTS"
cp "$PARTS"/profile_*.md "$OUT"/ 2>/dev/null
summary

# 4. Memory: each framework alone on the device.
XLA_PYTHON_CLIENT_MEM_FRACTION=0.95 part "memory, JAX" 75 30 30 "$PY" -m benchmarks.max_batch \
  --framework jax "${NET[@]}" --kernels xla "${BEST_ARGS[@]}" "${MEM[@]}" --budget-s 35 \
  --json "$PARTS/memory_jax.json"
summary
part "memory, twin" 30 0 15 "$PY" -m benchmarks.max_batch --framework torch "${NET[@]}" \
  "${MEM[@]}" --budget-s 18 --json "$PARTS/memory_torch.json"
summary

# 5. End to end (the fastest variant's BatchNorm when it is a plain runtime.batchnorm one).
BN=(); case "$BEST" in bn_jnp) BN=(--batchnorm jnp) ;; bn_pallas) BN=(--batchnorm pallas) ;; esac
if "$PY" -c "import cmil_jax.data.inputs, cmil_jax.data.synthetic_dataset" 2>/dev/null; then
  part "end to end" 90 0 50 "$PY" -m benchmarks.throughput "${NET[@]}" --batch "$BATCH" \
    --kernels xla "${BN[@]}" --only jax_train --no-infer --end-to-end "${E2E[@]}" \
    --json "$PARTS/end_to_end.json"
else
  echo "=== end to end: skipped (the data stack does not import: grain, tensorflow_datasets," \
    "array_record; see the wheels above)"
fi

echo "=== summary ($SECONDS s in all)"
"$PY" -m benchmarks.gpu_report "$PARTS" "$OUT"
rm -rf "$PARTS"
