#!/usr/bin/env bash
# The prepared device check (issues 4, 16 and 18): fits in 9 minutes on one GPU.
# Run from the repository root on a machine with a GPU and jax installed:
#   OUT=results_dir bash scripts/gpu_checks.sh [python]
# Steps (each under its own time limit, each logged, a failing step does not
# stop the next):
# 1. environment: GPU, driver, jax and jaxlib versions (20 s);
# 2. tests/kernels_test.py, tests/kernels_backward_test.py,
#    tests/kernels_select_test.py, tests/kernels_ranges_test.py and
#    tests/kernels_skip_test.py on the real backend (GpuKernelTest runs the
#    Triton gather, GpuBackwardTest its Pallas backward against the XLA one,
#    GpuSelectTest the fused selection, PublicApiTest the public dispatch, the
#    "gpu" cases of the ranges and skip tests the block kernels with index
#    ranges and tile skipping, compiled by Triton; the interpreter and TPU
#    cases are left out) (200 s);
# 3. the end-to-end benchmark, scripts/bench_attention.py --preset=gpu
#    (bf16, H = 128, d = 64; dense = cuDNN): n = 16384, 65536, then 4096 (the
#    target sizes first), k = 64, 256, causal, forward and forward+backward,
#    the default, "exact" and "block" selections, 3 interleaved pairs per
#    point; a point that does not fit in memory (the "full" selection's
#    T x S logits at large n) is recorded with its error. It starts no new
#    point after BENCH_BUDGET seconds (default 230) and is killed at 300 s;
#    its JSON is rewritten after every point, so a cut run keeps what it timed
#    (the figure and table.md are written when it ends on its own);
# 4. optional, off unless their seconds are set: the gather-kernel benchmark
#    (KERNEL_BENCH_SECONDS, scripts/bench_kernel.py, measured on 2026-11-28)
#    and the rest of the suite on the GPU (SUITE_SECONDS).
# Float32 matmuls run at "highest" precision in the tests: a GPU's DEFAULT is
# TF32, which the suite's float32 tolerances reject by design.
# BENCH_ARGS overrides the benchmark's grid flags (a CPU dry run:
# BENCH_ARGS="--dry_run --n=4096 --k=64" bash scripts/gpu_checks.sh).
set -uo pipefail
PY="${1:-python3}"
OUT="${OUT:-gpu_checks_out}"
mkdir -p "$OUT"
# GSPARSE_NATIVE=0: the native top-k is for the CPU backend; never build it here.
export PYTHONPATH=. PYTHONUNBUFFERED=1 GSPARSE_NATIVE=0
step() {  # step NAME SECONDS COMMAND...: runs COMMAND, logs to $OUT/NAME.log
  local name=$1 limit=$2
  shift 2
  echo "=== $name (limit ${limit}s) ===" | tee -a "$OUT/summary.txt"
  local t0=$SECONDS
  timeout "$limit" "$@" >"$OUT/$name.log" 2>&1
  local rc=$?
  echo "=== $name: rc=$rc, $((SECONDS - t0)) s ===" | tee -a "$OUT/summary.txt"
  tail -n 40 "$OUT/$name.log"
}
step env 20 bash -c "nvidia-smi; $PY -c 'import jax, jaxlib; print(jax.__version__, jaxlib.__version__, jax.devices())'"
step kernel_tests 200 env XLA_PYTHON_CLIENT_PREALLOCATE=false JAX_DEFAULT_MATMUL_PRECISION=highest \
  "$PY" -m pytest tests/kernels_test.py tests/kernels_backward_test.py tests/kernels_select_test.py \
  tests/kernels_ranges_test.py tests/kernels_skip_test.py \
  -v -rs -p no:cacheprovider -k "not Interpret and not Tpu"
# shellcheck disable=SC2086  # BENCH_ARGS is a list of flags
step bench_attention 300 env XLA_PYTHON_CLIENT_PREALLOCATE=false XLA_PYTHON_CLIENT_MEM_FRACTION=0.9 \
  "$PY" scripts/bench_attention.py --preset=gpu \
  ${BENCH_ARGS:---n=16384,65536,4096 --k=64,256 --causal=true --methods=default,exact,block --pairs=3} \
  --budget_s="${BENCH_BUDGET:-230}" --out_dir="$OUT/bench_attention"
if [ "${KERNEL_BENCH_SECONDS:-0}" -gt 0 ]; then
  step bench_kernel "$KERNEL_BENCH_SECONDS" env XLA_PYTHON_CLIENT_MEM_FRACTION=0.9 \
    "$PY" scripts/bench_kernel.py --n=4096,16384,65536 --k=32,128,512 --grad --block --tune \
    --repeats=5 --out="$OUT/bench_kernel_device.json"
fi
if [ "${SUITE_SECONDS:-0}" -gt 0 ]; then
  step suite "$SUITE_SECONDS" env XLA_PYTHON_CLIENT_PREALLOCATE=false \
    JAX_DEFAULT_MATMUL_PRECISION=highest "$PY" -m pytest tests -v -p no:cacheprovider -n 8 \
    --ignore=tests/kernels_test.py --ignore=tests/notebooks_test.py --continue-on-collection-errors
  echo "=== suite outcomes ===" | tee -a "$OUT/summary.txt"
  grep -Eo "(PASSED|FAILED|SKIPPED|ERROR)" "$OUT/suite.log" | sort | uniq -c | tee -a "$OUT/summary.txt"
  grep -E "FAILED|ERROR" "$OUT/suite.log" | head -40 | tee -a "$OUT/summary.txt"
fi
