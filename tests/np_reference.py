"""Independent float64 NumPy references for the tests (no gsparse code used)."""

from __future__ import annotations

import numpy as np


def logits(q, k, *, scale=None, bias=None, mask=None, is_causal=False):
  """q [..., T, N, H], k [..., S, K, H] -> (logits [..., N, T, S], valid)."""
  q = np.asarray(q, np.float64)
  k = np.asarray(k, np.float64)
  t, n, h = q.shape[-3:]
  s, kh = k.shape[-3], k.shape[-2]
  g = n // kh
  k_rep = np.repeat(k, g, axis=-2)  # [..., S, N, H]
  scale = 1.0 / np.sqrt(h) if scale is None else scale
  lg = np.einsum("...tnh,...snh->...nts", q, k_rep) * scale
  if bias is not None:
    lg = lg + np.asarray(bias, np.float64)
  valid = np.ones(lg.shape, bool)
  if mask is not None:
    valid = valid & np.broadcast_to(np.asarray(mask), lg.shape)
  if is_causal:
    valid = valid & (np.arange(s)[None, :] <= np.arange(t)[:, None])
  return lg, valid


def softmax_rows(lg, valid):
  out = np.zeros_like(lg)
  it = np.ndindex(*lg.shape[:-1])
  for idx in it:
    row, ok = lg[idx], valid[idx]
    if not ok.any():
      continue
    m = row[ok].max()
    e = np.where(ok, np.exp(np.where(ok, row - m, 0.0)), 0.0)
    out[idx] = e / e.sum()
  return out


def apply(p, v):
  """p [..., N, T, S], v [..., S, K, Hv] -> [..., T, N, Hv]."""
  v = np.asarray(v, np.float64)
  n, kh = p.shape[-3], v.shape[-2]
  v_rep = np.repeat(v, n // kh, axis=-2)
  return np.einsum("...nts,...snv->...tnv", p, v_rep)


def attention(q, k, v, **kw):
  lg, valid = logits(q, k, **kw)
  return apply(softmax_rows(lg, valid), v)


def topk_weights(lg, valid, k):
  """Keeps the k largest admissible logits per row (ties -> lower index)."""
  keep = np.zeros(lg.shape, bool)
  for idx in np.ndindex(*lg.shape[:-1]):
    row, ok = lg[idx], valid[idx]
    cand = np.flatnonzero(ok)
    order = cand[np.argsort(-row[cand], kind="stable")]
    keep[idx][order[:k]] = True
  return softmax_rows(lg, keep), keep


def topk_attention(q, k, v, *, topk, **kw):
  lg, valid = logits(q, k, **kw)
  p, _ = topk_weights(lg, valid, topk)
  return apply(p, v)
