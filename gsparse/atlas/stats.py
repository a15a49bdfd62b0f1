"""Per-row statistics of exact softmax attention, computed chunk by chunk over queries.

`row_statistics` reduces each attention row of one layer call to a few
numbers (effective support, admissible keys, logit spread, the k needed for
a tail mass at most `tol`, and the k `CertifiedK` would keep), so that the
`[batch, N, T, S]` weights never exist at once: queries are processed in
chunks of `chunk` rows under `lax.map`, each chunk holding `[batch, N, chunk, S]`.
"""

from __future__ import annotations

import functools
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
from jax.typing import ArrayLike

from gsparse.attention import compute_logits, masked_softmax
from gsparse.certificate import tail_mass_certificate
from gsparse.flax.attention import certified_num_keys
from gsparse.sparsity import effective_support


class RowStats(NamedTuple):
  """Statistics of every attention row of one layer call (NumPy or jax arrays).

  Attributes:
    effective_support: `[B, N, T]` `1 / sum_j p_j^2` (0 for a fully masked row).
    num_keys: `[B, N, T]` admissible keys `m` of the row.
    tau: `[B, N, T]` standard deviation of the row's logits over its
      admissible keys (the Gaussian picture's per-row logit scale).
    needed_k: `[len(tolerances), B, N, T]` smallest k whose exact top-k tail
      mass is at most the tolerance (0 for a fully masked row).
    certified_k: `[len(tolerances), B, N, T]` the k that
      `CertifiedK(ks=candidates, tol)` keeps for the row with an exact top-k
      selection (per-query granularity).
  """

  effective_support: ArrayLike
  num_keys: ArrayLike
  tau: ArrayLike
  needed_k: ArrayLike
  certified_k: ArrayLike


def needed_k(p_sorted: jax.Array, tol: float) -> jax.Array:
  """Smallest k with tail mass `sum_{j >= k} p_(j)` at most `tol`.

  Args:
    p_sorted: `[..., S]` probability rows sorted in decreasing order.
    tol: tail-mass tolerance.

  Returns:
    `[...]` int32; the tails are summed from the small end, so a tail of
    1e-9 is not lost to the cancellation of `1 - head`.
  """
  tails = jnp.flip(jnp.cumsum(jnp.flip(p_sorted, -1), axis=-1), -1)  # tails[k] = sum_{j>=k}
  return jnp.sum(tails > tol, axis=-1, dtype=jnp.int32)


def _certified(p_sorted, m, candidates, tol):
  """`CertifiedK`'s choice for exact top-K rows (K = largest candidate)."""
  big_k = candidates[-1]
  head = p_sorted[..., :big_k]
  head_mass = jnp.sum(head, axis=-1)
  s = p_sorted.shape[-1]
  nxt = p_sorted[..., big_k] if big_k < s else jnp.zeros_like(head_mass)
  # The certificate is shift-invariant in log space: probabilities stand in for exp(logits).
  t_max = tail_mass_certificate(
    jnp.log(jnp.where(head_mass > 0, head_mass, 1.0)),
    jnp.where(nxt > 0, jnp.log(jnp.where(nxt > 0, nxt, 1.0)), -jnp.inf),
    m,
    big_k,
  )
  k, _ = certified_num_keys(head, t_max, candidates, tol, in_slot_order=True)
  return jnp.where(m > 0, k, 0)


def _chunk_stats(q, k, bias, mask, offset, *, scale, is_causal, tolerances, candidates):
  c, s = q.shape[1], k.shape[1]
  if is_causal:
    causal = jnp.arange(s)[None, :] <= (offset + jnp.arange(c))[:, None]
    mask = causal if mask is None else jnp.logical_and(mask, causal)
  lg = compute_logits(q, k, bias, mask, scale=scale)
  logits, valid = lg.logits, lg.valid
  if valid is None:
    valid = jnp.ones(logits.shape, bool)
  p = masked_softmax(logits, valid)
  m = jnp.sum(valid, axis=-1, dtype=jnp.int32)
  mf = jnp.maximum(m, 1).astype(logits.dtype)
  mean = jnp.sum(jnp.where(valid, logits, 0.0), axis=-1) / mf
  var = jnp.sum(jnp.where(valid, (logits - mean[..., None]) ** 2, 0.0), axis=-1) / mf
  p_sorted = -jnp.sort(-p, axis=-1)
  needed = jnp.stack([needed_k(p_sorted, t) for t in tolerances])
  cert = jnp.stack([_certified(p_sorted, m, candidates, t) for t in tolerances])
  return RowStats(effective_support(p), m, jnp.sqrt(var), needed, cert)


