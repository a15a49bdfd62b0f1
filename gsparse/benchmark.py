"""Benchmark helpers for the selections (used by `scripts/bench_selection.py`).

Timings are medians of repeated calls of jitted functions after compilation
(`jax.block_until_ready`). Peak memory is reported two ways: XLA's own
`compiled.memory_analysis()` (arguments + outputs + temporaries of the
compiled program, no run needed) and, optionally, the peak resident set size
(`resource.getrusage(RUSAGE_SELF).ru_maxrss`) of a fresh Python subprocess
that runs the one configuration once.
"""

from __future__ import annotations

import json
import resource
import statistics
import subprocess
import sys
import time
from typing import Any

import jax
import jax.numpy as jnp

from gsparse import selection as sel_lib
from gsparse.gaussian import project, sample_inputs, sample_weights
from gsparse.topk import topk_attention

# The configurations the benchmark runs (library defaults except where noted).
SELECTION_CONFIGS = {
  "exact": sel_lib.ExactSelection(),
  "block": sel_lib.BlockSelection(block_size=8, num_blocks=64),
  "lsh": sel_lib.LSHSelection(num_hashes=2),
}


def planted_inputs(
  key: jax.Array, *, n: int, d: int, group: int, strength: float = 1.5, noise: float = 0.3
):
  """Queries and keys with planted heavy keys: `[n, 1, d]` q, k, v.

  The keys are split into `n // group` random groups around random centres
  `mu_g` (norm about sqrt(d)); a key is `mu_g + noise * N(0, I)`, a query is
  `strength * (mu_g + noise * N(0, I))` for a random group g. A query's scaled
  logit is about `strength * sqrt(d)` against its group's keys and about
  `strength * N(0, 1)` against the others, so its top-`group` keys are its
  group (the planted heavy keys).
  """
  kc, kg, kq, kn1, kn2, kv = jax.random.split(key, 6)
  m = max(1, n // group)
  centres = jax.random.normal(kc, (m, d))
  key_group = jax.random.permutation(kg, jnp.arange(n) % m)
  query_group = jax.random.randint(kq, (n,), 0, m)
  k = centres[key_group] + noise * jax.random.normal(kn1, (n, d))
  q = strength * (centres[query_group] + noise * jax.random.normal(kn2, (n, d)))
  v = jax.random.normal(kv, (n, d))
  return q[:, None], k[:, None], v[:, None]


def gaussian_inputs(key: jax.Array, *, n: int, d: int, sigma: float):
  """The paper's setting: X ~ N(0, sigma^2 I), q, k, v = X W (one head); tau ~ sigma^2."""
  kx, kw = jax.random.split(key)
  x = sample_inputs(kx, n=n, d=d, sigma=sigma)
  return project(x, sample_weights(kw, d=d, head_dim=d, heads=1))


def chunked_dense(q, k, v, chunk: int):
  """`jax.nn.dot_product_attention` on query chunks (for n too large for one call)."""
  n = q.shape[0]
  if n % chunk:
    raise ValueError(f"chunk={chunk} must divide n={n}")
  qc = q.reshape(n // chunk, chunk, *q.shape[1:])
  out = jax.lax.map(lambda x: jax.nn.dot_product_attention(x, k, v), qc)
  return out.reshape(q.shape[0], *out.shape[2:])


def xla_memory(compiled) -> dict[str, int] | None:
  """XLA's memory analysis of a compiled program: argument, output, temp and total bytes.

  None where the backend does not report it. The total is what the program
  needs at its peak at most (XLA may alias outputs with temporaries).
  """
  try:
    ma = compiled.memory_analysis()
    parts = {
      "argument_bytes": int(ma.argument_size_in_bytes),
      "output_bytes": int(ma.output_size_in_bytes),
      "temp_bytes": int(ma.temp_size_in_bytes),
    }
  except Exception:  # noqa: BLE001 -- not every backend reports it
    return None
  return parts | {"total_bytes": sum(parts.values())}


def xla_bytes(compiled) -> int | None:
  """XLA memory estimate (arguments + outputs + temporaries) of a compiled program."""
  mem = xla_memory(compiled)
  return None if mem is None else mem["total_bytes"]


def compiled_memory(fn, args) -> int | None:
  """XLA memory estimate (arguments + outputs + temporaries) of `jit(fn)(*args)`, not run."""
  return xla_bytes(jax.jit(fn).lower(*args).compile())


def compile_and_time(fn, args, repeats: int) -> dict[str, Any]:
  """Compiles `fn` (jit), runs it `repeats` times; median seconds and XLA memory."""
  compiled = jax.jit(fn).lower(*args).compile()
  mem = xla_bytes(compiled)
  out = jax.block_until_ready(compiled(*args))  # first run (page-in, thread pools)
  times = []
  for _ in range(repeats):
    t0 = time.perf_counter()
    out = jax.block_until_ready(compiled(*args))
    times.append(time.perf_counter() - t0)
  return {
    "time_s": statistics.median(times) if times else None,
    "times_s": times,
    "xla_bytes": mem,
    "out": out,
  }


def interleaved_pairs(first, second, args, pairs: int) -> dict[str, Any]:
  """Times two compiled callables alternately: `first, second, first, second, ...`.

  Alternating puts both members of a pair under the same machine load, so the
  per-pair ratio `second / first` is robust to the slow drifts of a shared
  machine that move each time on its own. Each callable runs once untimed
  first (page-in, thread pools).

  Returns:
    `first_s` and `second_s` (the `pairs` times in seconds, in order), their
    medians `first_median_s` and `second_median_s`, `ratio`: the median of
    the per-pair ratios, and `out`: the last output of `second`.
  """
  if pairs < 1:
    raise ValueError(f"pairs={pairs} must be >= 1")
  jax.block_until_ready(first(*args))
  out = jax.block_until_ready(second(*args))
  times = ([], [])
  for _ in range(pairs):
    for fn, acc in zip((first, second), times, strict=True):
      t0 = time.perf_counter()
      out_i = jax.block_until_ready(fn(*args))
      acc.append(time.perf_counter() - t0)
      if fn is second:
        out = out_i
  return {
    "first_s": times[0],
    "second_s": times[1],
    "first_median_s": statistics.median(times[0]),
    "second_median_s": statistics.median(times[1]),
    "ratio": statistics.median(b / a for a, b in zip(*times, strict=True)),
    "out": out,
  }


def selection_fn(name: str, k: int, seed: int = 0, config=None):
  """`(q, k, v) -> output` for a selection name ("dense", "exact", "block", "lsh")."""
  if name == "dense":
    return lambda q, kk, v: jax.nn.dot_product_attention(q, kk, v)
  cfg = config if config is not None else SELECTION_CONFIGS[name]
  rng = jax.random.key(seed)
  return lambda q, kk, v: topk_attention(q, kk, v, k=k, selection=cfg, selection_key=rng)


def child_rss(
  name: str, n: int, d: int, k: int, dense_chunk: int = 0, noise: float = 0.3
) -> int | None:
  """Peak RSS in bytes of a fresh process that builds inputs and runs one configuration."""
  code = (
    "import resource, jax, json\n"
    "from gsparse import benchmark as b\n"
    f"q, k, v = b.planted_inputs(jax.random.key(0), n={n}, d={d}, group={k}, noise={noise})\n"
    f"f = b.selection_fn({name!r}, {k})\n"
    f"if {dense_chunk}: f = lambda q, k, v: b.chunked_dense(q, k, v, {dense_chunk})\n"
    "jax.block_until_ready(jax.jit(f)(q, k, v))\n"
    "print(json.dumps(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss))\n"
  )
  try:
    res = subprocess.run(
      [sys.executable, "-c", code], capture_output=True, text=True, check=True, timeout=1800
    )
  except (subprocess.SubprocessError, OSError):
    return None
  return int(json.loads(res.stdout.strip().splitlines()[-1])) * 1024  # Linux: KiB


def self_rss() -> int:
  return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


def eval_rows(key: jax.Array, n: int, rows: int) -> jax.Array:
  """Sorted random subset of query rows on which error and recall are measured."""
  rows = min(rows, n)
  return jnp.sort(jax.random.choice(key, n, (rows,), replace=False))


def exact_reference(q, k, v, rows, topk: int):
  """Exact dense output, exact top-k output, indices and certificate on `rows`."""
  qs = q[rows]
  dense = jax.jit(jax.nn.dot_product_attention)(qs, k, v)
  out, stats = jax.jit(
    lambda a, b, c: topk_attention(a, b, c, k=topk, selection="full", return_stats=True)
  )(qs, k, v)
  return dense, out, stats


def row_metrics(out_rows, dense_rows, topk_rows) -> dict[str, float]:
  """Max/mean L2 error per query vs dense, and vs the exact top-k output."""
  err = jnp.linalg.norm((out_rows - dense_rows).astype(jnp.float32), axis=-1)
  err_topk = jnp.linalg.norm((out_rows - topk_rows).astype(jnp.float32), axis=-1)
  return {
    "err_max": float(jnp.max(err)),
    "err_mean": float(jnp.mean(err)),
    "err_vs_topk_max": float(jnp.max(err_topk)),
  }
