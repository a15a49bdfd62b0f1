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

import csv
import dataclasses
import functools
import itertools
import math
import sys
import time
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import Mesh, PartitionSpec

from gsparse import _checks
from gsparse import sharding as _sharding
from gsparse._numerics import float_from_sortable, sortable_int32
from gsparse.certificate import tail_mass_certificate
from gsparse.gaussian import Weights, interaction_matrix

PARAMS = ("n", "d", "sigma", "weight_scale", "k", "eps")
_INT_PARAMS = ("n", "d", "k")

# Per-row quantities and the statistics kept of each (column `<name>_<stat>`).
_STATS = {
  "tau": ("mean", "max"),
  "min_k": ("mean", "q50", "q99", "max"),
  "support": ("mean", "q50", "min"),
  "tail": ("mean", "max"),
  "error": ("mean", "max"),
  "cert_tail": ("mean", "max"),
  "cert_error": ("mean", "max"),
  "v_norm": ("max",),
}
# Properties of the point's weights (means over trials if weights are redrawn).
_WEIGHT_COLUMNS = ("m_fro", "mmt_fro", "m_op", "m_trace")


def measured_columns() -> tuple[str, ...]:
  """Names of the measured columns of a sweep table, in order."""
  cols = [f"{q}_{s}" for q, stats in _STATS.items() for s in stats]
  return (*cols, *_WEIGHT_COLUMNS, "rows")


# ----------------------------------------------------------------------------
# The tidy table.


@dataclasses.dataclass(frozen=True)
class SweepTable:
  """A tidy table: one row per parameter point, one column per parameter or measure.

  Attributes:
    columns: column name -> 1-D NumPy array, all of the same length.
  """

  columns: dict[str, np.ndarray]

  def __post_init__(self):
    lengths = {k: len(v) for k, v in self.columns.items()}
    if len(set(lengths.values())) > 1:
      raise ValueError(f"columns must have equal lengths, got {lengths}")

  @property
  def names(self) -> tuple[str, ...]:
    return tuple(self.columns)

  def __len__(self) -> int:
    return len(next(iter(self.columns.values()))) if self.columns else 0

  def __getitem__(self, name: str) -> np.ndarray:
    if name not in self.columns:
      raise KeyError(f"no column {name!r}; columns are {self.names}")
    return self.columns[name]

  def rows(self) -> list[dict[str, Any]]:
    """The table as a list of `{column: Python scalar}` dicts."""
    return [{k: v[i].item() for k, v in self.columns.items()} for i in range(len(self))]

  def where(self, mask: np.ndarray) -> SweepTable:
    """The rows where the boolean `mask` is True."""
    mask = np.asarray(mask, bool)
    return SweepTable({k: v[mask] for k, v in self.columns.items()})

  def sort_by(self, *names: str) -> SweepTable:
    """Rows sorted by the given columns (first name is the primary key)."""
    order = np.lexsort([self[n] for n in reversed(names)])
    return SweepTable({k: v[order] for k, v in self.columns.items()})

  def to_csv(self, path) -> None:
    """Writes the table as CSV with a header line (floats at full precision)."""
    with open(path, "w", newline="") as f:
      w = csv.writer(f)
      w.writerow(self.names)
      for row in self.rows():
        w.writerow([repr(v) if isinstance(v, float) else v for v in row.values()])

  @classmethod
  def from_csv(cls, path) -> SweepTable:
    """Reads a table written by `to_csv` (integer columns stay integer, text stays text)."""
    with open(path, newline="") as f:
      reader = csv.reader(f)
      header = next(reader)
      data = list(reader)
    cols = {}
    for j, name in enumerate(header):
      raw = [r[j] for r in data]
      try:
        cols[name] = np.asarray([int(s) for s in raw], np.int64)
      except ValueError:
        try:
          cols[name] = np.asarray([float(s) for s in raw], np.float64)
        except ValueError:
          cols[name] = np.asarray(raw, str)
    return cls(cols)


# ----------------------------------------------------------------------------
# Parameter points.