def _pad_rows(x, axis, size):
  pad = [(0, 0)] * x.ndim
  pad[axis] = (0, size - x.shape[axis])
  return jnp.pad(x, pad)


def _chunked(x, axis, chunk, num):
  """`x` padded along `axis` to `num * chunk` rows and split: chunks lead."""
  x = _pad_rows(x, axis, num * chunk)
  x = x.reshape(x.shape[:axis] + (num, chunk) + x.shape[axis + 1 :])
  return jnp.moveaxis(x, axis, 0)


def _as_4d(x, batch, t, s):
  """Mask or bias broadcast to `[B, N or 1, T, S]` (the head axis kept at 1 if it is 1)."""
  if x is None:
    return None
  x = jnp.asarray(x)
  x = x.reshape((1,) * max(0, 4 - x.ndim) + x.shape) if x.ndim <= 4 else x
  x = x.reshape((-1,) + x.shape[-3:]) if x.ndim > 4 else x
  return jnp.broadcast_to(x, (batch, x.shape[1], t, s))


@functools.partial(
  jax.jit, static_argnames=("scale", "is_causal", "tolerances", "candidates", "chunk")
)
def row_statistics(
  query: ArrayLike,
  key: ArrayLike,
  bias: ArrayLike | None = None,
  mask: ArrayLike | None = None,
  *,
  tolerances: tuple[float, ...],
  candidates: tuple[int, ...],
  scale: float | None = None,
  is_causal: bool = False,
  chunk: int = 128,
) -> RowStats:
  """Per-row statistics of `softmax(scale q k^T + bias)`, `chunk` queries at a time.

  Args:
    query: `[batch..., T, N, H]`.
    key: `[batch..., S, K, H]`.
    bias: optional, broadcastable to `[batch..., N, T, S]`.
    mask: optional boolean, broadcastable to `[batch..., N, T, S]`.
    tolerances: tail-mass tolerances, each in (0, 1).
    candidates: sorted candidate k of `CertifiedK`, already clipped to `S`.
    scale: logit scale; default `1 / sqrt(H)`.
    is_causal: add a top-left aligned causal mask.
    chunk: query rows per chunk (memory: `[batch, N, chunk, S]` floats).

  Returns:
    `RowStats` with the batch dimensions flattened into one, `B`.
  """
  query, key = jnp.asarray(query), jnp.asarray(key)
  *batch, t, n, h = query.shape
  s = key.shape[-3]
  bsz = int(np.prod(batch, dtype=np.int64)) if batch else 1
  query = query.reshape(bsz, t, n, h)
  key = key.reshape(bsz, s, *key.shape[-2:])
  mask = _as_4d(None if mask is None else jnp.asarray(mask).astype(bool), bsz, t, s)
  bias = _as_4d(bias, bsz, t, s)
  chunk = min(chunk, t)
  num = -(-t // chunk)
  xs = (
    _chunked(query, 1, chunk, num),
    None if bias is None else _chunked(bias, 2, chunk, num),
    None if mask is None else _chunked(mask, 2, chunk, num),
    jnp.arange(num) * chunk,
  )
  stats = functools.partial(
    _chunk_stats, scale=scale, is_causal=is_causal, tolerances=tolerances, candidates=candidates
  )
  out = jax.lax.map(lambda a: stats(a[0], key, a[1], a[2], a[3]), xs)

  def unchunk(x):  # [num, ..., B, N, chunk] -> [..., B, N, T]
    x = jnp.moveaxis(x, 0, -2)
    return x.reshape(x.shape[:-2] + (num * chunk,))[..., :t]

  return jax.tree_util.tree_map(unchunk, out)
