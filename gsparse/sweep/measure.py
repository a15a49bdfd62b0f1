"""The independent-stream measurement engine: every point draws its own inputs."""

from __future__ import annotations

import functools
import math

import jax
import jax.numpy as jnp
from jax.sharding import Mesh, PartitionSpec

from gsparse import _checks
from gsparse import sharding as _sharding
from gsparse._numerics import float_from_sortable, sortable_int32
from gsparse.certificate import tail_mass_certificate
from gsparse.gaussian import Weights, interaction_matrix
from gsparse.sweep.table import _STATS

# ----------------------------------------------------------------------------
# The per-point computation.


_CRN_TAG = 0x43524E  # "CRN": keeps the group streams apart from the point streams


def _group_key(key: jax.Array, n: int, d: int) -> jax.Array:
  return jax.random.fold_in(jax.random.fold_in(jax.random.fold_in(key, _CRN_TAG), n), d)


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
