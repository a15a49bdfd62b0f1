"""Exact selection: the same indices as `jax.lax.top_k` on the full row, with
O(query_chunk * S) memory (see `gsparse.selection` for the algorithm), and the
fused route `select_and_attend` that also attends inside the chunk loop."""

from __future__ import annotations

import dataclasses
import functools
from typing import NamedTuple

import jax
import jax.numpy as jnp
from jax.lax import PrecisionLike

from gsparse import _checks, _native
from gsparse._admissible import Admissible
from gsparse._numerics import finish_top_k
from gsparse._numerics import sortable_int32 as _sortable
from gsparse._numerics import top_k as _top_k
from gsparse._numerics import top_k_or as _top_k_or
from gsparse.attention import compute_dtype, masked_softmax_lse
from gsparse.selection._bands import dropped_band_counts
from gsparse.selection._common import (
  SelectionResult,
  auto_key_block,
  kept_values,
  map_heads,
  pad_axis,
  row_chunks,
  row_logsumexp,
  rows_logits,
)
from gsparse.selection._exact_grad import fused_attend


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
    causal_groups: with `is_causal`, the query chunks are split into up to
      this many consecutive groups (of at least 2 chunks each) and each group
      scores only the keys its rows may see (a static key length per group):
      about `(G + 1) / (2 G)` of the logits of the full square. 1 scores
      every key in every chunk.
  """

  query_chunk: int = 256
  key_block: int | None = None
  search_steps: int = 12
  candidate_blocks: int | None = None
  causal_groups: int = 8

  def __post_init__(self):
    _checks.check_int("query_chunk", self.query_chunk, minimum=1)
    if self.key_block is not None:
      _checks.check_int("key_block", self.key_block, minimum=1)
    _checks.check_int("search_steps", self.search_steps, minimum=0, maximum=64)
    if self.candidate_blocks is not None:
      _checks.check_int("candidate_blocks", self.candidate_blocks, minimum=1)
    _checks.check_int("causal_groups", self.causal_groups, minimum=1)

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
    row_lse: bool = False,
    kept_logits: bool = False,
    band_counts: bool = False,
  ) -> SelectionResult:
    """Exact top-k on checked inputs (see `gsparse.selection.select`); no key needed.

    With `row_lse`, also the log-sum-exp of every row (`SelectionResult.row_logsumexp`);
    with `kept_logits`, also the kept slots' logits (`SelectionResult.kept_logits`);
    with `band_counts`, also the dropped logits' band counts (`SelectionResult.band_counts`).
    """
    del selection_key  # deterministic
    statics = dict(k=k, is_causal=is_causal, cfg=self, precision=precision, row_lse=row_lse)
    statics.update(kept_logits=kept_logits, band_counts=band_counts)
    idx, nxt, num, *rest = _exact_heads(query, key, None, mask, bias, adm, scale, **statics)
    lse = rest.pop(0) if row_lse else None
    kept = rest.pop(0) if kept_logits else None
    return SelectionResult(idx, nxt, num, None, lse, kept, rest.pop(0) if band_counts else None)


def select_and_attend(
  config: ExactSelection,
  query: jax.Array,
  key: jax.Array,
  value: jax.Array,
  bias: jax.Array | None,
  mask: jax.Array | None,
  *,
  k: int,
  scale: float,
  is_causal: bool,
  precision: PrecisionLike = None,
  adm: Admissible | None = None,
  row_lse: bool = False,
  band_counts: bool = False,
) -> tuple[SelectionResult, jax.Array, jax.Array]:
  """Exact selection that also attends over the kept keys in the same chunk loop.

  The logits each chunk already holds give the kept weights, so the kept keys
  are never gathered in the forward; `topk_attention` takes this route for
  "exact" (and "auto" on CPU) on the XLA gather path. Differentiable
  (`gsparse.selection._exact_grad`): the backward re-gathers the kept keys
  from O(T k) residuals, the selection gets no gradient. Inputs as
  `ExactSelection.select`, plus `value` `[batch..., S, K, Hv]`, `adm`, the
  index-range masks (`gsparse._admissible`), `row_lse` (also the
  log-sum-exp of every row) and `band_counts` (also the band counts).

  Returns:
    `(selection, output [batch..., T, N, Hv] in the compute dtype,
    logsumexp [batch..., T, N] over the kept keys)`.
  """
  k = min(k, key.shape[-3])
  statics = (
    ("k", k), ("is_causal", is_causal), ("cfg", config), ("precision", precision),
    ("row_lse", row_lse), ("band_counts", band_counts),
  )  # fmt: skip
  idx, nxt, num, *rest, out, lse = fused_attend(
    _exact_heads, statics, query, key, value, bias, scale, mask, adm
  )
  all_lse = rest.pop(0) if row_lse else None
  bands = rest.pop(0) if band_counts else None
  return SelectionResult(idx, nxt, num, None, all_lse, None, bands), out, lse


def _exact_heads(query, key, value, mask, bias, adm, scale, **statics):
  """`_exact_head` over every batch element and head, as one jitted computation.

  Jitted at module level (static: the config and flags; `scale` is traced) so
  that an op-by-op call reuses its compiled program: an eager `lax.map` over a
  fresh closure would be traced and compiled again on every call. Whether the
  native CPU top-k is on is part of the cache key, so switching it off
  (`gsparse._native`) retraces instead of reusing a program that calls it.
  """
  native = _native.available()
  return _exact_heads_jit(query, key, value, mask, bias, adm, scale, native=native, **statics)


@functools.partial(
  jax.jit,
  static_argnames=(
    "k",
    "is_causal",
    "cfg",
    "precision",
    "row_lse",
    "kept_logits",
    "band_counts",
    "native",
  ),
)
def _exact_heads_jit(query, key, value, mask, bias, adm, scale, *, native, **statics):
  del native  # a cache key only: `_top_k` reads the switch while tracing
  common = dict(scale=scale, **statics)
  return map_heads(
    lambda *a: _exact_head(*a, **common), query, key, mask, bias, value=value, adm=adm
  )


def _prefix_count(flags: jax.Array, group: int = 16) -> jax.Array:
  """Inclusive prefix count of a boolean `[c, m]` along its last axis.

  Two small matmuls (within groups of `group`, then across group totals)
  instead of a cumulative sum, which XLA:CPU lowers to a slow scan; exact,
  since every partial count is an integer below 2**24.
  """
  c, m = flags.shape
  ng = -(-m // group)
  f = pad_axis(flags, 1, ng * group, False).astype(jnp.float32).reshape(c, ng, group)
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


class _Search(NamedTuple):
  """Static shape of the two-stage search of one head (see `_exact_head`)."""

  kk: int  # logits wanted per row (k + 1, at most S)
  b: int  # keys per block
  nb: int  # blocks per row
  nkb: int  # blocks `jax.lax.top_k` on the block maxima keeps
  cap: int  # candidate slots of the threshold search
  steps: int  # bisection steps, 0 = no threshold search


def _search_for(cfg: ExactSelection, s: int, k: int) -> _Search:
  kk = min(k + 1, s)
  b = cfg.key_block if cfg.key_block is not None else auto_key_block(s, k)
  nb = -(-s // b)
  cap = min(nb, max(kk, cfg.candidate_blocks if cfg.candidate_blocks is not None else kk + 32))
  steps = cfg.search_steps if cap < nb else 0
  return _Search(kk, b, nb, min(kk, nb), cap, steps)


def _from_blocks(s3, bid, sr: _Search, count=None, lo=None):
  """Exact top-kk among the blocks `bid` (increasing: exact tie order)."""
  cand = jnp.take_along_axis(s3, bid[..., None], axis=1)
  if count is not None:  # padding slots, and logits that cannot be in the top-kk
    keep = jnp.arange(bid.shape[1])[None, :, None] < count[:, None, None]
    cand = jnp.where(keep & (_sortable(cand) >= lo[..., None]), cand, -jnp.inf)
  vals, pos = _top_k(cand.reshape(s3.shape[0], -1), sr.kk)
  return vals, jnp.take_along_axis(bid, pos // sr.b, axis=-1) * sr.b + pos % sr.b


def _by_blocks(logits, sr: _Search):
  """Top-kk of `[c, nb * b]` logits: the candidate blocks first, then `top_k` on them."""
  s3 = logits.reshape(logits.shape[0], sr.nb, sr.b)
  if sr.steps == 0:
    _, bid = _top_k(jnp.max(s3, axis=-1), sr.nkb)
    return _from_blocks(s3, jnp.sort(bid, axis=-1), sr)
  bid, count, lo = _block_candidates(jnp.max(_sortable(s3), axis=-1), sr.kk, sr.cap, sr.steps)
  return _from_blocks(s3, bid, sr, count, lo)


def _exact_head(
  q,
  kv,
  mask,
  bias,
  adm,
  *,
  k,
  scale,
  is_causal,
  cfg,
  precision,
  row_lse=False,
  kept_logits=False,
  band_counts=False,
):
  """Exact top-k of one head; `kv` is the keys `[S, H]`, or `(keys, values [S, Hv])`
  to also attend over the kept keys with the logits already at hand (returns
  `(idx, nxt, num, out, lse)` then). `adm`: this batch element's index-range
  masks, evaluated per chunk. `row_lse` inserts the log-sum-exp of the
  whole row after `num`: the chunk holds the whole row, so it is exact;
  `kept_logits` then inserts the kept slots' logits `[T, k]` (top_k's values),
  `band_counts` then the dropped logits' band counts `[T, B + 1]`
  (`gsparse.selection._bands`).

  Causal calls split the chunks into `cfg.causal_groups` groups; a group whose
  last row is `r` scores keys `[0, r]` only. The keys it skips are
  inadmissible to all its rows, so indices, tie order, counts and the row
  log-sum-exp are those of the whole row."""
  kmat, vmat = kv if isinstance(kv, tuple) else (kv, None)
  t, h = q.shape
  s = kmat.shape[0]
  c = min(cfg.query_chunk, t)
  nc = -(-t // c)
  tp = nc * c
  xs = (
    pad_axis(q, 0, tp, 0).reshape(nc, c, h),
    jnp.arange(nc) * c,
    row_chunks(mask, t, tp, c, False),
    row_chunks(bias, t, tp, c, 0),
  )
  # At least 2 chunks per group: XLA inlines a loop of one step, and the
  # inlined groups' logits are then all live at once (unbounded memory).
  groups = max(1, min(nc // 2, cfg.causal_groups)) if is_causal else 1
  bounds = [round(nc * g / groups) for g in range(groups + 1)]
  common = dict(k=k, scale=scale, is_causal=is_causal, cfg=cfg, precision=precision)
  parts = []
  for a, b in zip(bounds[:-1], bounds[1:], strict=True):
    sg = min(s, t, b * c) if groups > 1 else s  # keys [0, last row] of the group
    qg, rg = xs[0][a:b], xs[1][a:b]
    xg = (qg, rg, *(None if x is None else _slice_group(x, a, b, sg) for x in xs[2:]))
    kvg = (kmat[:sg], None if vmat is None else vmat[:sg])
    flags = dict(row_lse=row_lse, kept_logits=kept_logits, band_counts=band_counts)
    parts.append(_exact_rows(xg, *kvg, adm=adm, **flags, **common))
  outs = parts[0] if groups == 1 else [jnp.concatenate(o, axis=0) for o in zip(*parts, strict=True)]
  return tuple(o.reshape(tp, *o.shape[2:])[:t] for o in outs)


def _slice_group(x, a, b, sg):
  """Chunks `[a, b)` of mask/bias row chunks `[nc, c or 1, S']`, keys `[0, sg)`."""
  x = x[a:b]
  return x[..., :sg] if x.shape[-1] > 1 else x


def _exact_rows(
  xs, kmat, vmat, *, adm, k, scale, is_causal, cfg, precision, row_lse, kept_logits, band_counts
):
  """`_exact_head` on the query chunks `xs` against the keys `kmat [S, H]` (all of them)."""
  s = kmat.shape[0]
  dtype = compute_dtype(xs[0].dtype, kmat.dtype, *(() if vmat is None else (vmat.dtype,)))
  sr = _search_for(cfg, s, k)
  two_stage = sr.b > 1 and sr.nkb < sr.nb
  sp = sr.nb * sr.b if two_stage else s
  kpad = pad_axis(kmat, 0, sp, 0)
  common = dict(scale=scale, dtype=dtype, precision=precision)

  def body(x):
    qc, row0, mc, bc = x
    logits, num = rows_logits(
      qc, kpad, bc, mc, row0, s=s, sp=sp, is_causal=is_causal, adm=adm, **common
    )
    if not two_stage:
      vals, idx = _top_k(logits, sr.kk)
    elif cfg.key_block is None:  # auto: the native CPU top-k where it serves, else blocks
      vals, idx = _top_k_or(logits, sr.kk, lambda lg: _by_blocks(lg, sr))
    else:
      vals, idx = _by_blocks(logits, sr)
    idx, nxt = finish_top_k(vals, idx, k)
    sel = (idx, nxt, num, row_logsumexp(logits)) if row_lse else (idx, nxt, num)
    sel = (*sel, kept_values(vals, idx)) if kept_logits else sel
    if band_counts:  # a second pass over the chunk's logits, now that s_(k+1) is known
      sel = (*sel, dropped_band_counts(logits, nxt, num, jnp.sum(idx >= 0, axis=-1)))
    if vmat is None:
      return sel
    return *sel, *_attend_chunk(vmat, logits, idx, dtype=dtype, precision=precision)

  return jax.lax.map(body, xs)


def _attend_chunk(vmat, logits, idx, *, dtype, precision):
  """`(output [c, Hv], logsumexp [c])` over the kept keys `idx` of a chunk.

  The kept logits are read back from `logits` (their values are top_k's).
  Never differentiated: `gsparse.selection._exact_grad` gives the derivatives.
  """
  ok = idx >= 0
  safe = jnp.where(ok, idx, 0)
  w, lse = masked_softmax_lse(jnp.take_along_axis(logits, safe, axis=1), ok)
  # An empty slot reads a zero row, not value row 0 (0 * NaN would reach the row).
  vg = jnp.where(ok[..., None], jnp.take(vmat, safe, axis=0, mode="clip"), 0).astype(dtype)
  return jnp.einsum("tk,tkv->tv", w, vg, precision=precision), lse