def _as_list(name, v):
  if isinstance(v, (str, bytes)):
    raise TypeError(f"{name} must be a number or a sequence of numbers, got {v!r}")
  if np.ndim(v) == 0:
    return [v]
  return list(np.asarray(v).tolist())


def grid(
  *,
  n: int | Sequence[int],
  d: int | Sequence[int],
  sigma: float | Sequence[float],
  k: int | Sequence[int],
  eps: float | Sequence[float],
  weight_scale: float | Sequence[float] | None = None,
) -> dict[str, np.ndarray]:
  """All combinations of the given values, as parameter columns.

  Args:
    n: sequence length(s), ints >= 1.
    d: input dimension(s) (also the head dimension), ints >= 1.
    sigma: input scale(s), > 0.
    k: number(s) of kept keys, ints in [1, n].
    eps: sparsity threshold(s) in (0, 1).
    weight_scale: weight entry scale(s), > 0; default `1/sqrt(d)` per point.

  Returns:
    Columns `n, d, sigma, weight_scale, k, eps` of equal length.
  """
  axes = {"n": n, "d": d, "sigma": sigma, "k": k, "eps": eps}
  axes = {name: _as_list(name, v) for name, v in axes.items()}
  axes["weight_scale"] = [None] if weight_scale is None else _as_list("weight_scale", weight_scale)
  rows = list(itertools.product(*axes.values()))
  cols = {name: [r[i] for r in rows] for i, name in enumerate(axes)}
  cols["weight_scale"] = [
    1.0 / math.sqrt(dd) if ws is None else ws
    for ws, dd in zip(cols["weight_scale"], cols["d"], strict=True)
  ]
  return check_points(cols)


def random_points(
  seed: int,
  num: int,
  *,
  n: Sequence[int],
  d: Sequence[int],
  sigma: tuple[float, float],
  k: Sequence[int],
  eps: tuple[float, float],
  weight_scale: tuple[float, float] | None = None,
) -> dict[str, np.ndarray]:
  """A random sample of parameter points.

  Integer parameters are drawn uniformly from the given choices; float
  parameters log-uniformly from the given `(low, high)` range.

  Args:
    seed: seed of the (NumPy) generator that draws the parameters.
    num: number of points.
    n, d, k: choices (sequences of ints); `k` values above `n` are clipped to `n`.
    sigma, eps: `(low, high)` ranges.
    weight_scale: `(low, high)` range; default `1/sqrt(d)` per point.

  Returns:
    Parameter columns as `grid`.
  """
  num = _checks.check_int("num", num, minimum=1)
  rng = np.random.default_rng(seed)

  def choice(name, v):
    v = _as_list(name, v)
    return rng.choice(np.asarray(v), size=num)

  def loguniform(name, r):
    if r is None or len(r) != 2 or not 0 < r[0] <= r[1]:
      raise ValueError(f"{name} must be a range (low, high) with 0 < low <= high, got {r!r}")
    return np.exp(rng.uniform(np.log(r[0]), np.log(r[1]), size=num))

  cols = {"n": choice("n", n), "d": choice("d", d)}
  cols["sigma"] = loguniform("sigma", sigma)
  cols["weight_scale"] = (
    1.0 / np.sqrt(cols["d"]) if weight_scale is None else loguniform("weight_scale", weight_scale)
  )
  cols["k"] = np.minimum(choice("k", k), cols["n"])
  cols["eps"] = loguniform("eps", eps)
  return check_points(cols)


