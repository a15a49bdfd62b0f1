"""Times gsparse's top-k (the native CPU kernel) against `jax.lax.top_k`.

Both run in the same process on the same inputs, alternately, for `--repeats`
pairs after compilation and one untimed call; the table gives the medians and
the median of the per-pair ratios. Inputs are standard normal float32 rows
(the logits of Gaussian attention are near-normal).

  PYTHONPATH=. python scripts/bench_topk.py
"""

from __future__ import annotations

import time

import jax
import jax.numpy as jnp
import numpy as np
from absl import app, flags

from gsparse import _native
from gsparse._numerics import top_k

_SHAPES = flags.DEFINE_list(
  "shapes",
  ["256x8192:65", "8192x8192:65", "8192x776:65", "16x512x512:129", "8192x8192:512", "8192x8192:1"],
  "cases as AxBx..xN:k (rows of N entries, k kept)",
)
_REPEATS = flags.DEFINE_integer("repeats", 9, "timed pairs per case")


def _time(f, x) -> float:
  t0 = time.perf_counter()
  jax.block_until_ready(f(x))
  return time.perf_counter() - t0


def main(argv):
  del argv
  if not _native.available():
    raise SystemExit(f"native top-k unavailable: {_native.unavailable_reason()}")
  print(f"jax {jax.__version__}, backend {jax.default_backend()}, {len(jax.devices())} device(s)")
  print("| `[rows, n]`, k (float32) | native ms | `jax.lax.top_k` ms | speed-up |")
  print("|---|---|---|---|")
  for case in _SHAPES.value:
    dims, k = case.split(":")
    shape = tuple(int(d) for d in dims.split("x"))
    k = int(k)
    x = jax.random.normal(jax.random.key(0), shape, jnp.float32)
    ours = jax.jit(lambda x, k=k: top_k(x, k))
    ref = jax.jit(lambda x, k=k: jax.lax.top_k(x, k))
    a, b = ours(x), ref(x)
    if not (np.array_equal(a[1], b[1]) and np.array_equal(a[0], b[0])):
      raise SystemExit(f"{case}: results differ from jax.lax.top_k")
    t_ours, t_ref = [], []
    for _ in range(_REPEATS.value):
      t_ours.append(_time(ours, x))
      t_ref.append(_time(ref, x))
    ratio = np.median(np.array(t_ref) / np.array(t_ours))
    print(
      f"| [{', '.join(map(str, shape))}], {k} | {1e3 * np.median(t_ours):.1f} "
      f"| {1e3 * np.median(t_ref):.1f} | {ratio:.1f}x |",
      flush=True,
    )


if __name__ == "__main__":
  app.run(main)
