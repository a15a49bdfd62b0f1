"""Plumbing shared by the selections: the result type, per-head mapping, row
chunks, chunk logits, padding and the bias gather."""

from __future__ import annotations

import math
from typing import NamedTuple

import jax
import jax.numpy as jnp
from jax.typing import ArrayLike

from gsparse._admissible import admits, and_masks
from gsparse._layout import pad_axis  # noqa: F401  (re-exported to the selection modules)


class SelectionResult(NamedTuple):
  """The keys a selection kept per query, in the `[batch..., T, N, *]` layout.

  Every selection ("full" included) returns one; `topk_attention` attends over
  `indices` and certifies with `next_logit` and `num_keys`.

  Attributes:
    indices: `[batch..., T, N, k]` int32 key positions, -1 = none.
    next_logit: `[batch..., T, N]` an upper bound on every admissible logit
      not selected (exact: the (k+1)-th largest logit); `-inf` if none.
    num_keys: `[batch..., T, N]` int32 number of admissible keys of the row.
    log_rest: `[batch..., T, N]` log of the extra normaliser mass (LSH with
      `normalizer_samples > 0`), else None.
    row_logsumexp: `[batch..., T, N]` log-sum-exp of every admissible logit
      of the row (`-inf` for a row with none, NaN if one is NaN), from the
      exact selections ("full", "exact") when asked for (`row_logsumexp=True`),
      else None. With the log-sum-exp over the kept keys it gives the exact
      tail mass (`gsparse.topk.exact_tail_mass`).
    kept_logits: `[batch..., T, N, k]` the logits of the kept slots (scale
      and bias applied, `-inf` on slots with index -1), from the exact
      selections when asked for (`kept_logits=True`), else None. The values
      the selection ranked (its own matmul), without gradient: a statistic,
      so that a caller (`gsparse.flax.sparse_attention` with `CertifiedK`)
      gets the kept weights without a gather pass of its own.
    band_counts: `[batch..., T, N, B + 1]` int32 counts of the dropped
      logits in bands below `next_logit` (`gsparse.selection._bands`), from
      the chunked exact selection and "full" when asked for
      (`band_counts=True`, as `topk_attention(..., return_stats=True)` does),
      else None: the band-count certificate (Proposition C4 in
      docs/theory.md), far tighter than the single gap in collapsed rows.
  """

  indices: jax.Array
  next_logit: jax.Array
  num_keys: jax.Array
  log_rest: jax.Array | None = None
  row_logsumexp: jax.Array | None = None
  kept_logits: jax.Array | None = None
  band_counts: jax.Array | None = None


def row_logsumexp(logits: jax.Array) -> jax.Array:
  """Log-sum-exp over the last axis of logits with inadmissible keys at `-inf`.

  A statistic, never differentiated (`stop_gradient`): the backward of top-k
  attention must not touch the full logit row.
  """
  return jax.lax.stop_gradient(jax.nn.logsumexp(logits, axis=-1))


def kept_values(vals: jax.Array, idx: jax.Array) -> jax.Array:
  """The kept slots' logits from a top-k's values: `[..., kk]` values and the
  finished `[..., k]` indices (`gsparse._numerics.finish_top_k`) -> `[..., k]`.

  Slots past `kk` (a row shorter than k) and slots with index -1 get `-inf`;
  no gradient (a statistic, as `row_logsumexp`).
  """
  k = idx.shape[-1]
  vals = pad_axis(vals[..., :k], vals.ndim - 1, k, -jnp.inf)
  return jax.lax.stop_gradient(jnp.where(idx >= 0, vals, -jnp.inf))


def expand(x: jax.Array | None, batch: tuple[int, ...], n: int, t: int, s: int):
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