def check_points(points: Mapping[str, Sequence]) -> dict[str, np.ndarray]:
  """Validates parameter columns and returns them as NumPy arrays.

  Raises:
    ValueError / TypeError naming the column and the first bad value.
  """
  missing = [p for p in PARAMS if p not in points]
  if missing:
    raise ValueError(f"points is missing the parameter columns {missing}; needs {PARAMS}")
  cols = {}
  for p in PARAMS:
    v = np.asarray(points[p])
    if v.ndim != 1:
      raise ValueError(f"points[{p!r}] must be 1-D, got shape {v.shape}")
    cols[p] = v
  lengths = {p: len(v) for p, v in cols.items()}
  if len(set(lengths.values())) != 1 or lengths["n"] == 0:
    raise ValueError(f"parameter columns must be non-empty and of equal length, got {lengths}")
  for p in _INT_PARAMS:
    if cols[p].dtype.kind not in "iu":
      if cols[p].dtype.kind == "f" and np.all(cols[p] == np.round(cols[p])):
        cols[p] = cols[p].astype(np.int64)
      else:
        raise TypeError(f"points[{p!r}] must be integers, got dtype {cols[p].dtype}")
    cols[p] = cols[p].astype(np.int64)
  for p in ("sigma", "weight_scale", "eps"):
    if cols[p].dtype.kind not in "iuf":
      raise TypeError(f"points[{p!r}] must be real numbers, got dtype {cols[p].dtype}")
    cols[p] = cols[p].astype(np.float64)
    if not np.all(np.isfinite(cols[p])):
      raise ValueError(f"points[{p!r}] must be finite, got {cols[p][~np.isfinite(cols[p])][0]}")

  def first_bad(p, bad):
    i = int(np.argmax(bad))
    return f"points[{p!r}][{i}]={cols[p][i]}"

  for p in ("n", "d"):
    if np.any(cols[p] < 1):
      raise ValueError(f"{first_bad(p, cols[p] < 1)} must be >= 1")
  bad = (cols["k"] < 1) | (cols["k"] > cols["n"])
  if np.any(bad):
    i = int(np.argmax(bad))
    raise ValueError(f"{first_bad('k', bad)} must be in [1, n={cols['n'][i]}]")
  for p in ("sigma", "weight_scale"):
    if np.any(cols[p] <= 0):
      raise ValueError(f"{first_bad(p, cols[p] <= 0)} must be > 0")
  bad = (cols["eps"] <= 0) | (cols["eps"] >= 1)
  if np.any(bad):
    raise ValueError(f"{first_bad('eps', bad)} must be in the open interval (0, 1)")
  return cols


# ----------------------------------------------------------------------------
# The per-point computation.


def _kth_largest(s: jax.Array, k: jax.Array) -> jax.Array:
  """The k-th largest entry of each row of `s [R, n]` (k traced, 1 <= k <= n), exactly.

  Bisection on the int32 keys that order floats (`sortable_int32`): keeps
  `count(key >= lo) >= k > count(key > hi)`; 32 halvings of the 2^32 keys
  leave `lo` = the key of the k-th largest entry. It needs no static k and
  no sort (XLA:CPU sorts with a comparator call per comparison).
  """
  key = sortable_int32(s)
  lo, hi = jnp.min(key, axis=-1), jnp.max(key, axis=-1)

  def body(_, carry):
    lo, hi = carry
    mid = (lo >> 1) + (hi >> 1) + ((lo | hi) & 1)  # ceil((lo + hi) / 2) without overflow
    ok = jnp.sum(key >= mid[:, None], axis=-1) >= k
    return jnp.where(ok, mid, lo), jnp.where(ok, hi, mid - 1)

  lo, _ = jax.lax.fori_loop(0, 32, body, (lo, hi))
  return float_from_sortable(lo).astype(s.dtype)


def _trial_rows(x, w, sigma, k, eps, *, rows: int):
  """Per-row measures of one draw `x [n, d]` under weights `w = (M, W_V)`."""
  m, w_v = w
  n = x.shape[0]
  u = x[:rows] @ m  # [R, d]: row i is x_i^T M
  s = u @ x.T  # [R, n] scores s_ij = x_i^T M x_j
  tau = sigma * jnp.linalg.norm(u, axis=-1)
  lse = jax.nn.logsumexp(s, axis=-1)
  p = jnp.exp(s - lse[:, None])
  min_k = jnp.sum(p > eps, axis=-1, dtype=jnp.int32)
  support = 1.0 / jnp.sum(p * p, axis=-1)
  kth = _kth_largest(s, k)
  in_head = s >= kth[:, None]  # the top-k set (ties at the k-th value have probability 0)
  head_lse = jax.nn.logsumexp(jnp.where(in_head, s, -jnp.inf), axis=-1)
  ties = jnp.sum(in_head, axis=-1) > k
  below = jnp.max(jnp.where(in_head, -jnp.inf, s), axis=-1)  # -inf when k = n
  next_logit = jnp.where(ties, kth, below)  # the (k+1)-th largest score
  ph = jnp.where(in_head, p, 0.0)
  pt = p - ph
  tail = jnp.sum(pt, axis=-1)
  v = x @ w_v  # [n, h]
  center = jnp.mean(v, axis=0)
  return _row_measures(
    tau=tau, min_k=min_k, support=support, head_sum=ph @ v, tail_sum=pt @ v,
    head_mass=jnp.sum(ph, axis=-1), tail_mass=tail, tail=tail,
    head_lse=head_lse, next_logit=next_logit, center=center,
    radius=jnp.max(jnp.linalg.norm(v - center, axis=-1)),
    v_max=jnp.max(jnp.linalg.norm(v, axis=-1)), n=n, k=k,
  )  # fmt: skip


