"""Scalable key selection for top-k attention: exact, block and LSH.

`gsparse.topk_attention(..., selection=...)` splits top-k attention into a
selection (which keys each query keeps) and the sparse gather over the kept
keys. The naive selection ("full") materialises the `[N, T, S]` logit matrix
and calls `jax.lax.top_k` on it. The selections here never hold more than a
chunk of it:

* `ExactSelection` ("exact"): queries are processed in chunks of
  `query_chunk` rows (`jax.lax.map`). For each chunk the logits against all
  keys are computed and the keys are cut into blocks of `key_block`. A
  threshold `lo` such that at least `k + 1` block maxima are `>= lo` is found
  by bisection on the int32 keys that order floats as `jax.lax.top_k` does
  (starting from the minimum of the maxima of `k + 1` disjoint groups of
  blocks); every logit `>= lo` lies in a block whose maximum is `>= lo`, and
  at least `k + 1` logits are `>= lo`, so the top-(k+1) logits, ties
  included, lie in the flagged blocks. The flagged blocks are compacted in
  increasing key order (a prefix count in two small matmuls and a scatter),
  and `jax.lax.top_k` on their logits (those below `lo` masked) returns
  exactly the indices, tie order included, of `jax.lax.top_k` on the full
  row. A row that still flags more than `candidate_blocks` blocks (heavy ties,
  e.g. a zero query) bisects on until `lo` is exactly the (k+1)-th largest
  block maximum and keeps the blocks above it plus the lowest blocks equal to
  it, k + 1 in all: the blocks that `jax.lax.top_k` on the block maxima
  keeps (if a logit x lay outside them, the k + 1 kept blocks would each hold
  a distinct logit ranked before x).
  The point of the threshold: on XLA:CPU `jax.lax.top_k` is a comparator
  sort of each row and costs more than the matmul of the logits, so it runs
  only on the few candidate blocks. On the XLA path `topk_attention`
  also computes the output inside the chunk loop from the logits already at
  hand (`select(..., value=)`), so the kept keys are never gathered. Peak
  memory is O(query_chunk * S) per head plus the O(T * k) result.
* `BlockSelection` ("block"): keys are cut into blocks summarised by their
  per-channel minimum and maximum. `q . k <= sum_h max(q_h min_h, q_h max_h)`
  for every key of a block, so each block gets a certified upper bound on its
  logits in two small matmuls; the `num_blocks` blocks with the largest bound
  are kept and the exact top-k is taken inside them. Approximate (recall is
  measured, see `selection_recall`), but the certificate stays valid: a
  dropped block's bound caps its logits.
* `LSHSelection` ("lsh"): the sortLSH step of HyperAttention (Han et al.,
  2024): queries and keys are hashed by the signs of random projections
  (angular LSH), the codes are ordered so that neighbouring codes differ in
  one sign, queries and keys are sorted by code, and each block of sorted
  queries scores a window of sorted keys around it. The diagonal block (keys
  near the query's own position) is always scored too, which keeps causal
  rows covered. Uniform column sampling, which HyperAttention uses for the
  remaining mass, is dropped: under sparsity the top-k carry the output.
  An optional sampled estimate of the dropped mass corrects the normaliser.
  O(T * block * H) work, never the full logit matrix.

Logits that evaluate to `-inf` count as masked. All selections support
`mask`, `bias`, `is_causal` and grouped-query heads, and give the same result
under `jax.jit` and `jax.vmap`.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
from jax.typing import ArrayLike

from gsparse import _checks
from gsparse._numerics import finish_top_k
from gsparse._numerics import sortable_int32 as _sortable
from gsparse._numerics import top_k as _top_k
from gsparse._numerics import top_k_or as _top_k_or
from gsparse.attention import compute_dtype, masked_softmax_lse

__all__ = [
  "BlockSelection",
  "ExactSelection",
  "LSHSelection",
  "SelectionResult",
  "gather_bias",
  "resolve_selection",
  "select",
  "selection_recall",
]


@dataclasses.dataclass(frozen=True)
class ExactSelection:
  """Memory-bounded exact top-k selection (static under `jit`).

  Attributes:
    query_chunk: queries per step; peak memory is about
      `query_chunk * S * 4` bytes per head. Need not divide T (the last chunk
      is padded).
    key_block: keys per block of the two-stage search, or None for automatic:
      on CPU with the native top-k kernel (`gsparse._native`) a single
      native top-k per row (one pass over the row, no block search);
      elsewhere blocks of about `sqrt(S / (k + 1))` keys (a power of two).
      1 means a single `top_k` per row. Need not divide S.
    search_steps: bisection steps of the threshold search that picks the
      candidate blocks without a sort (rows that still flag more than
      `candidate_blocks` blocks, e.g. under heavy ties, keep bisecting until
      the threshold is exact); 0 picks the blocks with `jax.lax.top_k` on
      the block maxima. The result is the same either way; the bisection
      avoids XLA's sort of the block maxima.
    candidate_blocks: candidate blocks per row for the threshold search, or
      None for `k + 33` (at least `k + 1` are used).
  """

  query_chunk: int = 256
  key_block: int | None = None
  search_steps: int = 12
  candidate_blocks: int | None = None

  def __post_init__(self):
    _checks.check_int("query_chunk", self.query_chunk, minimum=1)
    if self.key_block is not None:
      _checks.check_int("key_block", self.key_block, minimum=1)
    _checks.check_int("search_steps", self.search_steps, minimum=0, maximum=64)
    if self.candidate_blocks is not None:
      _checks.check_int("candidate_blocks", self.candidate_blocks, minimum=1)


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


@dataclasses.dataclass(frozen=True)
class LSHSelection:
  """sortLSH selection (HyperAttention without column sampling); static under `jit`.

  Attributes:
    num_projections: sign bits per hash (2**num_projections buckets), or None
      for about `log2(S / block_size)` (buckets about one window long).
    block_size: keys scored by each block of sorted queries (the window of
      sorted keys centred on the block).
    query_block: sorted queries sharing one key window; default
      `block_size // 2`, so each query sees at least a quarter window on
      either side of its rank.
    num_hashes: independent hash rounds; candidates are their union.
    diagonal: also score the block of keys around the query's own position
      (`(t // block_size) * block_size`, +block_size); needed for causal rows.
    normalizer_samples: if > 0, the softmax normaliser also includes the
      exact mass of the scored-but-dropped candidates and an unbiased
      estimate, from this many uniformly sampled keys, of the mass of the
      keys never scored (HyperAttention's correction of the diagonal `D`).
  """

  num_projections: int | None = None
  block_size: int = 256
  query_block: int | None = None
  num_hashes: int = 1
  diagonal: bool = True
  normalizer_samples: int = 0

  def __post_init__(self):
    if self.num_projections is not None:
      _checks.check_int("num_projections", self.num_projections, minimum=1, maximum=20)
    _checks.check_int("block_size", self.block_size, minimum=1)
    if self.query_block is not None:
      _checks.check_int("query_block", self.query_block, minimum=1)
    _checks.check_int("num_hashes", self.num_hashes, minimum=1)
    if not isinstance(self.diagonal, bool):
      raise TypeError(f"diagonal must be a bool, got {self.diagonal!r}")
    _checks.check_int("normalizer_samples", self.normalizer_samples, minimum=0)

  def projections_for(self, s: int) -> int:
    if self.num_projections is not None:
      return self.num_projections
    return int(min(16, max(1, round(math.log2(max(s / self.block_size, 1.0))))))

  @property
  def queries_per_block(self) -> int:
    return self.query_block if self.query_block is not None else max(1, self.block_size // 2)


SelectionConfig = ExactSelection | BlockSelection | LSHSelection
_NAMES = {"exact": ExactSelection, "block": BlockSelection, "lsh": LSHSelection}


def resolve_selection(selection: Any) -> str | SelectionConfig:
  """Maps a selection name or config to "full" or a config dataclass.

  Raises:
    ValueError: unknown name. TypeError: neither a str nor a config.
  """
  if isinstance(selection, (ExactSelection, BlockSelection, LSHSelection)):
    return selection
  if isinstance(selection, str):
    if selection == "full":
      return "full"
    if selection in _NAMES:
      return _NAMES[selection]()
    raise ValueError(
      f"selection={selection!r} must be one of ('full', 'exact', 'block', 'lsh') or a "
      "selection config"
    )
  raise TypeError(
    f"selection must be a str or ExactSelection/BlockSelection/LSHSelection, got {selection!r}"
  )


class SelectionResult(NamedTuple):
  """What a selection returns, in the `[batch..., T, N, *]` layout.

  Attributes:
    indices: `[batch..., T, N, k]` int32 key positions, -1 = none.
    next_logit: `[batch..., T, N]` an upper bound on every admissible logit
      not selected (exact: the (k+1)-th largest logit); `-inf` if none.
    num_keys: `[batch..., T, N]` int32 number of admissible keys of the row.
    log_rest: `[batch..., T, N]` log of the extra normaliser mass (LSH with
      `normalizer_samples > 0`), else None.
    output: `[batch..., T, N, Hv]` top-k attention output in the compute
      dtype, when the selection was asked to attend (`select(..., value=)`,
      "exact" only), else None.
    logsumexp: `[batch..., T, N]` log normaliser over the kept keys, with
      `output`.
  """

  indices: jax.Array
  next_logit: jax.Array
  num_keys: jax.Array
  log_rest: jax.Array | None = None
  output: jax.Array | None = None
  logsumexp: jax.Array | None = None


# ----------------------------------------------------------------------------
# Per-head plumbing.


def _expand(x: jax.Array | None, batch: tuple[int, ...], n: int, t: int, s: int):
  """`x` broadcastable to `[*batch, N, T, S]` -> `[B', N', T', S']`, B' in {1, B}, N' in {1, N}."""
  if x is None:
    return None
  full = (*batch, n, t, s)
  x = x.reshape((1,) * (len(full) - x.ndim) + x.shape)
  lead = x.shape[: len(batch)]
  if all(d == 1 for d in lead):
    x = x.reshape(1, *x.shape[len(batch) :])
  else:
    x = jnp.broadcast_to(x, (*batch, *x.shape[len(batch) :])).reshape(-1, *x.shape[len(batch) :])
  return x


def _map_heads(fn, query, key, mask, bias, extra=(), value=None):
  """Runs `fn(q [T,H], k [S,H], mask [T',S'], bias [T',S'], *extra)` per batch and head.

  With `value`, the second argument is `(k [S,H], v [S,Hv])`. `fn` returns a
  tuple of `[T, ...]` arrays; the result is in `[*batch, T, N, ...]`.
  """
  *batch, t, n, h = query.shape
  s, kh = key.shape[-3], key.shape[-2]
  g = n // kh
  nb = math.prod(batch)
  q = jnp.moveaxis(query.reshape(nb, t, kh, g, h), 1, 3)  # [B, K, G, T, H]
  kk = jnp.moveaxis(key.reshape(nb, s, kh, h), 1, 2)  # [B, K, S, H]
  if value is not None:
    kk = (kk, jnp.moveaxis(value.reshape(nb, s, kh, value.shape[-1]), 1, 2))

  def prep(x):
    x = _expand(x, tuple(batch), n, t, s)
    if x is None:
      return None, (None, None, None)
    b_, n_ = x.shape[0], x.shape[1]
    x = x.reshape(b_, kh, g, *x.shape[2:]) if n_ == n else x.reshape(b_, 1, 1, *x.shape[2:])
    axes = tuple(0 if d > 1 else None for d in x.shape[:3])
    drop = tuple(i for i, d in enumerate(x.shape[:3]) if d == 1)
    return jnp.squeeze(x, drop) if drop else x, axes

  m5, max_ = prep(mask)
  b5, bax = prep(bias)
  f = fn
  f = jax.vmap(f, in_axes=(0, None, max_[2], bax[2], *[None] * len(extra)))
  f = jax.vmap(f, in_axes=(0, 0, max_[1], bax[1], *[None] * len(extra)))
  f = jax.vmap(f, in_axes=(0, 0, max_[0], bax[0], *[None] * len(extra)))
  outs = f(q, kk, m5, b5, *extra)

  def back(o):  # [B, K, G, T, ...] -> [*batch, T, N, ...]
    o = o.reshape(nb, n, *o.shape[3:])
    return jnp.moveaxis(o, 1, 2).reshape(*batch, t, n, *o.shape[3:])

  return tuple(back(o) for o in outs)


def _pad_axis(x: jax.Array, size: int, axis: int, value) -> jax.Array:
  pad = size - x.shape[axis]
  if pad <= 0:
    return x
  widths = [(0, 0)] * x.ndim
  widths[axis] = (0, pad)
  return jnp.pad(x, widths, constant_values=value)


def _row_chunks(x: jax.Array | None, t: int, tp: int, c: int, fill):
  """`[T', S']` -> `[nc, c or 1, S']` chunks along T (broadcast rows stay size 1)."""
  if x is None:
    return None
  nc = tp // c
  if x.shape[0] == 1:
    return jnp.broadcast_to(x[None], (nc, 1, x.shape[1]))
  return _pad_axis(x, tp, 0, fill).reshape(nc, c, x.shape[1])


def _rows_logits(qc, kmat, bc, mc, row0, *, s, sp, scale, is_causal, dtype, precision):
  """Logits of a query chunk against all (padded) keys, `-inf` where inadmissible."""
  c = qc.shape[0]
  logits = jnp.einsum("th,sh->ts", qc, kmat, precision=precision, preferred_element_type=dtype)
  logits = logits.astype(dtype) * jnp.asarray(scale, dtype)
  if bc is not None:
    logits = logits + _pad_axis(jnp.broadcast_to(bc, (c, s)).astype(dtype), sp, 1, 0.0)
  col = jnp.arange(sp)[None, :]
  valid = None
  if sp > s:
    valid = jnp.broadcast_to(col < s, (c, sp))
  if mc is not None:
    m = _pad_axis(jnp.broadcast_to(mc, (c, s)), sp, 1, False)
    valid = m if valid is None else valid & m
  if is_causal:
    cm = col <= (row0 + jnp.arange(c))[:, None]
    valid = cm if valid is None else valid & cm
  if valid is None:
    return logits, jnp.full((c,), s, jnp.int32)
  neg = jnp.asarray(-jnp.inf, dtype)
  return jnp.where(valid, logits, neg), jnp.sum(valid, axis=-1, dtype=jnp.int32)


def auto_key_block(s: int, k: int) -> int:
  """Block size about `sqrt(S / (k + 1))`, a power of two in [1, 64]."""
  b = math.sqrt(s / (k + 1))
  return int(min(64, max(1, 2 ** round(math.log2(b))))) if b >= 1 else 1


# ----------------------------------------------------------------------------
# Exact.


def _prefix_count(flags: jax.Array, group: int = 16) -> jax.Array:
  """Inclusive prefix count of a boolean `[c, m]` along its last axis.

  Two small matmuls (within groups of `group`, then across group totals)
  instead of a cumulative sum, which XLA:CPU lowers to a slow scan; exact,
  since every partial count is an integer below 2**24.
  """
  c, m = flags.shape
  ng = -(-m // group)
  f = _pad_axis(flags, ng * group, 1, False).astype(jnp.float32).reshape(c, ng, group)
  hi = jax.lax.Precision.HIGHEST
  within = jnp.dot(f, jnp.triu(jnp.ones((group, group), jnp.float32)), precision=hi)
  before = jnp.dot(within[..., -1], jnp.triu(jnp.ones((ng, ng), jnp.float32), 1), precision=hi)
  return (within + before[..., None]).reshape(c, ng * group)[:, :m].astype(jnp.int32)


def _block_candidates(bm: jax.Array, kk: int, cap: int, steps: int):
  """Blocks that must hold a row's top-`kk` logits, found without a sort.

  Args:
    bm: `[c, nb]` int32 sortable keys of the block maxima.
    kk: logits wanted per row.
    cap: candidate slots per row, `kk <= cap`.
    steps: bisection steps always taken; rows that still flag more than
      `cap` blocks keep bisecting (a while loop) until their threshold is the
      exact kk-th largest block maximum.

  Returns:
    `(bid [c, cap] int32 block ids in increasing order, padded with 0,
    count [c] int32 blocks flagged (<= cap), lo [c, 1] int32 key threshold)`.
    The top-`kk` logits of the row lie in the flagged blocks, ties resolved
    as `jax.lax.top_k` resolves them (towards the lower index), and every
    logit whose key is below `lo` is outside the top-`kk`.
  """
  c, nb = bm.shape
  g = nb // kk
  neg = _sortable(jnp.float32(-jnp.inf))
  fin = bm != neg  # blocks of -inf logits (masked keys) only ever give index -1
  # Invariant: at least kk block maxima are >= lo (hence at least kk logits).
  # The minimum of the maxima of kk disjoint groups of blocks satisfies it.
  lo = jnp.min(jnp.max(bm[:, : g * kk].reshape(c, kk, g), axis=-1), axis=-1)
  hi = jnp.max(bm, axis=-1)
  flagged = jnp.sum((bm >= lo[:, None]) & fin, axis=-1, dtype=jnp.int32)

  def step(state):
    lo, hi, flagged = state
    mid = (lo >> 1) + (hi >> 1) + ((lo | hi) & 1)  # ceil((lo + hi) / 2) without overflow
    n_mid = jnp.sum(bm >= mid[:, None], axis=-1, dtype=jnp.int32)  # mid > -inf: finite only
    ok = n_mid >= kk
    return jnp.where(ok, mid, lo), jnp.where(ok, hi, mid - 1), jnp.where(ok, n_mid, flagged)

  state = jax.lax.fori_loop(0, steps, lambda _, st: step(st), (lo, hi, flagged), unroll=True)
  # Heavy ties at the threshold (a zero query, equal keys): bisect to the end.
  # lo == hi is then the kk-th largest block maximum (32 steps at most).
  lo, hi, flagged = jax.lax.while_loop(
    lambda st: jnp.any((st[2] > cap) & (st[0] < st[1])), step, state
  )
  lo = lo[:, None]
  simple = (bm >= lo) & fin
  # Rows with more than cap blocks >= lo have lo = the kk-th largest maximum:
  # keep the blocks above it and, among the blocks equal to it, the lowest
  # ones, exactly kk in all (the blocks `lax.top_k` on the maxima would keep).
  gt, eq = bm > lo, bm == lo
  need = kk - jnp.sum(gt, axis=-1, keepdims=True, dtype=jnp.int32)
  tie = gt | (eq & (_prefix_count(eq) <= need))
  flag = jnp.where(flagged[:, None] > cap, tie, simple)
  pos = _prefix_count(flag)
  count = pos[:, -1]
  slot = jnp.where(flag, pos - 1, cap)
  bid = jnp.zeros((c, cap + 1), jnp.int32)
  bid = bid.at[jnp.arange(c)[:, None], slot].set(
    jnp.broadcast_to(jnp.arange(nb, dtype=jnp.int32), (c, nb)), mode="drop"
  )
  return bid[:, :cap], count, lo


def _exact_head(q, kv, mask, bias, *, k, scale, is_causal, cfg, precision):
  """Exact top-k of one head; `kv` is the keys `[S, H]`, or `(keys, values [S, Hv])`
  to also attend over the kept keys with the logits already at hand (returns
  `(idx, nxt, num, out, lse)` then)."""
  kmat, vmat = kv if isinstance(kv, tuple) else (kv, None)
  t, h = q.shape
  s = kmat.shape[0]
  dtype = compute_dtype(q.dtype, kmat.dtype, *(() if vmat is None else (vmat.dtype,)))
  c = min(cfg.query_chunk, t)
  nc = -(-t // c)
  tp = nc * c
  kk = min(k + 1, s)
  b = cfg.key_block if cfg.key_block is not None else auto_key_block(s, k)
  nb = -(-s // b)
  nkb = min(kk, nb)
  two_stage = b > 1 and nkb < nb
  cap = min(nb, max(kk, cfg.candidate_blocks if cfg.candidate_blocks is not None else kk + 32))
  search = two_stage and cfg.search_steps > 0 and cap < nb
  sp = nb * b if two_stage else s
  kpad = _pad_axis(kmat, sp, 0, 0)
  xs = (
    _pad_axis(q, tp, 0, 0).reshape(nc, c, h),
    jnp.arange(nc) * c,
    _row_chunks(mask, t, tp, c, False),
    _row_chunks(bias, t, tp, c, 0),
  )

  def from_blocks(s3, bid, count=None, lo=None):
    """Exact top-kk among the blocks `bid` (increasing: exact tie order)."""
    cand = jnp.take_along_axis(s3, bid[..., None], axis=1)
    if count is not None:  # padding slots, and logits that cannot be in the top-kk
      keep = jnp.arange(bid.shape[1])[None, :, None] < count[:, None, None]
      cand = jnp.where(keep & (_sortable(cand) >= lo[..., None]), cand, -jnp.inf)
    vals, pos = _top_k(cand.reshape(c, -1), kk)
    return vals, jnp.take_along_axis(bid, pos // b, axis=-1) * b + pos % b

  def by_top_k(s3):
    _, bid = _top_k(jnp.max(s3, axis=-1), nkb)
    return from_blocks(s3, jnp.sort(bid, axis=-1))

  def by_blocks(logits):
    s3 = logits.reshape(c, nb, b)
    if not search:
      return by_top_k(s3)
    bid, count, lo = _block_candidates(jnp.max(_sortable(s3), axis=-1), kk, cap, cfg.search_steps)
    return from_blocks(s3, bid, count, lo)

  def body(x):
    qc, row0, mc, bc = x
    logits, num = _rows_logits(
      qc,
      kpad,
      bc,
      mc,
      row0,
      s=s,
      sp=sp,
      scale=scale,
      is_causal=is_causal,
      dtype=dtype,
      precision=precision,
    )
    if not two_stage:
      vals, idx = _top_k(logits, kk)
    elif cfg.key_block is None:  # auto: the native CPU top-k where it serves, else blocks
      vals, idx = _top_k_or(logits, kk, by_blocks)
    else:
      vals, idx = by_blocks(logits)
    idx, nxt = finish_top_k(vals, idx, k)
    if vmat is None:
      return idx, nxt, num
    # Attend with the kept logits read back (their forward values are top_k's);
    # the gradient flows through the kept keys only (`_kept_logit_grad_path`).
    ok = idx >= 0
    safe = jnp.where(ok, idx, 0)
    kept = jnp.take_along_axis(jax.lax.stop_gradient(logits), safe, axis=1)
    kept = kept + _kept_logit_grad_path(qc, kmat, bc, safe, ok, scale, dtype, precision)
    w, lse = masked_softmax_lse(kept, ok)
    vg = jnp.take(vmat, jnp.where(ok, idx, 0), axis=0, mode="clip").astype(dtype)
    out = jnp.einsum("tk,tkv->tv", w, vg, precision=precision)
    return idx, nxt, num, out, lse

  outs = jax.lax.map(body, xs)
  return tuple(o.reshape(tp, *o.shape[2:])[:t] for o in outs)


def _kept_logit_grad_path(qc, kmat, bc, safe, ok, scale, dtype, precision):
  """Zero in the forward; in the backward, the gradient of the kept logits.

  The kept logits are recomputed from the `[c, k]` kept keys, `e`, and
  `e - stop_gradient(e)` is added: its value is 0 (NaN only where the kept
  logit is NaN or infinite, a row that is NaN anyway), its gradient that of
  the kept logits. Differentiating the `[c, S]` logit matrix instead would
  send `0 * k_j` into dq for every key, and a NaN key the row does not keep
  (masked, `-inf` bias) would make dq NaN.
  """
  kg = jnp.where(ok[..., None], jnp.take(kmat, safe, axis=0), 0)  # [c, k, H]
  e = jnp.einsum("th,tkh->tk", qc, kg, precision=precision, preferred_element_type=dtype)
  e = e.astype(dtype) * jnp.asarray(scale, dtype)
  if bc is not None:
    bfull = jnp.broadcast_to(bc, (safe.shape[0], kmat.shape[0])).astype(dtype)
    e = e + jnp.take_along_axis(bfull, safe, axis=1)
  e = jnp.where(ok, e, 0)
  return e - jax.lax.stop_gradient(e)


# ----------------------------------------------------------------------------
# Block.


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
  kb = _pad_axis(kmat, sp, 0, 0).astype(dtype).reshape(nb, b, h)
  kvalid = (jnp.arange(sp) < s).reshape(nb, b)
  inf = jnp.asarray(jnp.inf, dtype)
  kmax = jnp.max(jnp.where(kvalid[..., None], kb, -inf), axis=1)  # [nb, h]
  kmin = jnp.min(jnp.where(kvalid[..., None], kb, inf), axis=1)
  kabs = jnp.maximum(jnp.abs(kmax), jnp.abs(kmin))
  kmean = jnp.sum(jnp.where(kvalid[..., None], kb, 0), axis=1) / jnp.sum(kvalid, 1)[:, None]
  xs = (
    _pad_axis(q, tp, 0, 0).reshape(nc, c, h),
    jnp.arange(nc) * c,
    _row_chunks(mask, t, tp, c, False),
    _row_chunks(bias, t, tp, c, 0),
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
      valid_cols = (cols < s) & _pad_axis(jnp.broadcast_to(mc, (c, s)), sp, 1, False)
      if is_causal:
        valid_cols = valid_cols & (cols <= rows[:, None])
      num = jnp.sum(valid_cols, axis=-1, dtype=jnp.int32)
      block_ok = jnp.any(valid_cols.reshape(c, nb, b), axis=-1)
    if bc is not None:
      bfull = _pad_axis(jnp.broadcast_to(bc, (c, s)).astype(dtype), sp, 1, 0.0)
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


# ----------------------------------------------------------------------------
# LSH.


def _gray_rank(code: jax.Array, bits: int) -> jax.Array:
  """Position of a sign pattern in the reflected Gray order (inverse Gray code).

  Consecutive positions differ in exactly one sign, so sorting by it keeps
  nearby angular buckets next to each other.
  """
  shift = 1
  while shift < bits:
    code = code ^ (code >> shift)
    shift *= 2
  return code


def _lsh_sort_keys(x: jax.Array, proj: jax.Array, bits: int) -> jax.Array:
  """Real sort keys `[R, n]`: Gray rank of the sign bits plus a tie-breaking cosine in [0, 1)."""
  z = jnp.einsum("nh,rhp->rnp", x.astype(jnp.float32), proj, precision=jax.lax.Precision.HIGHEST)
  code = jnp.sum((z[..., :bits] > 0).astype(jnp.int32) << jnp.arange(bits), axis=-1)
  rank = _gray_rank(code, bits)
  norm = (
    jnp.sqrt(jnp.sum(x.astype(jnp.float32) ** 2, -1))[None]
    * jnp.sqrt(jnp.sum(proj[..., bits] ** 2, -1))[:, None]
  )
  cos = z[..., bits] / jnp.where(norm > 0, norm, 1.0)
  return rank.astype(jnp.float32) + 0.499 * (jnp.clip(cos, -1, 1) + 1)


def _lsh_head(q, kmat, mask, bias, proj, sample_key, *, k, scale, is_causal, cfg, precision):
  t, h = q.shape
  s = kmat.shape[0]
  dtype = compute_dtype(q.dtype, kmat.dtype)
  bits = cfg.projections_for(s)
  b = min(cfg.block_size, s)
  bq = min(cfg.queries_per_block, t)
  nqb = -(-t // bq)
  tq = nqb * bq
  rounds = cfg.num_hashes
  neg = jnp.asarray(-jnp.inf, dtype)
  scale_ = jnp.asarray(scale, dtype)
  qkey = _lsh_sort_keys(q, proj, bits)  # [R, T]
  kkey = _lsh_sort_keys(kmat, proj, bits)  # [R, S]
  korder = jnp.argsort(kkey, axis=-1)  # [R, S]
  ksorted = jnp.take_along_axis(kkey, korder, axis=-1)
  qorder = jnp.argsort(qkey, axis=-1)  # [R, T]
  qinv = jnp.argsort(qorder, axis=-1)
  qsorted_key = jnp.take_along_axis(qkey, qorder, axis=-1)
  centre = jnp.minimum(jnp.arange(nqb) * bq + bq // 2, t - 1)
  anchor = qsorted_key[:, centre]  # [R, nqb]
  pos = jax.vmap(jnp.searchsorted)(ksorted, anchor)
  start = jnp.clip(pos - b // 2, 0, s - b)  # [R, nqb]
  win = jnp.take_along_axis(
    korder, (start[..., None] + jnp.arange(b)).reshape(rounds, nqb * b), axis=-1
  ).reshape(rounds, nqb, b)
  # win: [R, nqb, b] key positions. Score each sorted query block against its window.
  qs = _pad_axis(jnp.take(q, qorder, axis=0), tq, 1, 0).reshape(rounds, nqb, bq, h)
  kw = kmat[win]  # [R, nqb, b, h]
  sc = jnp.einsum("rqih,rqjh->rqij", qs, kw, precision=precision, preferred_element_type=dtype)
  sc = sc.astype(dtype).reshape(rounds, tq, b) * scale_
  cand_idx = jnp.broadcast_to(win[:, :, None, :], (rounds, nqb, bq, b)).reshape(rounds, tq, b)
  # Back to the original query order: [T, R * b].
  rows_of = jax.vmap(lambda a, i: a[i])  # whole-row gathers (cheaper than elementwise)
  sc = rows_of(sc, qinv)
  cand_idx = rows_of(cand_idx, qinv)
  qstart = jnp.take_along_axis(jnp.repeat(start, bq, axis=1)[:, :t], qinv, axis=1)  # [R, T]
  sc = jnp.moveaxis(sc, 0, 1).reshape(t, rounds * b)
  cand_idx = jnp.moveaxis(cand_idx, 0, 1).reshape(t, rounds * b)
  rows = jnp.arange(t)
  dstart = (jnp.minimum(rows, s - 1) // b) * b  # diagonal block of each query
  # A key scored in several rounds is kept once (in its first round): key j of
  # round r repeats round r' < r iff its rank in round r' lies in the query's window there.
  krank = jnp.argsort(korder, axis=-1)  # [R, S]
  dup = jnp.zeros(sc.shape, bool)
  for r in range(1, rounds):
    cr = cand_idx[:, r * b : (r + 1) * b]
    rep = jnp.zeros(cr.shape, bool)
    for r0 in range(r):
      off = krank[r0][cr] - qstart[r0][:, None]
      rep = rep | ((off >= 0) & (off < b))
    dup = dup.at[:, r * b : (r + 1) * b].set(rep)
  if cfg.diagonal:
    dup = dup | ((cand_idx >= dstart[:, None]) & (cand_idx < dstart[:, None] + b))
    nkb = -(-s // b)
    kd = _pad_axis(kmat, nkb * b, 0, 0).reshape(nkb, b, h)
    qd = _pad_axis(q, -(-t // b) * b, 0, 0).reshape(-1, b, h)
    kblk = jnp.minimum(jnp.arange(qd.shape[0]), nkb - 1)
    dsc = jnp.einsum(
      "qih,qjh->qij", qd, kd[kblk], precision=precision, preferred_element_type=dtype
    )
    dsc = dsc.astype(dtype).reshape(-1, b)[:t] * scale_
    didx = dstart[:, None] + jnp.arange(b)
    sc = jnp.concatenate([dsc, sc], axis=1)
    cand_idx = jnp.concatenate([didx, cand_idx], axis=1)
    dup = jnp.concatenate([jnp.zeros((t, b), bool), dup], axis=1)
  # Admissibility of every candidate.
  ok = (cand_idx < s) & ~dup
  safe = jnp.clip(cand_idx, 0, s - 1)
  if is_causal:
    ok = ok & (cand_idx <= rows[:, None])
  if mask is not None:
    ok = ok & _at(mask, rows[:, None], safe)
  if bias is not None:
    sc = sc + _at(bias, rows[:, None], safe).astype(dtype)
  sc = jnp.where(ok, sc, neg)
  kk = min(k + 1, sc.shape[1])
  vals, p = _top_k(sc, kk)
  idx, nxt = finish_top_k(vals, jnp.take_along_axis(cand_idx, p, axis=-1), k)
  if kk <= k:
    nxt = jnp.full_like(nxt, neg)
  num, cap = _lsh_unscored_cap(q, kmat, mask, bias, scale=scale_, is_causal=is_causal)
  nxt = jnp.maximum(nxt, cap)
  log_rest = jnp.full((t,), neg)
  if cfg.normalizer_samples > 0:
    log_rest = _lsh_rest(
      q,
      kmat,
      mask,
      bias,
      sc,
      vals,
      kk,
      k,
      krank,
      qstart,
      dstart,
      sample_key,
      b=b,
      scale=scale_,
      is_causal=is_causal,
      cfg=cfg,
      dtype=dtype,
      precision=precision,
    )
  return idx, nxt, num, log_rest


def _lsh_unscored_cap(q, kmat, mask, bias, *, scale, is_causal):
  """`(num [T] admissible keys per row, cap [T])`: `cap` bounds every admissible logit.

  Cauchy-Schwarz, `|scale q.k| <= |scale| ||q|| max_j ||k_j||`, valid for
  either sign of the scale (loose but certified), plus the largest admissible
  bias of the row. A NaN key that the row may attend to makes its cap NaN
  (the row's attention is then NaN, as dense); a NaN key the row cannot
  attend to is ignored.
  """
  t, s = q.shape[0], kmat.shape[0]
  dtype = scale.dtype
  rows = jnp.arange(t)
  adm = None  # [T, S] admissibility, None when every key is admissible
  if mask is not None:
    adm = jnp.broadcast_to(mask, (t, s))
  if is_causal:
    causal = jnp.arange(s)[None, :] <= rows[:, None]
    adm = causal if adm is None else adm & causal
  num = jnp.full((t,), s, jnp.int32) if adm is None else jnp.sum(adm, -1, dtype=jnp.int32)
  knorm = jnp.sqrt(jnp.sum(kmat.astype(dtype) ** 2, -1))  # [S], NaN for a NaN key
  key_nan = jnp.isnan(knorm)
  kn = jnp.max(jnp.where(key_nan, 0.0, knorm))
  qn = jnp.sqrt(jnp.sum(q.astype(dtype) ** 2, -1))
  cap = jnp.abs(scale) * qn * kn * (1 + 1e-5) + 1e-30
  if bias is not None:
    bfull = jnp.broadcast_to(bias, (t, s)).astype(dtype)
    cap = cap + jnp.max(bfull if adm is None else jnp.where(adm, bfull, -jnp.inf), axis=-1)
  reach_nan = jnp.any(key_nan) if adm is None else jnp.any(adm & key_nan[None, :], axis=-1)
  return num, jnp.where(reach_nan, jnp.nan, cap)


def _at(x: jax.Array, rows: jax.Array, cols: jax.Array) -> jax.Array:
  """`x[rows, cols]` for a `[T', S']` array whose size-1 axes broadcast."""
  r = rows if x.shape[0] > 1 else jnp.zeros_like(rows)
  c = cols if x.shape[1] > 1 else jnp.zeros_like(cols)
  return x[r, c]


def _lsh_rest(
  q,
  kmat,
  mask,
  bias,
  sc,
  vals,
  kk,
  k,
  krank,
  qstart,
  dstart,
  sample_key,
  *,
  b,
  scale,
  is_causal,
  cfg,
  dtype,
  precision,
):
  """log of (mass of scored candidates not kept + sampled mass of keys never scored)."""
  t = q.shape[0]
  s = kmat.shape[0]
  neg = jnp.asarray(-jnp.inf, dtype)
  # Scored but dropped: all candidates minus the kept top-k.
  lse_all = jax.nn.logsumexp(sc, axis=-1)
  kept = vals[:, : min(k, kk)]
  lse_kept = jax.nn.logsumexp(kept, axis=-1)
  has = jnp.isfinite(lse_all) & (lse_all > lse_kept)
  diff = jnp.where(has, lse_all, 0.0) + jnp.log1p(
    -jnp.exp(jnp.minimum(jnp.where(has, lse_kept - lse_all, -1.0), -1e-7))
  )
  log_dropped = jnp.where(has, diff, neg)
  # Never scored: uniform samples with replacement, shared by the queries of the head.
  m = cfg.normalizer_samples
  j = jax.random.randint(sample_key, (m,), 0, s)
  lj = jnp.einsum("th,mh->tm", q, kmat[j], precision=precision, preferred_element_type=dtype)
  lj = lj.astype(dtype) * scale
  rows = jnp.arange(t)[:, None]
  ok = jnp.ones((t, m), bool)
  if is_causal:
    ok = ok & (j[None, :] <= rows)
  if mask is not None:
    ok = ok & _at(mask, rows, j[None, :])
  if bias is not None:
    lj = lj + _at(bias, rows, j[None, :]).astype(dtype)
  # Exclude sampled keys that were scored (in a round's window or the diagonal block).
  srank = krank[:, j]  # [R, m] rank of each sample per round
  scored = jnp.any(
    (srank[:, None, :] >= qstart[:, :, None]) & (srank[:, None, :] < qstart[:, :, None] + b),
    axis=0,
  )
  if cfg.diagonal:
    scored = scored | ((j[None, :] >= dstart[:, None]) & (j[None, :] < dstart[:, None] + b))
  ok = ok & ~scored
  lj = jnp.where(ok, lj, neg)
  log_sampled = jax.nn.logsumexp(lj, axis=-1) + jnp.log(jnp.asarray(s / m, dtype))
  return jnp.logaddexp(log_dropped, log_sampled)


# ----------------------------------------------------------------------------
# Public entry points.


def select(
  config: SelectionConfig,
  query: jax.Array,
  key: jax.Array,
  bias: jax.Array | None,
  mask: jax.Array | None,
  *,
  k: int,
  scale: float,
  is_causal: bool,
  rng: jax.Array | None = None,
  precision=None,
  value: jax.Array | None = None,
) -> SelectionResult:
  """Runs a selection on checked inputs (see `gsparse.topk_attention`).

  Args:
    config: an `ExactSelection`, `BlockSelection` or `LSHSelection`.
    query: `[batch..., T, N, H]`.
    key: `[batch..., S, K, H]`.
    bias: None or broadcastable to `[batch..., N, T, S]`.
    mask: None or boolean broadcastable to `[batch..., N, T, S]`.
    k: keys kept per query.
    scale: logit scale.
    is_causal: top-left aligned causal mask.
    rng: PRNG key, required by `LSHSelection` (the projections and samples).
    precision: einsum precision.
    value: optional `[batch..., S, K, Hv]`; with `ExactSelection`, the
      selection also attends over the kept keys (`SelectionResult.output`),
      reusing the logits it computed. Other selections ignore it.

  Returns:
    A `SelectionResult` in the `[batch..., T, N, *]` layout.
  """
  s = key.shape[-3]
  k = min(k, s)  # k > S keeps every key: no S-sized padding of a huge k
  common = dict(k=k, scale=scale, is_causal=is_causal, cfg=config, precision=precision)
  if isinstance(config, ExactSelection):
    out = _map_heads(lambda *a: _exact_head(*a, **common), query, key, mask, bias, value=value)
    if value is None:
      return SelectionResult(*out)
    idx, nxt, num, o, lse = out
    return SelectionResult(idx, nxt, num, output=o, logsumexp=lse)
  if isinstance(config, BlockSelection):
    nb = -(-s // config.block_size)
    if config.num_blocks < nb and k > config.num_blocks * config.block_size:
      raise ValueError(
        f"k={k} exceeds the capacity num_blocks * block_size = "
        f"{config.num_blocks} * {config.block_size} of BlockSelection"
      )
    out = _map_heads(lambda *a: _block_head(*a, **common), query, key, mask, bias)
    return SelectionResult(*out)
  if isinstance(config, LSHSelection):
    if rng is None:
      raise ValueError("selection 'lsh' needs a PRNG key: pass selection_key=jax.random.key(...)")
    cap = min(config.block_size, s) * (config.num_hashes + int(config.diagonal))
    if k > cap and cap < s:
      raise ValueError(
        f"k={k} exceeds the LSH candidate capacity block_size * (num_hashes + diagonal) = {cap}"
      )
    kproj, ksample = jax.random.split(rng)
    h = query.shape[-1]
    proj = jax.random.normal(kproj, (config.num_hashes, h, config.projections_for(s) + 1))
    out = _map_heads(
      lambda q, kk, m, b_, p, sk: _lsh_head(q, kk, m, b_, p, sk, **common),
      query,
      key,
      mask,
      bias,
      extra=(proj, ksample),
    )
    idx, nxt, num, rest = out
    return SelectionResult(idx, nxt, num, rest if config.normalizer_samples > 0 else None)
  raise TypeError(f"unknown selection config {config!r}")


def gather_bias(bias: ArrayLike, indices: jax.Array, key_len: int) -> jax.Array:
  """Bias at the selected keys without broadcasting it to `[batch..., N, T, S]`.

  Args:
    bias: broadcastable to `[batch..., N, T, S]`.
    indices: `[batch..., T, N, k]` (-1 = none; those slots get 0).
    key_len: S.

  Returns:
    `[batch..., T, N, k]` bias values.
  """
  bias = jnp.asarray(bias)
  *batch, t, n, kk = indices.shape
  b4 = _expand(bias, tuple(batch), n, t, key_len)  # [B', N', T', S']
  bsz = math.prod(batch)
  idx = jnp.moveaxis(indices.reshape(bsz, t, n, kk), 1, 2)  # [B, N, T, k]
  bi = jnp.arange(bsz)[:, None, None, None] if b4.shape[0] > 1 else 0
  ni = jnp.arange(n)[None, :, None, None] if b4.shape[1] > 1 else 0
  ti = jnp.arange(t)[None, None, :, None] if b4.shape[2] > 1 else 0
  si = jnp.clip(idx, 0, key_len - 1) if b4.shape[3] > 1 else 0
  out = jnp.broadcast_to(b4[bi, ni, ti, si], idx.shape)
  out = jnp.where(idx >= 0, out, 0)
  return jnp.moveaxis(out, 2, 1).reshape(*batch, t, n, kk)


def selection_recall(indices: ArrayLike, reference: ArrayLike) -> jax.Array:
  """Fraction of the reference keys of each row that `indices` also selects.

  Args:
    indices: `[..., k]` selected key positions (-1 = none).
    reference: `[..., k_ref]` the true top-k (e.g. from `selection="exact"`), -1 = none.

  Returns:
    `[...]` float32 recall in [0, 1]; 1 for rows whose reference is empty.
  """
  indices = jnp.asarray(indices)
  reference = jnp.asarray(reference)
  for name, a in (("indices", indices), ("reference", reference)):
    if not jnp.issubdtype(a.dtype, jnp.integer):
      raise TypeError(f"{name} must have an integer dtype, got {a.dtype}")
    if a.ndim < 1:
      raise ValueError(f"{name} must have at least 1 dimension [..., k], got shape {a.shape}")
  if indices.shape[:-1] != reference.shape[:-1]:
    raise ValueError(
      f"indices and reference must have the same leading dimensions, got {indices.shape} "
      f"and {reference.shape}"
    )
  hit = jnp.zeros(reference.shape, bool)
  # Loop over the selected slots to keep memory at O(rows * k_ref).
  hit = jax.lax.fori_loop(
    0,
    indices.shape[-1],
    lambda i, h: h | (reference == jax.lax.dynamic_index_in_dim(indices, i, -1, keepdims=True)),
    hit,
  )
  valid = reference >= 0
  num = jnp.sum(hit & valid, axis=-1)
  den = jnp.sum(valid, axis=-1)
  return jnp.where(den > 0, num / jnp.maximum(den, 1), 1.0).astype(jnp.float32)
