"""Block selection: keys cut into blocks ranked by a certified upper bound on
their logits; the exact top-k is taken inside the best blocks (approximate)."""

from __future__ import annotations

import dataclasses
from typing import NamedTuple

import jax
import jax.numpy as jnp
from jax.lax import PrecisionLike

from gsparse import _checks
from gsparse._admissible import Admissible
from gsparse._numerics import finish_top_k
from gsparse._numerics import top_k as _top_k
from gsparse.attention import compute_dtype
from gsparse.selection._common import (
  SelectionResult,
  chunk_mask,
  map_heads,
  pad_axis,
  row_chunks,
)


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
    adm: Admissible | None = None,
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
    out = map_heads(lambda *a: _block_head(*a, **common), query, key, mask, bias, adm=adm)
    return SelectionResult(*out)


class _Blocks(NamedTuple):
  """Per-block summaries of one head's keys (padded to `nb * b`)."""

  kb: jax.Array  # [nb, b, H] keys in the compute dtype
  kmax: jax.Array  # [nb, H] per-channel maximum
  kmin: jax.Array  # [nb, H] per-channel minimum
  kabs: jax.Array  # [nb, H] per-channel maximum magnitude (rounding slack)
  kmean: jax.Array  # [nb, H] mean key
  knan: jax.Array  # [nb, b] key with a NaN entry (left out of the summaries above)
  s: int  # keys before padding