def _row_measures(
  *, tau, min_k, support, head_sum, tail_sum, head_mass, tail_mass, tail, head_lse, next_logit,
  center, radius, v_max, n, k,
):  # fmt: skip
  """The error and certificate columns of a trial from its head and tail sums.

  `head_sum`, `tail_sum` `[R, h]` are the (unnormalised) weighted value sums of
  the top-k set and of the rest, `head_mass`, `tail_mass` their weights (any
  common scale), `tail` the softmax mass outside the top k.
  """
  mu_head = head_sum / head_mass[:, None]
  safe = jnp.where(tail_mass > 0, tail_mass, 1.0)[:, None]
  mu_tail = jnp.where(tail_mass[:, None] > 0, tail_sum / safe, 0.0)
  error = tail * jnp.linalg.norm(mu_tail - mu_head, axis=-1)  # exact identity (fact 2)
  cert_tail = tail_mass_certificate(head_lse, next_logit, n, k)
  cert_error = cert_tail * (jnp.linalg.norm(mu_head - center, axis=-1) + radius)
  return {
    "tau": tau,
    "min_k": min_k,
    "support": support,
    "tail": tail,
    "error": error,
    "cert_tail": cert_tail,
    "cert_error": cert_error,
    "v_norm": jnp.broadcast_to(v_max, tau.shape),
  }


def _weights_from_normals(z):
  """`(M, W_V)` from `z [3, d, d]`, the stacked `W_Q, W_K, W_V` of one head."""
  w_q, w_k, w_v = z[0], z[1], z[2]
  m = interaction_matrix(w_q, w_k)  # scale 1/sqrt(h), h = d
  return m, w_v


def _weight_stats(m):
  sv = jnp.linalg.svd(m, compute_uv=False)
  return {
    "m_fro": jnp.linalg.norm(m),
    "mmt_fro": jnp.linalg.norm(m @ m.T),
    "m_op": sv[0],
    "m_trace": jnp.trace(m),
  }


def _summary(values: jax.Array, stat: str) -> jax.Array:
  values = values.reshape(-1).astype(jnp.float32)
  if stat == "mean":
    return jnp.mean(values)
  if stat == "max":
    return jnp.max(values)
  if stat == "min":
    return jnp.min(values)
  return _quantile(values, {"q50": 0.5, "q99": 0.99}[stat])


def _quantile(v: jax.Array, q: float) -> jax.Array:
  """`jnp.quantile(v, q)` (linear interpolation) of a 1-D `v`, without a sort.

  The two order statistics around position `q (N - 1)` come from the
  bisection of `_kth_largest` and one masked minimum, because XLA:CPU's sort
  (a comparator call per comparison) cost more than the rest of the
  summaries together.
  """
  size = v.shape[0]
  pos = q * (size - 1)
  lo = int(math.floor(pos))
  frac = pos - lo
  a = _kth_largest(v[None], jnp.int32(size - lo))[0]  # the (lo+1)-th smallest
  if frac == 0:
    return a
  # The (lo+2)-th smallest: `a` again if it is repeated, else the next value up.
  nxt = jnp.min(jnp.where(v > a, v, jnp.inf))
  b = jnp.where(jnp.sum(v <= a) >= lo + 2, a, nxt)
  return a + frac * (b - a)


