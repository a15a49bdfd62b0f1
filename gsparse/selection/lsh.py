"""LSH selection: the sortLSH step of HyperAttention (Han et al., 2024) without
column sampling, plus the diagonal block and an optional sampled correction of
the normaliser (approximate; deterministic given the PRNG key)."""

from __future__ import annotations

import dataclasses
import math
from typing import NamedTuple

import jax
import jax.numpy as jnp
from jax.lax import PrecisionLike

from gsparse import _checks
from gsparse._admissible import Admissible, admits, and_masks
from gsparse._numerics import finish_top_k
from gsparse._numerics import top_k as _top_k
from gsparse.attention import compute_dtype
from gsparse.selection._common import SelectionResult, chunk_mask, map_heads, pad_axis, row_chunks


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

  def require_key(self, selection_key) -> None:
    """Raises ValueError when no PRNG key was given (projections and samples need one)."""
    if selection_key is None:
      raise ValueError("selection 'lsh' needs a PRNG key: pass selection_key=jax.random.key(...)")

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
    """sortLSH top-k on checked inputs (see `gsparse.selection.select`).

    Raises:
      ValueError: no `selection_key`, or `k` above the candidate capacity
        `block_size * (num_hashes + diagonal)`.
    """
    self.require_key(selection_key)
    s = key.shape[-3]
    cap = min(self.block_size, s) * (self.num_hashes + int(self.diagonal))
    if k > cap and cap < s:
      raise ValueError(
        f"k={k} exceeds the LSH candidate capacity block_size * (num_hashes + diagonal) = {cap}"
      )
    kproj, ksample = jax.random.split(selection_key)
    h = query.shape[-1]
    proj = jax.random.normal(kproj, (self.num_hashes, h, self.projections_for(s) + 1))
    common = dict(k=k, scale=scale, is_causal=is_causal, cfg=self, precision=precision)
    idx, nxt, num, rest = map_heads(
      lambda q, kk, m, b_, a, p, sk: _lsh_head(q, kk, m, b_, a, p, sk, **common),
      query,
      key,
      mask,
      bias,
      extra=(proj, ksample),
      adm=adm,
    )
    return SelectionResult(idx, nxt, num, rest if self.normalizer_samples > 0 else None)


class _Head(NamedTuple):
  """Static settings and constants shared by the steps of one LSH head."""

  cfg: LSHSelection
  b: int  # keys per window (and per diagonal block)
  scale: jax.Array  # logit scale in the compute dtype
  dtype: jnp.dtype
  is_causal: bool
  precision: PrecisionLike


class _Windows(NamedTuple):
  """Where each query's candidates came from (needed to tell scored keys apart).

  krank: `[R, S]` rank of each key in the sorted order of each round.
  qstart: `[R, T]` first sorted rank of each query's window per round.
  dstart: `[T]` first key of each query's diagonal block.
  """

  krank: jax.Array
  qstart: jax.Array
  dstart: jax.Array


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