def map_heads(fn, query, key, mask, bias, extra=(), value=None, adm=None):
  """Runs `fn(q [T,H], k [S,H], mask [T',S'], bias [T',S'], adm, *extra)` per batch and head.

  With `value`, the second argument is `(k [S,H], v [S,Hv])`. `adm` is a
  `gsparse._admissible.Admissible` (or None), mapped over the batch only, so
  `fn` sees one batch element of it. `fn` returns a tuple of `[T, ...]`
  arrays; the result is in `[*batch, T, N, ...]`.
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
    x = expand(x, tuple(batch), n, t, s)
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
  rest = [None] * len(extra)
  f = jax.vmap(f, in_axes=(0, None, max_[2], bax[2], None, *rest))
  f = jax.vmap(f, in_axes=(0, 0, max_[1], bax[1], None, *rest))
  f = jax.vmap(f, in_axes=(0, 0, max_[0], bax[0], None if adm is None else 0, *rest))
  outs = f(q, kk, m5, b5, adm, *extra)

  def back(o):  # [B, K, G, T, ...] -> [*batch, T, N, ...]
    o = o.reshape(nb, n, *o.shape[3:])
    return jnp.moveaxis(o, 1, 2).reshape(*batch, t, n, *o.shape[3:])

  return tuple(back(o) for o in outs)


def row_chunks(x: jax.Array | None, t: int, tp: int, c: int, fill):
  """`[T', S']` -> `[nc, c or 1, S']` chunks along T (broadcast rows stay size 1)."""
  if x is None:
    return None
  nc = tp // c
  if x.shape[0] == 1:
    return jnp.broadcast_to(x[None], (nc, 1, x.shape[1]))
  return pad_axis(x, 0, tp, fill).reshape(nc, c, x.shape[1])


def rows_logits(qc, kmat, bc, mc, row0, *, s, sp, scale, is_causal, dtype, precision, adm=None):
  """Logits of a query chunk against all (padded) keys, `-inf` where inadmissible
  (`adm`: one batch element of a `gsparse._admissible.Admissible`, or None)."""
  c = qc.shape[0]
  mc = chunk_mask(mc, adm, row0, c, s)
  logits = jnp.einsum("th,sh->ts", qc, kmat, precision=precision, preferred_element_type=dtype)
  logits = logits.astype(dtype) * jnp.asarray(scale, dtype)
  if bc is not None:
    logits = logits + pad_axis(jnp.broadcast_to(bc, (c, s)).astype(dtype), 1, sp, 0.0)
  col = jnp.arange(sp)[None, :]
  valid = None
  if sp > s:
    valid = jnp.broadcast_to(col < s, (c, sp))
  if mc is not None:
    m = pad_axis(jnp.broadcast_to(mc, (c, s)), 1, sp, False)
    valid = m if valid is None else valid & m
  if is_causal:
    cm = col <= (row0 + jnp.arange(c))[:, None]
    valid = cm if valid is None else valid & cm
  if valid is None:
    return logits, jnp.full((c,), s, jnp.int32)
  neg = jnp.asarray(-jnp.inf, dtype)
  return jnp.where(valid, logits, neg), jnp.sum(valid, axis=-1, dtype=jnp.int32)


def chunk_mask(mc, adm, row0, c: int, s: int):
  """The `[c or 1, S]` chunk mask `mc` and'ed with the index-range masks of
  rows `row0 + [0, c)` (`gsparse._admissible.admits`): O(c * S), never T x S."""
  rows = (row0 + jnp.arange(c))[:, None]
  return and_masks(mc, admits(adm, rows, jnp.arange(s)[None, :]))


def auto_key_block(s: int, k: int) -> int:
  """Block size about `sqrt(S / (k + 1))`, a power of two in [1, 64]."""
  b = math.sqrt(s / (k + 1))
  return int(min(64, max(1, 2 ** round(math.log2(b))))) if b >= 1 else 1


def gather_bias(bias: ArrayLike | None, indices: jax.Array, key_len: int) -> jax.Array | None:
  """Bias at the selected keys without broadcasting it to `[batch..., N, T, S]`.

  The one bias gather of the package (`topk_attention` and the Flax
  `sparse_attention` both use it).

  Args:
    bias: None, or broadcastable to `[batch..., N, T, S]`.
    indices: `[batch..., T, N, k]` (-1 = none; those slots get 0).
    key_len: S.

  Returns:
    `[batch..., T, N, k]` bias values, or None when `bias` is None.
  """
  if bias is None:
    return None
  bias = jnp.asarray(bias)
  *batch, t, n, kk = indices.shape
  b4 = expand(bias, tuple(batch), n, t, key_len)  # [B', N', T', S']
  bsz = math.prod(batch)
  idx = jnp.moveaxis(indices.reshape(bsz, t, n, kk), 1, 2)  # [B, N, T, k]
  bi = jnp.arange(bsz)[:, None, None, None] if b4.shape[0] > 1 else 0
  ni = jnp.arange(n)[None, :, None, None] if b4.shape[1] > 1 else 0
  ti = jnp.arange(t)[None, None, :, None] if b4.shape[2] > 1 else 0
  si = jnp.clip(idx, 0, key_len - 1) if b4.shape[3] > 1 else 0
  out = jnp.broadcast_to(b4[bi, ni, ti, si], idx.shape)
  out = jnp.where(idx >= 0, out, 0)
  return jnp.moveaxis(out, 2, 1).reshape(*batch, t, n, kk)
