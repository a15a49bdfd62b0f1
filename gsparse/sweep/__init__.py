"""Monte Carlo parameter sweeps of attention sparsity in the Gaussian setting.

A sweep measures, at many parameter points `(n, d, sigma, weight_scale, k,
eps)`, how sparse the attention rows are and how well top-k attention does.
At each point the weights `W_Q, W_K, W_V` (entries `N(0, weight_scale^2)`,
`h = d`, one head) are drawn once, and `trials` independent inputs
`X ~ N(0, sigma^2 I)` of `n` rows are drawn for them; the first `rows` rows of
each `X` are the queries (all `n` rows are keys and values), so the measured
rows are exactly rows of the full `n x n` attention matrix. Statistics are
taken over the `trials * rows` attention rows of the point.

How it runs: points are grouped by their static shapes `(n, d)`; within a
group `sigma`, `weight_scale`, `k` and `eps` are ordinary (traced) arrays and
the per-point computation is `jax.vmap`-ed over points and trials and
`jax.jit`-ted once per group. Points are processed in chunks of bounded size
(so memory stays bounded) and, when several devices are present, every chunk
is split over a 1-D device mesh (`gsparse.sharding`). Each point's random stream
is keyed by `fold_in(key, point_index)`, so the numbers do not depend on the chunk
size, the grouping or the number of devices.

Measured per row (reduced to mean / quantiles / max per point):
  * `tau`: the conditional score scale `sigma * ||M^T x_i||` (THEORY-NOTES
    fact 5), with `M = W_Q W_K^T / sqrt(h)`.
  * `min_k`: the smallest k such that the row is (eps, k)-sparse.
  * `support`: the effective support `1 / sum_j p_j^2`.
  * `tail`: the softmax mass outside the top-k set.
  * `error`: `||o - o_k||_2`, the top-k output error, computed through the
    exact identity `t ||mu_tail - mu_head||`.
  * `cert_tail`, `cert_error`: the a-posteriori certificate of
    `gsparse.certificate` (from the top-(k+1) logits only).
  * `v_norm_max`: the largest value-row norm `max_j ||v_j||` over the trials
    (what the data-based top-k error bound needs).
Per point, of the weights: `m_fro = ||M||_F`, `mmt_fro = ||M M^T||_F`,
`m_op = ||M||_op` and `m_trace = tr M` (the inputs of `gsparse.bounds`).

Example:
  >>> import jax
  >>> from gsparse import sweep
  >>> pts = sweep.grid(n=[64], d=[8], sigma=[0.5, 1.0], k=[4], eps=[0.05])
  >>> table = sweep.run_sweep(pts, key=jax.random.key(0), trials=2, progress=False)
  >>> len(table), "min_k_mean" in table.names
  (2, True)
"""

from __future__ import annotations

import sys
import time
from collections.abc import Callable, Mapping, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import Mesh

from gsparse import _checks
from gsparse import sharding as _sharding
from gsparse.sweep.crn import _crn_base, _crn_chunk, _crn_head_cap
from gsparse.sweep.measure import _group_key, measure_points, point_inputs
from gsparse.sweep.points import check_points, grid, random_points
from gsparse.sweep.table import PARAMS, SweepTable, measured_columns

__all__ = [
  "PARAMS",
  "SweepTable",
  "check_points",
  "grid",
  "measure_points",
  "measured_columns",
  "point_inputs",
  "random_points",
  "run_sweep",
]

# ----------------------------------------------------------------------------
# The driver.


class _Progress:
  """A throttled progress line on stderr."""

  def __init__(self, total: int, enabled: bool, every_s: float = 2.0):
    self.total, self.enabled, self.every_s = total, enabled, every_s
    self.start = self.last = time.perf_counter()

  def update(self, done: int) -> None:
    if not self.enabled:
      return
    now = time.perf_counter()
    if now - self.last < self.every_s and done < self.total:
      return
    self.last = now
    elapsed = now - self.start
    eta = elapsed / done * (self.total - done) if done else float("nan")
    print(
      f"sweep: {done}/{self.total} points ({100 * done / self.total:.0f}%), "
      f"{elapsed:.1f} s elapsed, ETA {eta:.0f} s",
      file=sys.stderr,
      flush=True,
    )