def _sorted_windows(q, kmat, proj, hd: _Head):
  """Scores each block of sorted queries against its window of sorted keys.

  Returns:
    `(sc [T, R * b] logits, cand [T, R * b] key positions, krank [R, S],
    qstart [R, T])`, in the original query order.
  """
  t, h = q.shape
  s = kmat.shape[0]
  b, rounds = hd.b, hd.cfg.num_hashes
  bits = hd.cfg.projections_for(s)
  bq = min(hd.cfg.queries_per_block, t)
  nqb = -(-t // bq)
  tq = nqb * bq
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
  qs = pad_axis(jnp.take(q, qorder, axis=0), 1, tq, 0).reshape(rounds, nqb, bq, h)
  kw = kmat[win]  # [R, nqb, b, h]
  sc = jnp.einsum(
    "rqih,rqjh->rqij", qs, kw, precision=hd.precision, preferred_element_type=hd.dtype
  )
  sc = sc.astype(hd.dtype).reshape(rounds, tq, b) * hd.scale
  cand = jnp.broadcast_to(win[:, :, None, :], (rounds, nqb, bq, b)).reshape(rounds, tq, b)
  # Back to the original query order: [T, R * b].
  rows_of = jax.vmap(lambda a, i: a[i])  # whole-row gathers (cheaper than elementwise)
  sc = jnp.moveaxis(rows_of(sc, qinv), 0, 1).reshape(t, rounds * b)
  cand = jnp.moveaxis(rows_of(cand, qinv), 0, 1).reshape(t, rounds * b)
  qstart = jnp.take_along_axis(jnp.repeat(start, bq, axis=1)[:, :t], qinv, axis=1)  # [R, T]
  krank = jnp.argsort(korder, axis=-1)  # [R, S]
  return sc, cand, krank, qstart


def _repeats(cand, krank, qstart, b: int) -> jax.Array:
  """`[T, R * b]` True where a candidate was already scored in an earlier round.

  A key scored in several rounds is kept once (in its first round): key j of
  round r repeats round r' < r iff its rank in round r' lies in the query's
  window there.
  """
  dup = jnp.zeros(cand.shape, bool)
  for r in range(1, krank.shape[0]):
    cr = cand[:, r * b : (r + 1) * b]
    rep = jnp.zeros(cr.shape, bool)
    for r0 in range(r):
      off = krank[r0][cr] - qstart[r0][:, None]
      rep = rep | ((off >= 0) & (off < b))
    dup = dup.at[:, r * b : (r + 1) * b].set(rep)
  return dup


def _diagonal(q, kmat, dstart, hd: _Head):
  """`(logits [T, b], key positions [T, b])` of each query's diagonal block."""
  t, h = q.shape
  b = hd.b
  nkb = -(-kmat.shape[0] // b)
  kd = pad_axis(kmat, 0, nkb * b, 0).reshape(nkb, b, h)
  qd = pad_axis(q, 0, -(-t // b) * b, 0).reshape(-1, b, h)
  kblk = jnp.minimum(jnp.arange(qd.shape[0]), nkb - 1)
  dsc = jnp.einsum(
    "qih,qjh->qij", qd, kd[kblk], precision=hd.precision, preferred_element_type=hd.dtype
  )
  return dsc.astype(hd.dtype).reshape(-1, b)[:t] * hd.scale, dstart[:, None] + jnp.arange(b)


def _candidates(q, kmat, proj, hd: _Head):
  """`(sc [T, C] logits, cand [T, C] key positions, dup [T, C], _Windows)` of one head:
  the windows of every round, then (with `diagonal`) the diagonal block first."""
  t, s, b = q.shape[0], kmat.shape[0], hd.b
  sc, cand, krank, qstart = _sorted_windows(q, kmat, proj, hd)
  dstart = (jnp.minimum(jnp.arange(t), s - 1) // b) * b  # diagonal block of each query
  dup = _repeats(cand, krank, qstart, b)
  if hd.cfg.diagonal:
    dup = dup | ((cand >= dstart[:, None]) & (cand < dstart[:, None] + b))
    dsc, didx = _diagonal(q, kmat, dstart, hd)
    sc = jnp.concatenate([dsc, sc], axis=1)
    cand = jnp.concatenate([didx, cand], axis=1)
    dup = jnp.concatenate([jnp.zeros((t, b), bool), dup], axis=1)
  return sc, cand, dup, _Windows(krank, qstart, dstart)


def _lsh_head(q, kmat, mask, bias, adm, proj, sample_key, *, k, scale, is_causal, cfg, precision):
  """LSH top-k of one head: `(idx [T, k], next_logit [T], num_keys [T], log_rest [T])`.

  `adm`: this batch element's index-range masks (`gsparse._admissible`)."""
  t, s = q.shape[0], kmat.shape[0]
  dtype = compute_dtype(q.dtype, kmat.dtype)
  hd = _Head(cfg, min(cfg.block_size, s), jnp.asarray(scale, dtype), dtype, is_causal, precision)
  neg = jnp.asarray(-jnp.inf, dtype)
  sc, cand, dup, windows = _candidates(q, kmat, proj, hd)
  # Admissibility of every candidate.
  rows = jnp.arange(t)
  ok = (cand < s) & ~dup
  safe = jnp.clip(cand, 0, s - 1)
  if is_causal:
    ok = ok & (cand <= rows[:, None])
  if mask is not None:
    ok = ok & _at(mask, rows[:, None], safe)
  ok = and_masks(ok, admits(adm, rows[:, None], safe))
  if bias is not None:
    sc = sc + _at(bias, rows[:, None], safe).astype(dtype)
  sc = jnp.where(ok, sc, neg)
  kk = min(k + 1, sc.shape[1])
  vals, p = _top_k(sc, kk)
  idx, nxt = finish_top_k(vals, jnp.take_along_axis(cand, p, axis=-1), k)
  if kk <= k:
    nxt = jnp.full_like(nxt, neg)
  num, cap = _lsh_unscored_cap(q, kmat, mask, bias, adm, scale=hd.scale, is_causal=is_causal)
  nxt = jnp.maximum(nxt, cap)
  log_rest = jnp.full((t,), neg)
  if cfg.normalizer_samples > 0:
    log_dropped = _log_dropped(sc, vals[:, : min(k, kk)], dtype)
    log_sampled = _log_unscored(q, kmat, mask, bias, adm, windows, sample_key, hd)
    log_rest = jnp.logaddexp(log_dropped, log_sampled)
  return idx, nxt, num, log_rest


def _lsh_unscored_cap(q, kmat, mask, bias, adm, *, scale, is_causal, chunk: int = 256):
  """`(num [T] admissible keys per row, cap [T])`: `cap` bounds every admissible logit.

  Cauchy-Schwarz, `|scale q.k| <= |scale| ||q|| max_j ||k_j||`, valid for
  either sign of the scale (loose but certified), plus the largest admissible
  bias of the row. A NaN key that the row may attend to makes its cap NaN
  (the row's attention is then NaN, as dense); a NaN key the row cannot
  attend to is ignored. The admissibility is evaluated in chunks of `chunk`
  rows: O(chunk * S) memory besides `mask`/`bias` themselves.
  """
  t, s = q.shape[0], kmat.shape[0]
  dtype = scale.dtype
  knorm = jnp.sqrt(jnp.sum(kmat.astype(dtype) ** 2, -1))  # [S], NaN for a NaN key
  key_nan = jnp.isnan(knorm)
  kn = jnp.max(jnp.where(key_nan, 0.0, knorm))
  qn = jnp.sqrt(jnp.sum(q.astype(dtype) ** 2, -1))
  cap = jnp.abs(scale) * qn * kn * (1 + 1e-5) + 1e-30
  c = min(chunk, t)
  nc = -(-t // c)
  xs = (
    jnp.arange(nc) * c,
    row_chunks(mask, t, nc * c, c, False),
    row_chunks(bias, t, nc * c, c, 0),
  )

  def body(x):
    row0, mc, bc = x
    adm_c = chunk_mask(mc, adm, row0, c, s)  # [c or 1, S] or None
    if is_causal:
      causal = jnp.arange(s)[None, :] <= (row0 + jnp.arange(c))[:, None]
      adm_c = and_masks(adm_c, causal)
    if adm_c is None:
      num = jnp.full((c,), s, jnp.int32)
      reach_nan = jnp.broadcast_to(jnp.any(key_nan), (c,))
    else:
      adm_c = jnp.broadcast_to(adm_c, (c, s))
      num = jnp.sum(adm_c, -1, dtype=jnp.int32)
      reach_nan = jnp.any(adm_c & key_nan[None, :], axis=-1)
    if bc is None:
      return num, reach_nan, jnp.zeros((c,), dtype)
    bfull = jnp.broadcast_to(bc, (c, s)).astype(dtype)
    return (
      num,
      reach_nan,
      jnp.max(bfull if adm_c is None else jnp.where(adm_c, bfull, -jnp.inf), -1),
    )

  num, reach_nan, bmax = (o.reshape(nc * c)[:t] for o in jax.lax.map(body, xs))
  return num, jnp.where(reach_nan, jnp.nan, cap + bmax)


def _at(x: jax.Array, rows: jax.Array, cols: jax.Array) -> jax.Array:
  """`x[rows, cols]` for a `[T', S']` array whose size-1 axes broadcast."""
  r = rows if x.shape[0] > 1 else jnp.zeros_like(rows)
  c = cols if x.shape[1] > 1 else jnp.zeros_like(cols)
  return x[r, c]


def _log_dropped(sc: jax.Array, kept: jax.Array, dtype) -> jax.Array:
  """`[T]` log of the mass of the scored candidates `sc` not among the `kept` logits."""
  neg = jnp.asarray(-jnp.inf, dtype)
  lse_all = jax.nn.logsumexp(sc, axis=-1)
  lse_kept = jax.nn.logsumexp(kept, axis=-1)
  has = jnp.isfinite(lse_all) & (lse_all > lse_kept)
  diff = jnp.where(has, lse_all, 0.0) + jnp.log1p(
    -jnp.exp(jnp.minimum(jnp.where(has, lse_kept - lse_all, -1.0), -1e-7))
  )
  return jnp.where(has, diff, neg)


def _log_unscored(q, kmat, mask, bias, adm, windows: _Windows, sample_key, hd: _Head) -> jax.Array:
  """`[T]` unbiased log-mass estimate of the keys never scored.

  Uniform samples with replacement, shared by the queries of the head;
  sampled keys that were scored (in a round's window or the diagonal block)
  count zero.
  """
  t, s, b, dtype = q.shape[0], kmat.shape[0], hd.b, hd.dtype
  m = hd.cfg.normalizer_samples
  j = jax.random.randint(sample_key, (m,), 0, s)
  lj = jnp.einsum("th,mh->tm", q, kmat[j], precision=hd.precision, preferred_element_type=dtype)
  lj = lj.astype(dtype) * hd.scale
  rows = jnp.arange(t)[:, None]
  ok = jnp.ones((t, m), bool)
  if hd.is_causal:
    ok = ok & (j[None, :] <= rows)
  if mask is not None:
    ok = ok & _at(mask, rows, j[None, :])
  ok = and_masks(ok, admits(adm, rows, j[None, :]))
  if bias is not None:
    lj = lj + _at(bias, rows, j[None, :]).astype(dtype)
  srank = windows.krank[:, j]  # [R, m] rank of each sample per round
  qstart = windows.qstart[:, :, None]
  scored = jnp.any((srank[:, None, :] >= qstart) & (srank[:, None, :] < qstart + b), axis=0)
  if hd.cfg.diagonal:
    dstart = windows.dstart[:, None]
    scored = scored | ((j[None, :] >= dstart) & (j[None, :] < dstart + b))
  lj = jnp.where(ok & ~scored, lj, jnp.asarray(-jnp.inf, dtype))
  return jax.nn.logsumexp(lj, axis=-1) + jnp.log(jnp.asarray(s / m, dtype))
