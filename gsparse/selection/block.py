"""Block selection: keys cut into blocks ranked by a certified upper bound on
their logits; the exact top-k is taken inside the best blocks (approximate)."""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
from jax.lax import PrecisionLike

from gsparse import _checks
from gsparse._numerics import finish_top_k
from gsparse._numerics import top_k as _top_k
from gsparse.attention import compute_dtype
from gsparse.selection._common import SelectionResult, map_heads, pad_axis, row_chunks


@dataclasses.dataclass(frozen=True)
class BlockSelection:
  """Two-stage block top-k selection (static under `jit`).

  Attributes:
    block_size: keys per block.
    num_blocks: blocks kept per query; `k` may not exceed
      `num_blocks * block_size` unless every block is kept.
    query_chunk: queries per step (memory bound as in `ExactSelection`).
    summary: "minmax" ranks blocks by the certified upper bound
      `sum_h max(q_h min_h, q_h max_h)`; "mean" by `q . mean key` (the
      certificate still uses the min/max bound).
  """

  block_size: int = 32
  num_blocks: int = 16
  query_chunk: int = 256
  summary: str = "minmax"

  def __post_init__(self):
    _checks.check_int("block_size", self.block_size, minimum=1)
    _checks.check_int("num_blocks", self.num_blocks, minimum=1)
    _checks.check_int("query_chunk", self.query_chunk, minimum=1)
    if self.summary not in ("minmax", "mean"):
      raise ValueError(f"summary={self.summary!r} must be 'minmax' or 'mean'")

  def select(
    self,
    query: jax.Array,
    key: jax.Array,
    bias: jax.Array | None,
    mask: jax.Array | None,
    *,
    k: int,
    scale: float,
    is_causal: bool,
    selection_key: jax.Array | None = None,
    precision: PrecisionLike = None,
  ) -> SelectionResult:
    """Block top-k on checked inputs (see `gsparse.selection.select`); no key needed.

    Raises:
      ValueError: `k` above the capacity `num_blocks * block_size` of the kept blocks.
    """
    del selection_key  # deterministic
    nb = -(-key.shape[-3] // self.block_size)
    if self.num_blocks < nb and k > self.num_blocks * self.block_size:
      raise ValueError(
        f"k={k} exceeds the capacity num_blocks * block_size = "
        f"{self.num_blocks} * {self.block_size} of BlockSelection"
      )
    common = dict(k=k, scale=scale, is_causal=is_causal, cfg=self, precision=precision)
    return SelectionResult(*map_heads(lambda *a: _block_head(*a, **common), query, key, mask, bias))


def _block_head(q, kmat, mask, bias, *, k, scale, is_causal, cfg, precision):
  t, h = q.shape
  s = kmat.shape[0]
  dtype = compute_dtype(q.dtype, kmat.dtype)
  b = cfg.block_size
  nb = -(-s // b)
  sp = nb * b
  nsel = min(cfg.num_blocks, nb)
  kk = min(k + 1, nsel * b)
  c = min(cfg.query_chunk, t)
  nc = -(-t // c)
  tp = nc * c
  kb = pad_axis(kmat, 0, sp, 0).astype(dtype).reshape(nb, b, h)
  kvalid = (jnp.arange(sp) < s).reshape(nb, b)
  inf = jnp.asarray(jnp.inf, dtype)
  kmax = jnp.max(jnp.where(kvalid[..., None], kb, -inf), axis=1)  # [nb, h]
  kmin = jnp.min(jnp.where(kvalid[..., None], kb, inf), axis=1)
  kabs = jnp.maximum(jnp.abs(kmax), jnp.abs(kmin))
  kmean = jnp.sum(jnp.where(kvalid[..., None], kb, 0), axis=1) / jnp.sum(kvalid, 1)[:, None]
  xs = (
    pad_axis(q, 0, tp, 0).reshape(nc, c, h),
    jnp.arange(nc) * c,
    row_chunks(mask, t, tp, c, False),
    row_chunks(bias, t, tp, c, 0),
  )
  hi = jax.lax.Precision.HIGHEST

  def body(x):
    qc, row0, mc, bc = x
    qs = qc.astype(dtype) * jnp.asarray(scale, dtype)
    rows = row0 + jnp.arange(c)
    # Certified upper bound per block (with a rounding slack).
    ub = jnp.dot(jnp.maximum(qs, 0), kmax.T, precision=hi) + jnp.dot(
      jnp.minimum(qs, 0), kmin.T, precision=hi
    )
    ub = ub + 1e-5 * jnp.dot(jnp.abs(qs), kabs.T, precision=hi) + 1e-30
    cols = jnp.arange(sp)[None, :]
    if mc is None and not is_causal:
      valid_cols = None
      num = jnp.full((c,), s, jnp.int32)
      block_ok = jnp.ones((c, nb), bool)
    elif mc is None:
      valid_cols = (cols < s) & (cols <= rows[:, None])
      num = jnp.minimum(rows + 1, s).astype(jnp.int32)
      block_ok = (jnp.arange(nb) * b)[None, :] <= rows[:, None]
    else:
      valid_cols = (cols < s) & pad_axis(jnp.broadcast_to(mc, (c, s)), 1, sp, False)
      if is_causal:
        valid_cols = valid_cols & (cols <= rows[:, None])
      num = jnp.sum(valid_cols, axis=-1, dtype=jnp.int32)
      block_ok = jnp.any(valid_cols.reshape(c, nb, b), axis=-1)
    if bc is not None:
      bfull = pad_axis(jnp.broadcast_to(bc, (c, s)).astype(dtype), 1, sp, 0.0)
      bvalid = bfull if valid_cols is None else jnp.where(valid_cols, bfull, -inf)
      bmax = jnp.max(bvalid.reshape(c, nb, b), axis=-1)
      ub = ub + jnp.where(block_ok, bmax, 0)
    ub = jnp.where(block_ok, ub, -inf)
    rank = ub
    if cfg.summary == "mean":
      rank = jnp.dot(qs, kmean.T, precision=hi)
      if bc is not None:
        rank = rank + jnp.where(block_ok, bmax, 0)
      rank = jnp.where(block_ok, rank, -inf)
    _, bid = _top_k(rank, nsel)
    bid = jnp.sort(bid, axis=-1)
    kept = jnp.zeros((c, nb), bool).at[jnp.arange(c)[:, None], bid].set(True)
    drop_bound = jnp.max(jnp.where(kept, -inf, ub), axis=-1)
    pos = (bid[..., None] * b + jnp.arange(b)).reshape(c, nsel * b)  # key positions
    kc = kb[bid].reshape(c, nsel * b, h)
    logits = jnp.einsum(
      "th,tjh->tj", qc, kc.astype(qc.dtype), precision=precision, preferred_element_type=dtype
    ).astype(dtype) * jnp.asarray(scale, dtype)
    if bc is not None:
      logits = logits + jnp.take_along_axis(bfull, pos, axis=-1)
    if valid_cols is None:
      ok = pos < s
    elif mc is None:
      ok = (pos < s) & (pos <= rows[:, None])
    else:
      ok = jnp.take_along_axis(valid_cols, pos, axis=-1)
    logits = jnp.where(ok, logits, -inf)
    vals, p = _top_k(logits, kk)
    idx, nxt = finish_top_k(vals, jnp.take_along_axis(pos, p, axis=-1), k)
    if kk <= k:  # every candidate kept: no candidate bound
      nxt = jnp.full_like(nxt, -inf)
    nxt = jnp.maximum(nxt, drop_bound)
    return idx, nxt, num

  idx, nxt, num = jax.lax.map(body, xs)
  return idx.reshape(tp, k)[:t], nxt.reshape(tp)[:t], num.reshape(tp)[:t]
