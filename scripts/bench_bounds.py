"""Times bound calls on Python numbers: the first call in a fresh process, then later calls.

Each function runs in its own fresh process (so the first call includes every
one-time cost after `import gsparse.bounds`): one call at sigma = 1.00, then
`--calls` later ones with new values (sigma = 1.01, 1.02, ...; with `--vary_n`
also n = 1025, 1026, ..., so nothing kept per n is reused), each ended by
`jax.block_until_ready`. Prints the first call and the median and minimum of
the later ones, in wall time and in the process's CPU time
(`time.process_time`, steadier on a loaded machine), and the 1-minute load
average before and after.

Settings (those of docs/results/2026-11-30-bounds-scan-cpu.md):
`norms = InteractionNorms(3.0, 1.2, 2.0)`, n = 1024, eps = 0.01, k = 32,
delta = 1e-4, `value_norm = 1.0`, `row_sparsity_bound` at tau = 2 sigma,
`rank_layers_by_sparsity` on float32 `[3, 64, 2, 32]` normal weights / 8
(query weights times sigma), n = 512; `isotropic_error_bound` with
`value_norms = InteractionNorms(8.0, 1.5, 4.0)`, k = 32.

  PYTHONPATH=. python scripts/bench_bounds.py [--calls 25] [--vary_n] [FUNCTION ...]
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time

FUNCTIONS = (
  "tau_range",
  "topk_error_bound",
  "sparsity_bound",
  "sparsity_eps_bound",
  "row_sparsity_bound",
  "rank_layers_by_sparsity",
  "isotropic_error_bound",
)


def _call(name: str, i: int, vary_n: bool = False):
  import numpy as np

  import gsparse.bounds as B

  sigma = 1.0 + 0.01 * i
  n = 1024 + i if vary_n else 1024
  norms = B.InteractionNorms(3.0, 1.2, 2.0)
  if name == "tau_range":
    return B.tau_range(n, sigma, norms)
  if name == "topk_error_bound":
    return B.topk_error_bound(n, sigma, norms, k=32, value_norm=1.0)
  if name == "sparsity_bound":
    return B.sparsity_bound(n, sigma, norms, eps=0.01)
  if name == "sparsity_eps_bound":
    return B.sparsity_eps_bound(n, sigma, norms, k=32)
  if name == "row_sparsity_bound":
    return B.row_sparsity_bound(n, 2.0 * sigma, eps=0.01, delta=1e-4)
  if name == "rank_layers_by_sparsity":
    w = np.random.default_rng(0).standard_normal((2, 3, 64, 2, 32)).astype(np.float32) / 8
    return B.rank_layers_by_sparsity(w[0] * np.float32(sigma), w[1], n=512, eps=0.01)
  if name == "isotropic_error_bound":
    vnorms = B.InteractionNorms(8.0, 1.5, 4.0)
    return B.isotropic_error_bound(n, sigma, norms, value_norms=vnorms, k=32)
  raise ValueError(f"unknown function {name!r}")


def _child(name: str, calls: int, vary_n: bool) -> None:
  import jax

  import gsparse.bounds  # noqa: F401  (the import is not timed)

  wall, cpu, first = [], [], None
  for i in range(calls + 1):
    w0, c0 = time.perf_counter(), time.process_time()
    out = jax.block_until_ready(_call(name, i, vary_n))
    w, c = time.perf_counter() - w0, time.process_time() - c0
    if i == 0:
      first = (w, c, jax.tree.map(lambda x: x.tolist(), out))
    else:
      wall.append(w)
      cpu.append(c)
  print(json.dumps({"first": first, "wall": wall, "cpu": cpu}))


def main() -> None:
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("functions", nargs="*", default=list(FUNCTIONS))
  parser.add_argument("--calls", type=int, default=25, help="later calls timed per function")
  parser.add_argument("--vary_n", action="store_true", help="n = 1024 + i at call i (not 1024)")
  parser.add_argument("--child", help=argparse.SUPPRESS)
  args = parser.parse_args()
  if args.child:
    _child(args.child, args.calls, args.vary_n)
    return
  import jax

  print(f"jax {jax.__version__}, {os.cpu_count()} CPUs, load {os.getloadavg()[0]:.2f}")
  print("| function | first call, wall (CPU) | later, wall median (min) | later, CPU median |")
  print("|---|---|---|---|")
  for name in args.functions:
    cmd = [sys.executable, __file__, "--child", name, "--calls", str(args.calls)]
    cmd += ["--vary_n"] if args.vary_n else []
    res = json.loads(subprocess.run(cmd, check=True, capture_output=True, text=True).stdout)
    ms = lambda xs: 1e3 * statistics.median(xs)
    w1, c1, _ = res["first"]
    print(
      f"| `{name}` | {w1:.3f} s ({c1:.3f} s) | {ms(res['wall']):.2f} ms "
      f"({1e3 * min(res['wall']):.2f} ms) | {ms(res['cpu']):.2f} ms |"
    )
  print(f"load {os.getloadavg()[0]:.2f}")


if __name__ == "__main__":
  main()