def _point_normals(key, index, size):
  """`size` standard normals for point `index`: the stream of `fold_in(key, index)`.

  Threefry is counter-based, so the numbers are the same under `vmap`, in any
  chunk and on any device. (The "rbg" generator gave other numbers under
  `vmap` than alone.)
  """
  return jax.random.normal(jax.random.fold_in(key, index), (size,), jnp.float32)


def _point_normals_batch(key, index, size):
  """`[P, size]` normals, one stream per point index."""
  return jax.vmap(lambda i: _point_normals(key, i, size))(index)


def _split_normals(z, sigma, ws, *, n, d, trials, resample_weights):
  num_w = trials if resample_weights else 1
  zw = ws * z[: num_w * 3 * d * d].reshape(num_w, 3, d, d)
  xs = sigma * z[num_w * 3 * d * d :].reshape(trials, n, d)
  return xs, zw


def _num_normals(n, d, trials, resample_weights):
  return (trials if resample_weights else 1) * 3 * d * d + trials * n * d


def point_inputs(
  key: jax.Array,
  index: int,
  *,
  n: int,
  d: int,
  sigma: float,
  weight_scale: float,
  trials: int,
  resample_weights: bool = False,
  common_random_numbers: bool = False,
) -> tuple[jax.Array, Weights]:
  """The inputs a sweep draws at point `index`, for checking it against a direct computation.

  With `common_random_numbers=True` they are the `(n, d)` group's shared
  draws scaled by `sigma` and `weight_scale` (`index` is then irrelevant).

  Returns:
    `(x, weights)`: `x [trials, n, d]` and `Weights` with `[d, 1, d]` arrays
    (or `[trials, d, 1, d]` when `resample_weights`).
  """
  size = _num_normals(n, d, trials, resample_weights)
  if common_random_numbers:
    z = _point_normals(_group_key(key, n, d), 0, size)
  else:
    z = _point_normals_batch(key, jnp.asarray([index], jnp.int32), size)[0]
  xs, zw = _split_normals(
    z,
    jnp.float32(sigma),
    jnp.float32(weight_scale),
    n=n,
    d=d,
    trials=trials,
    resample_weights=resample_weights,
  )
  w = Weights(*(zw[:, i, :, None, :] for i in range(3)))
  if not resample_weights:
    w = Weights(*(a[0] for a in w))
  return xs, w


def _over_trials(trial, xs, zw, resample_weights):
  """`trial(x, (M, W_V))` vmapped over the draws `xs`, with the weights of `zw`
  (one set per draw, or one shared set); also the weight statistics (their
  mean over draws)."""
  if resample_weights:
    w = jax.vmap(_weights_from_normals)(zw)
    wstats = {c: jnp.mean(v) for c, v in jax.vmap(_weight_stats)(w[0]).items()}
    return jax.vmap(trial)(xs, w), wstats
  w = _weights_from_normals(zw[0])
  return jax.vmap(lambda x: trial(x, w))(xs), _weight_stats(w[0])


def _one_point(z, sigma, ws, k, eps, *, n, d, rows, trials, resample_weights):
  xs, zw = _split_normals(z, sigma, ws, n=n, d=d, trials=trials, resample_weights=resample_weights)
  trial = functools.partial(_trial_rows, sigma=sigma, k=k, eps=eps, rows=rows)
  per, wstats = _over_trials(trial, xs, zw, resample_weights)
  out = {f"{q}_{s}": _summary(per[q], s) for q, stats in _STATS.items() for s in stats}
  out.update(wstats)
  return out


def _chunk_body(key, index, sigma, ws, k, eps, *, n, d, rows, trials, resample_weights):
  z = _point_normals_batch(key, index, _num_normals(n, d, trials, resample_weights))
  fn = functools.partial(
    _one_point, n=n, d=d, rows=rows, trials=trials, resample_weights=resample_weights
  )
  return jax.vmap(fn)(z, sigma, ws, k, eps)