def _reporter(
  progress: bool | Callable[[int, int], None], total: int
) -> Callable[[int, int], None]:
  """`run_sweep`'s `progress` as a callable `report(done, total)`."""
  if callable(progress):
    return progress
  bar = _Progress(total, bool(progress))
  return lambda done, tot: bar.update(done)


def _independent_group(
  cols, sel, out, key, *, n, d, rows, trials, resample_weights, chunk_size, max_elements, mesh,
  done, report, total,
) -> int:  # fmt: skip
  """Measures the points `sel` of one `(n, d)` group, each with its own draws."""
  ndev = 1 if mesh is None else mesh.devices.size
  size = chunk_size or max(1, max_elements // (trials * rows * n))
  size = max(ndev, size // ndev * ndev)

  def measure(pad):
    return measure_points(
      key, pad, cols["sigma"][pad], cols["weight_scale"][pad], cols["k"][pad], cols["eps"][pad],
      n=n, d=d, trials=trials, rows=rows, resample_weights=resample_weights, mesh=mesh,
    )  # fmt: skip

  return _in_chunks(measure, sel, out, size=size, ndev=ndev, rows=rows, done=done,
                    report=report, total=total)  # fmt: skip


def _crn_group(
  cols, sel, out, key, *, n, d, rows, trials, resample_weights, chunk_size, max_elements, mesh,
  done, report, total,
) -> int:  # fmt: skip
  """Measures the points `sel` of one `(n, d)` group with common random numbers."""
  ndev = 1 if mesh is None else mesh.devices.size
  head_cap = _crn_head_cap(cols["k"][sel], n=n, d=d, rows=rows, trials=trials)
  base, wstats = _crn_base(
    _group_key(key, n, d), n=n, d=d, rows=rows, trials=trials,
    resample_weights=resample_weights, head_cap=head_cap,
  )  # fmt: skip
  # A point's arrays are small next to the cache here: a few points per
  # lax.map step give fewer, larger ops; more than 4 gained nothing (measured
  # with scripts/bench_sweep.py).
  batch = max(1, 4 * max_elements // (trials * rows * n))
  size = chunk_size or 1024
  size = max(ndev, -(-size // ndev) * ndev)

  def measure(pad):
    args = tuple(
      jnp.asarray(cols[p][pad], dt)
      for p, dt in (("sigma", jnp.float32), ("weight_scale", jnp.float32), ("k", jnp.int32),
                    ("eps", jnp.float32))
    )  # fmt: skip
    if mesh is not None:
      args = _sharding.shard_batch(args, mesh)
    return _crn_chunk(base, wstats, *args, n=n, batch=batch, mesh=mesh)

  return _in_chunks(measure, sel, out, size=size, ndev=ndev, rows=rows, done=done,
                    report=report, total=total)  # fmt: skip


def _in_chunks(measure, sel, out, *, size, ndev, rows, done, report, total) -> int:
  """Runs `measure(padded indices)` over `sel` in chunks of `size` points into `out`.

  The last chunk is padded with its last index so that every call has one
  shape (one compile); the padding's results are dropped. Returns `done` plus
  the points measured.
  """
  size = min(size, -(-len(sel) // ndev) * ndev)
  for start in range(0, len(sel), size):
    idx = sel[start : start + size]
    pad = np.concatenate([idx, np.full(size - len(idx), idx[-1])])
    res = jax.device_get(measure(pad))
    for c, v in res.items():
      out[c][idx] = np.asarray(v)[: len(idx)]
    out["rows"][idx] = rows
    done += len(idx)
    report(done, total)
  return done


def run_sweep(
  points: Mapping[str, Sequence],
  *,
  key: jax.Array,
  trials: int,
  rows: int | None = None,
  resample_weights: bool = False,
  common_random_numbers: bool = False,
  chunk_size: int | None = None,
  max_elements: int = 1 << 18,
  mesh: Mesh | None | str = "auto",
  progress: bool | Callable[[int, int], None] = True,
) -> SweepTable:
  """Runs the Monte Carlo sweep over parameter points.

  Args:
    points: parameter columns `n, d, sigma, weight_scale, k, eps` (from `grid`,
      `random_points`, or any mapping of equal-length sequences).
    key: PRNG key.
    trials: independent draws of `X` per point (int >= 1).
    rows: query rows measured per draw (default: all `n`; clipped to `n`).
    resample_weights: redraw `W` in every trial instead of once per point.
    common_random_numbers: all points of an `(n, d)` group share one set of
      standard-normal draws `Z, W0` (keyed by `key`, `n` and `d`), scaled by
      each point's `sigma` and `weight_scale`: `X = sigma Z`,
      `W = weight_scale W0`. Each point is still an unbiased Monte Carlo
      estimate over `trials` draws, but the points are correlated (their
      differences are much less noisy: the usual variance reduction for
      comparing parameters). Since the scores are `sigma^2 weight_scale^2`
      times those of the shared draw, the draws, the score matrices and
      their order (and, for k <= n/4, the value rows of the largest scores)
      are computed once per group, and a point costs one pass of softmax
      arithmetic and the tail's matmul per trial (figures in
      docs/exploration.md). Default False: independent
      draws per point (`fold_in(key, point_index)`).
    chunk_size: points per jitted call; default: as many as keep one
      `[chunk, trials, rows, n]` array under `max_elements` elements, rounded
      to a multiple of the device count (with `common_random_numbers`: up to
      1024 points per call, `lax.map`-ped in batches of 4x that size).
    max_elements: target size of one `[chunk, trials, rows, n]` array for the
      default chunk size. The default (2^18 float32 = 1 MiB) keeps the working
      set in cache, which on CPU matters more than batching many points per
      call (measured with scripts/bench_sweep.py).
    mesh: a 1-D device mesh, None for no sharding, or "auto": all devices
      when there are several, else None.
    progress: print a progress line to stderr (True), nothing (False), or a
      callable `progress(done, total)`.

  Returns:
    A `SweepTable` with the parameter columns, `measured_columns()`, and
    `trials`, in the order of `points`.
  """
  cols = check_points(points)
  trials = _checks.check_int("trials", trials, minimum=1)
  if rows is not None:
    rows = _checks.check_int("rows", rows, minimum=1)
  max_elements = _checks.check_int("max_elements", max_elements, minimum=1)
  if chunk_size is not None:
    chunk_size = _checks.check_int("chunk_size", chunk_size, minimum=1)
  if not isinstance(common_random_numbers, bool):
    raise TypeError(f"common_random_numbers must be a bool, got {common_random_numbers!r}")
  if isinstance(mesh, str):
    if mesh != "auto":
      raise ValueError(f"mesh={mesh!r} must be a Mesh, None or 'auto'")
    mesh = _sharding.batch_mesh() if jax.device_count() > 1 else None
  total = len(cols["n"])
  report = _reporter(progress, total)
  out = {c: np.zeros(total, np.float64) for c in measured_columns()}
  done = 0
  groups = sorted({(int(a), int(b)) for a, b in zip(cols["n"], cols["d"], strict=True)})
  measure_group = _crn_group if common_random_numbers else _independent_group
  for n, d in groups:
    sel = np.flatnonzero((cols["n"] == n) & (cols["d"] == d))
    done = measure_group(
      cols, sel, out, key, n=n, d=d, rows=n if rows is None else min(rows, n), trials=trials,
      resample_weights=resample_weights, chunk_size=chunk_size,
      max_elements=max_elements, mesh=mesh, done=done, report=report, total=total,
    )  # fmt: skip
  table = dict(cols)
  table["trials"] = np.full(total, trials, np.int64)
  for c in measured_columns():
    table[c] = out[c].astype(np.int64) if c == "rows" else out[c]
  return SweepTable(table)
