"""The common-random-numbers engine: points of one (n, d) group share their normals."""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import PartitionSpec

from gsparse.sweep.measure import (
  _num_normals,
  _over_trials,
  _point_normals,
  _row_measures,
  _split_normals,
  _summary,
)
from gsparse.sweep.table import _STATS

# ----------------------------------------------------------------------------
# Common random numbers: one set of draws per (n, d) group, rescaled per point.


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