@functools.partial(
  jax.jit, static_argnames=("n", "d", "rows", "trials", "resample_weights", "mesh")
)
def _measure_chunk(key, index, sigma, ws, k, eps, *, mesh, **static):
  body = functools.partial(_chunk_body, **static)
  if mesh is not None:
    # Every device draws and measures its own points: no communication at all.
    spec = PartitionSpec(mesh.axis_names[0])
    body = jax.shard_map(body, mesh=mesh, in_specs=(PartitionSpec(), *[spec] * 5), out_specs=spec)
  return body(key, index, sigma, ws, k, eps)


def measure_points(
  key: jax.Array,
  index: jax.typing.ArrayLike,
  sigma: jax.typing.ArrayLike,
  weight_scale: jax.typing.ArrayLike,
  k: jax.typing.ArrayLike,
  eps: jax.typing.ArrayLike,
  *,
  n: int,
  d: int,
  trials: int,
  rows: int | None = None,
  resample_weights: bool = False,
  mesh: Mesh | None = None,
) -> dict[str, jax.Array]:
  """Measures one batch of points that share `(n, d)`: the jitted, vmapped core of a sweep.

  Args:
    key: base PRNG key; point `i` uses `fold_in(key, index[i])`.
    index: `[P]` int32 global point indices.
    sigma, weight_scale, eps: `[P]` float parameters (traced).
    k: `[P]` int32 numbers of kept keys, each in `[1, n]` (traced).
    n, d: static shapes.
    trials: Monte Carlo draws of `X` per point.
    rows: query rows measured per draw (the first `rows` of `X`); default `n`.
    resample_weights: redraw the weights for every trial (default: once per point).
    mesh: a 1-D device mesh; the point axis is split over it (`P` must be a
      multiple of its size). Default: no explicit placement.

  Returns:
    Column name -> `[P]` array (sharded over `mesh` when given).
  """
  n = _checks.check_int("n", n, minimum=1)
  d = _checks.check_int("d", d, minimum=1)
  trials = _checks.check_int("trials", trials, minimum=1)
  rows = n if rows is None else _checks.check_int("rows", rows, minimum=1, maximum=n)
  if not isinstance(resample_weights, bool):
    raise TypeError(f"resample_weights must be a bool, got {resample_weights!r}")
  args = (
    jnp.asarray(index, jnp.int32),
    jnp.asarray(sigma, jnp.float32),
    jnp.asarray(weight_scale, jnp.float32),
    jnp.asarray(k, jnp.int32),
    jnp.asarray(eps, jnp.float32),
  )
  if len({a.shape for a in args}) != 1 or args[0].ndim != 1:
    raise ValueError(
      f"index, sigma, weight_scale, k, eps must be 1-D of one length, got {[a.shape for a in args]}"
    )
  if mesh is not None:
    args = _sharding.shard_batch(args, mesh)
  return _measure_chunk(
    key,
    *args,
    n=n,
    d=d,
    rows=rows,
    trials=trials,
    resample_weights=resample_weights,
    mesh=mesh,
  )


# ----------------------------------------------------------------------------
# Common random numbers: one set of draws per (n, d) group, rescaled per point.

_CRN_TAG = 0x43524E  # "CRN": keeps the group streams apart from the point streams


def _group_key(key: jax.Array, n: int, d: int) -> jax.Array:
  return jax.random.fold_in(jax.random.fold_in(jax.random.fold_in(key, _CRN_TAG), n), d)


def _crn_trial_base(x, w, *, rows, head_cap):
  """What every point of a group needs from one standard draw `x [n, d]`, `w = (M0, W_V0)`.

  With a static `head_cap` (every k of the group is <= it) also the rank of
  each score in its row and the value rows of the `head_cap` largest scores,
  in order, so that a point gets its head from those instead of a matmul.
  """
  m, w_v = w
  u = x[:rows] @ m
  s = u @ x.T  # [R, n] scores at sigma = weight_scale = 1
  v = x @ w_v
  center = jnp.mean(v, axis=0)
  base = {
    "s": s,
    "u_norm": jnp.linalg.norm(u, axis=-1),
    "v": v,
    "center": center,
    "radius": jnp.max(jnp.linalg.norm(v - center, axis=-1)),
    "v_max": jnp.max(jnp.linalg.norm(v, axis=-1)),
  }
  if head_cap is None:
    base["sorted"] = -jnp.sort(-s, axis=-1)  # descending: the k-th largest is column k - 1
    return base
  order = jnp.argsort(-s, axis=-1, stable=True)  # descending; ties: lower index first
  base["sorted"] = jnp.take_along_axis(s, order, axis=-1)
  base["rank"] = jnp.argsort(order, axis=-1).astype(jnp.int32)  # the inverse permutation
  base["v_head"] = v[order[:, :head_cap]]  # [R, head_cap, d]
  return base