def _summarise(kmat: jax.Array, b: int, dtype) -> _Blocks:
  s, h = kmat.shape
  nb = -(-s // b)
  kb = pad_axis(kmat, 0, nb * b, 0).astype(dtype).reshape(nb, b, h)
  knan = jnp.any(jnp.isnan(kb), axis=-1)  # [nb, b]
  # A NaN key bounds nothing: it is left out of the summaries and marks its
  # block NaN only for the rows that may attend it (`_block_scores`).
  kvalid = (jnp.arange(nb * b) < s).reshape(nb, b, 1) & ~knan[..., None]
  inf = jnp.asarray(jnp.inf, dtype)
  some = jnp.any(kvalid, axis=1)  # [nb, 1]: a block of NaN keys only gets zero summaries
  kmax = jnp.where(some, jnp.max(jnp.where(kvalid, kb, -inf), axis=1), 0)
  kmin = jnp.where(some, jnp.min(jnp.where(kvalid, kb, inf), axis=1), 0)
  kabs = jnp.maximum(jnp.abs(kmax), jnp.abs(kmin))
  kmean = jnp.sum(jnp.where(kvalid, kb, 0), axis=1) / jnp.maximum(jnp.sum(kvalid, 1), 1)
  return _Blocks(kb, kmax, kmin, kabs, kmean, knan, s)


def _admissible(mc, rows, blk: _Blocks, is_causal: bool):
  """`(valid_cols [c, nb * b] or None when all are, num [c] int32, block_ok [c, nb])`."""
  c, (nb, b) = rows.shape[0], blk.kb.shape[:2]
  s, sp = blk.s, nb * b
  cols = jnp.arange(sp)[None, :]
  if mc is None and not is_causal:
    return None, jnp.full((c,), s, jnp.int32), jnp.ones((c, nb), bool)
  if mc is None:
    valid_cols = (cols < s) & (cols <= rows[:, None])
    block_ok = (jnp.arange(nb) * b)[None, :] <= rows[:, None]
    return valid_cols, jnp.minimum(rows + 1, s).astype(jnp.int32), block_ok
  valid_cols = (cols < s) & pad_axis(jnp.broadcast_to(mc, (c, s)), 1, sp, False)
  if is_causal:
    valid_cols = valid_cols & (cols <= rows[:, None])
  num = jnp.sum(valid_cols, axis=-1, dtype=jnp.int32)
  return valid_cols, num, jnp.any(valid_cols.reshape(c, nb, b), axis=-1)


def _block_scores(qs, bfull, valid_cols, block_ok, blk: _Blocks, summary: str):
  """`(ub [c, nb] certified upper bound per block, rank [c, nb] the ranking score)`."""
  hi = jax.lax.Precision.HIGHEST
  c, (nb, b) = qs.shape[0], blk.kb.shape[:2]
  neg = jnp.asarray(-jnp.inf, qs.dtype)
  # Certified upper bound per block (with a rounding slack).
  ub = jnp.dot(jnp.maximum(qs, 0), blk.kmax.T, precision=hi) + jnp.dot(
    jnp.minimum(qs, 0), blk.kmin.T, precision=hi
  )
  ub = ub + 1e-5 * jnp.dot(jnp.abs(qs), blk.kabs.T, precision=hi) + 1e-30
  bmax = None  # [c, nb] largest admissible bias per block (0 on empty blocks)
  if bfull is not None:
    bvalid = bfull if valid_cols is None else jnp.where(valid_cols, bfull, neg)
    bmax = jnp.where(block_ok, jnp.max(bvalid.reshape(c, nb, b), axis=-1), 0)
    ub = ub + bmax
  # NaN (ranked first, no bound when dropped) only where the row may attend
  # a NaN key of the block: the row is NaN then, as in dense attention.
  if valid_cols is None:
    nan = jnp.broadcast_to(jnp.any(blk.knan, axis=-1), (c, nb))
  else:
    nan = jnp.any((valid_cols & blk.knan.reshape(nb * b)).reshape(c, nb, b), axis=-1)
  nan_or = lambda x: jnp.where(nan, jnp.asarray(jnp.nan, x.dtype), x)
  ub = jnp.where(block_ok, nan_or(ub), neg)
  if summary != "mean":
    return ub, ub
  rank = jnp.dot(qs, blk.kmean.T, precision=hi)
  if bmax is not None:
    rank = rank + bmax
  return ub, jnp.where(block_ok, nan_or(rank), neg)


def _block_head(q, kmat, mask, bias, adm, *, k, scale, is_causal, cfg, precision):
  """Block top-k of one head: `(idx [T, k], next_logit [T], num_keys [T])`."""
  t, h = q.shape
  dtype = compute_dtype(q.dtype, kmat.dtype)
  blk = _summarise(kmat, cfg.block_size, dtype)
  nb, b = blk.kb.shape[:2]
  nsel = min(cfg.num_blocks, nb)
  kk = min(k + 1, nsel * b)
  c = min(cfg.query_chunk, t)
  nc = -(-t // c)
  tp = nc * c
  xs = (
    pad_axis(q, 0, tp, 0).reshape(nc, c, h),
    jnp.arange(nc) * c,
    row_chunks(mask, t, tp, c, False),
    row_chunks(bias, t, tp, c, 0),
  )
  neg = jnp.asarray(-jnp.inf, dtype)

  def body(x):
    qc, row0, mc, bc = x
    mc = chunk_mask(mc, adm, row0, c, blk.s)  # index-range masks of this chunk: [c, S]
    qs = qc.astype(dtype) * jnp.asarray(scale, dtype)
    rows = row0 + jnp.arange(c)
    valid_cols, num, block_ok = _admissible(mc, rows, blk, is_causal)
    bfull = None
    if bc is not None:
      bfull = pad_axis(jnp.broadcast_to(bc, (c, blk.s)).astype(dtype), 1, nb * b, 0.0)
    ub, rank = _block_scores(qs, bfull, valid_cols, block_ok, blk, cfg.summary)
    bid = jnp.sort(_top_k(rank, nsel)[1], axis=-1)
    kept = jnp.zeros((c, nb), bool).at[jnp.arange(c)[:, None], bid].set(True)
    drop_bound = jnp.max(jnp.where(kept, neg, ub), axis=-1)
    pos = (bid[..., None] * b + jnp.arange(b)).reshape(c, nsel * b)  # key positions
    kc = blk.kb[bid].reshape(c, nsel * b, h)
    logits = jnp.einsum(
      "th,tjh->tj", qc, kc.astype(qc.dtype), precision=precision, preferred_element_type=dtype
    ).astype(dtype) * jnp.asarray(scale, dtype)
    if bfull is not None:
      logits = logits + jnp.take_along_axis(bfull, pos, axis=-1)
    if valid_cols is None:
      ok = pos < blk.s
    elif mc is None:
      ok = (pos < blk.s) & (pos <= rows[:, None])
    else:
      ok = jnp.take_along_axis(valid_cols, pos, axis=-1)
    vals, p = _top_k(jnp.where(ok, logits, neg), kk)
    idx, nxt = finish_top_k(vals, jnp.take_along_axis(pos, p, axis=-1), k)
    if kk <= k:  # every candidate kept: no candidate bound
      nxt = jnp.full_like(nxt, neg)
    return idx, jnp.maximum(nxt, drop_bound), num

  idx, nxt, num = jax.lax.map(body, xs)
  return idx.reshape(tp, k)[:t], nxt.reshape(tp)[:t], num.reshape(tp)[:t]
