#!/usr/bin/env bash
# The prepared device check for the Pallas sparse-gather kernel (issue 4).
# Run from the repository root on a machine with a GPU (or TPU) and jax installed:
#   bash scripts/gpu_checks.sh [python]
# 1. the kernel tests on the real backend (GpuKernelTest / TpuKernelTest stop
#    skipping there; the interpret-mode subclasses are left out to save time);
# 2. the benchmark at n = 4096..65536, k = 32..512, forward and backward.
# Writes bench_kernel_device.json and prints both outputs. It has NOT been run
# yet: no GPU or TPU was available when it was written.
set -uo pipefail
PY="${1:-python}"
export PYTHONPATH=.
"$PY" -c "import jax; print(jax.__version__, jax.devices())"
"$PY" -m pytest tests/kernels_test.py -q -k "(GpuKernelTest or TpuKernelTest) and not Interpret" -rs
"$PY" scripts/bench_kernel.py --n=4096,16384,65536 --k=32,128,512 --grad \
  --repeats=5 --out=bench_kernel_device.json