@functools.partial(
  jax.jit, static_argnames=("n", "d", "rows", "trials", "resample_weights", "head_cap")
)
def _crn_base(key, *, n, d, rows, trials, resample_weights, head_cap):
  z = _point_normals(key, 0, _num_normals(n, d, trials, resample_weights))
  one = jnp.float32(1.0)
  xs, zw = _split_normals(z, one, one, n=n, d=d, trials=trials, resample_weights=resample_weights)
  trial = functools.partial(_crn_trial_base, rows=rows, head_cap=head_cap)
  return _over_trials(trial, xs, zw, resample_weights)


def _crn_head_cap(ks: np.ndarray, *, n: int, d: int, rows: int, trials: int) -> int | None:
  """The static head size of a group's points (the next power of two >= their
  largest k), or None where a head gather would not pay: a head over a
  quarter of the row (the gather then costs about what the matmul it
  replaces does), or gathered value rows above 2^25 elements (128 MiB)."""
  cap = min(n, 1 << max(0, int(ks.max()) - 1).bit_length())
  if 4 * cap > n or trials * rows * cap * d > 1 << 25:
    return None
  return cap


def _crn_trial_rows(b, c, a, k, eps, *, n):
  """`_trial_rows` for `x = sigma z`, `W = weight_scale W0`: scores scale by
  `c = sigma^2 weight_scale^2` and values by `a = sigma weight_scale`, so the
  top-k set and the order of the scores are those of the shared draw."""
  top = b["sorted"][:, :1]  # the row maximum of the shared scores
  e = jnp.exp(c * (b["s"] - top))  # the only full exponential pass; p = e / z
  z = jnp.sum(e, axis=-1)
  if "rank" in b:
    # The head from the value rows of the largest scores, gathered once per
    # group: the one matmul left is the tail's. The head is exactly k keys
    # (ties by lower index, as `lax.top_k`).
    cap = b["v_head"].shape[1]
    in_head = b["rank"] < k
    eh = jnp.where(jnp.arange(cap) < k, jnp.exp(c * (b["sorted"][:, :cap] - top)), 0.0)
    et = jnp.where(in_head, 0.0, e)
    head_sum = jnp.einsum("rj,rjd->rd", eh, b["v_head"])
    tail_sum = et @ b["v"]
  else:
    kth0 = jnp.take(b["sorted"], k - 1, axis=-1)
    in_head = b["s"] >= kth0[:, None]
    eh = jnp.where(in_head, e, 0.0)
    et = jnp.where(in_head, 0.0, e)
    head_sum, tail_sum = jnp.stack([eh, et]) @ b["v"]  # one matmul for head and tail
  zh, zt = jnp.sum(eh, axis=-1), jnp.sum(et, axis=-1)
  # log of the kept normaliser: the row maximum is kept, so zh >= 1.
  head_lse = jnp.log(zh) + c * top[:, 0]
  # The (k+1)-th largest score (equal to the k-th one under ties), -inf when k = n.
  nxt = jnp.take(b["sorted"], jnp.minimum(k, n - 1), axis=-1)
  next_logit = jnp.where(k < n, c * nxt, -jnp.inf)
  return _row_measures(
    tau=c * b["u_norm"], min_k=jnp.sum(e > eps * z[:, None], axis=-1, dtype=jnp.int32),
    support=z * z / jnp.sum(e * e, axis=-1), head_sum=a * head_sum, tail_sum=a * tail_sum,
    head_mass=zh, tail_mass=zt, tail=zt / z, head_lse=head_lse, next_logit=next_logit,
    center=a * b["center"], radius=a * b["radius"], v_max=a * b["v_max"], n=n, k=k,
  )  # fmt: skip


