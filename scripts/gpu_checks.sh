#!/usr/bin/env bash
# The prepared device check for the Pallas sparse-gather kernel (issue 4).
# Run from the repository root on a machine with a GPU and jax installed:
#   OUT=results_dir bash scripts/gpu_checks.sh [python]
# Steps (each under its own time limit, each logged, a failing step does not
# stop the next):
# 1. environment: GPU, driver, jax and jaxlib versions;
# 2. tests/kernels_test.py and tests/kernels_backward_test.py on the real
#    backend (GpuKernelTest runs the Triton kernel, GpuBackwardTest its Pallas
#    backward against the XLA one, PublicApiTest the public dispatch; the
#    interpreter and TPU classes are left out);
# 3. the benchmark: n = 4096, 16384, 65536, k = 32, 128, 512, token and block
#    kernels, forward and forward+backward, plus the BlockSizes sweep;
# 4. the rest of the suite on the GPU, as far as its time limit allows.
# Float32 matmuls run at "highest" precision in the tests: a GPU's DEFAULT is
# TF32, which the suite's float32 tolerances reject by design.
# BENCH_SIZES and SUITE_SECONDS override the sizes and the suite's time (a CPU
# dry run: BENCH_SIZES="--n=128 --k=64" SUITE_SECONDS=30).
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
  tail -n 25 "$OUT/$name.log"
}
step env 30 bash -c "nvidia-smi; $PY -c 'import jax, jaxlib; print(jax.__version__, jaxlib.__version__, jax.devices())'"
step kernel_tests 170 env XLA_PYTHON_CLIENT_PREALLOCATE=false JAX_DEFAULT_MATMUL_PRECISION=highest \
  "$PY" -m pytest tests/kernels_test.py tests/kernels_backward_test.py -v -rs -p no:cacheprovider \
  -k "not Interpret and not Tpu"
step bench 330 env XLA_PYTHON_CLIENT_MEM_FRACTION=0.9 "$PY" scripts/bench_kernel.py \
  ${BENCH_SIZES:---n=4096,16384,65536 --k=32,128,512} --grad --block --tune --repeats=5 \
  --out="$OUT/bench_kernel_device.json"
step suite "${SUITE_SECONDS:-60}" env XLA_PYTHON_CLIENT_PREALLOCATE=false \
  JAX_DEFAULT_MATMUL_PRECISION=highest "$PY" -m pytest tests -v -p no:cacheprovider -n 8 \
  --ignore=tests/kernels_test.py --ignore=tests/notebooks_test.py --continue-on-collection-errors
echo "=== suite outcomes ===" | tee -a "$OUT/summary.txt"
grep -Eo "(PASSED|FAILED|SKIPPED|ERROR)" "$OUT/suite.log" | sort | uniq -c | tee -a "$OUT/summary.txt"
grep -E "FAILED|ERROR" "$OUT/suite.log" | head -40 | tee -a "$OUT/summary.txt"