def _crn_point(base, wstats, sigma, ws, k, eps, *, n):
  c, a = (sigma * ws) ** 2, sigma * ws
  per = jax.vmap(lambda b: _crn_trial_rows(b, c, a, k, eps, n=n))(base)
  out = {f"{q}_{s}": _summary(per[q], s) for q, stats in _STATS.items() for s in stats}
  w2 = ws * ws
  scale = {"m_fro": w2, "mmt_fro": w2 * w2, "m_op": w2, "m_trace": w2}
  out.update({name: v * scale[name] for name, v in wstats.items()})
  return out


@functools.partial(jax.jit, static_argnames=("n", "batch", "mesh"))
def _crn_chunk(base, wstats, sigma, ws, k, eps, *, n, batch, mesh):
  def body(base, wstats, sigma, ws, k, eps):
    fn = lambda x: _crn_point(base, wstats, *x, n=n)
    # Points in batches of `batch` (vmapped) inside one call: one dispatch per
    # chunk, and a working set that stays in cache.
    return jax.lax.map(fn, (sigma, ws, k, eps), batch_size=batch)

  if mesh is not None:  # the shared draws are replicated, the points split
    spec = PartitionSpec(mesh.axis_names[0])
    rep = PartitionSpec()
    body = jax.shard_map(body, mesh=mesh, in_specs=(rep, rep, *[spec] * 4), out_specs=spec)
  return body(base, wstats, sigma, ws, k, eps)


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
  size = min(size, -(-len(sel) // ndev) * ndev)
  for start in range(0, len(sel), size):
    idx = sel[start : start + size]
    pad = np.concatenate([idx, np.full(size - len(idx), idx[-1])])
    args = tuple(
      jnp.asarray(cols[p][pad], dt)
      for p, dt in (("sigma", jnp.float32), ("weight_scale", jnp.float32), ("k", jnp.int32),
                    ("eps", jnp.float32))
    )  # fmt: skip
    if mesh is not None:
      args = _sharding.shard_batch(args, mesh)
    res = jax.device_get(_crn_chunk(base, wstats, *args, n=n, batch=batch, mesh=mesh))
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
  ndev = 1 if mesh is None else mesh.devices.size
  total = len(cols["n"])
  if callable(progress):
    report = progress
  else:
    bar = _Progress(total, bool(progress))
    report = lambda done, tot: bar.update(done)
  out = {c: np.zeros(total, np.float64) for c in measured_columns()}
  done = 0
  groups = sorted({(int(a), int(b)) for a, b in zip(cols["n"], cols["d"], strict=True)})
  for n, d in groups:
    sel = np.flatnonzero((cols["n"] == n) & (cols["d"] == d))
    r = n if rows is None else min(rows, n)
    if common_random_numbers:
      done = _crn_group(
        cols, sel, out, key, n=n, d=d, rows=r, trials=trials,
        resample_weights=resample_weights, chunk_size=chunk_size,
        max_elements=max_elements, mesh=mesh, done=done, report=report, total=total,
      )  # fmt: skip
      continue
    size = chunk_size or max(1, max_elements // (trials * r * n))
    size = max(ndev, size // ndev * ndev)
    size = min(size, -(-len(sel) // ndev) * ndev)
    for start in range(0, len(sel), size):
      idx = sel[start : start + size]
      pad = np.concatenate([idx, np.full(size - len(idx), idx[-1])])
      res = measure_points(
        key,
        pad,
        cols["sigma"][pad],
        cols["weight_scale"][pad],
        cols["k"][pad],
        cols["eps"][pad],
        n=n,
        d=d,
        trials=trials,
        rows=r,
        resample_weights=resample_weights,
        mesh=mesh,
      )
      res = jax.device_get(res)
      for c, v in res.items():
        out[c][idx] = np.asarray(v)[: len(idx)]
      out["rows"][idx] = r
      done += len(idx)
      report(done, total)
  table = dict(cols)
  table["trials"] = np.full(total, trials, np.int64)
  for c in measured_columns():
    table[c] = out[c].astype(np.int64) if c == "rows" else out[c]
  return SweepTable(table)
