"""Independent float64 NumPy references for the tests (no gsparse code used)."""

from __future__ import annotations

from typing import NamedTuple

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


# ----------------------------------------------------------------------------
# Top-k attention with gsparse's semantics for non-finite input, written out
# row by row in float64. The semantics (docs/errors.md):
#   * a key is admissible where mask, causality and `bias != -inf` allow it
#     (a -inf bias is exactly mask=False, whatever q.k is there);
#   * an admissible key is "live" unless its logit is -inf (zero weight, never
#     listed); NaN logits are live and rank first, then larger logits, ties to
#     the lower index;
#   * a row is NaN (output, log-sum-exp, certificate) when a live logit is
#     NaN, or a kept logit is +inf; otherwise it is the softmax over the kept
#     live keys, and it reads only the kept value rows.


class TopKReference(NamedTuple):
  """float64 results of `topk_reference`, in gsparse's layouts."""

  output: np.ndarray  # [..., T, N, Hv]
  logsumexp: np.ndarray  # [..., T, N] over the kept keys
  kept: np.ndarray  # [..., N, T, S] bool
  tail: np.ndarray  # [..., T, N] true softmax mass of the live keys not kept
  dense: np.ndarray  # [..., T, N, Hv] softmax over every live key
  nan_row: np.ndarray  # [..., T, N] bool


def admissible_logits(q, k, *, scale=None, bias=None, mask=None, is_causal=False):
  """`(logits, live, admissible)`, all `[..., N, T, S]`, with the -inf bias folded."""
  lg, valid = logits(q, k, scale=scale, mask=mask, is_causal=is_causal)
  if bias is not None:
    b = np.broadcast_to(np.asarray(bias, np.float64), lg.shape)
    valid = valid & (b != -np.inf)
    lg = lg + np.where(b == -np.inf, 0.0, b)
  live = valid & (lg != -np.inf)
  return np.where(valid, lg, -np.inf), live, valid


def topk_keep(lg, live, topk):
  """The kept set of the exact top-k: NaN first, then by logit, ties to the lower index."""
  keep = np.zeros(lg.shape, bool)
  for idx in np.ndindex(*lg.shape[:-1]):
    row, cand = lg[idx], np.flatnonzero(live[idx])
    rank = np.where(np.isnan(row[cand]), np.inf, row[cand])
    nan_first = ~np.isnan(row[cand])
    order = cand[np.lexsort((cand, -rank, nan_first))]
    keep[idx][order[:topk]] = True
  return keep


def _row_softmax(row, on):
  """Weights over `on` (zeros elsewhere) and the log-sum-exp; `-inf` when `on` is empty."""
  w = np.zeros_like(row)
  if not on.any():
    return w, -np.inf
  m = row[on].max()
  e = np.exp(row[on] - m)
  w[on] = e / e.sum()
  return w, m + np.log(e.sum())


def _read(w, on, vrow):
  """`sum_{j in on} w_j v_j`, reading only the rows in `on` (so 0 * NaN elsewhere is not read)."""
  return (w[on, None] * vrow[on]).sum(axis=0) if on.any() else np.zeros(vrow.shape[-1])


def topk_reference(q, k, v, *, topk=None, kept=None, **kw) -> TopKReference:
  """Top-k attention (or attention over a given kept set `[..., N, T, S]`) in float64.

  `topk` selects the exact top-k; `kept` takes an approximate selection's
  kept set (only its live keys count). Keyword arguments as `logits`.
  """
  lg, live, _ = admissible_logits(q, k, **kw)
  keep = topk_keep(lg, live, topk) if kept is None else (np.asarray(kept, bool) & live)
  v = np.asarray(v, np.float64)
  n, kh = lg.shape[-3], v.shape[-2]
  vr = np.moveaxis(np.repeat(v, n // kh, axis=-2), -2, -3)  # [..., N, S, Hv]
  out = np.zeros((*lg.shape[:-1], v.shape[-1]))
  dense = np.zeros_like(out)
  lse = np.full(lg.shape[:-1], -np.inf)
  tail = np.zeros(lg.shape[:-1])
  nan_row = np.zeros(lg.shape[:-1], bool)
  for idx in np.ndindex(*lg.shape[:-1]):
    row, on, kp = lg[idx], live[idx], keep[idx]
    vrow = vr[idx[:-2] + (idx[-2],)]
    if np.isnan(row[on]).any() or np.isposinf(row[kp]).any():
      out[idx] = dense[idx] = np.nan
      lse[idx] = tail[idx] = np.nan
      nan_row[idx] = True
      continue
    w, lse[idx] = _row_softmax(row, kp)
    out[idx] = _read(w, kp, vrow)
    wd, lse_all = _row_softmax(row, on)
    dense[idx] = _read(wd, on, vrow) if not np.isposinf(row[on]).any() else np.nan
    tail[idx] = wd[on & ~kp].sum() if np.isfinite(lse_all) else (np.nan if on.any() else 0.0)
  swap = lambda x: np.swapaxes(x, -2, -3) if x.ndim == lg.ndim else np.swapaxes(x, -1, -2)
  return TopKReference(
    swap(out),
    np.swapaxes(lse, -1, -2),
    keep,
    np.swapaxes(tail, -1, -2),
    swap(dense),
    np.swapaxes(nan_row, -1, -2),
  )


def topk_grads(q, k, v, cot, *, kept, scale, bias=None, mask=None, is_causal=False):
  """Gradients of `sum(cot * out)` with respect to q, k, v for a fixed kept set, float64.

  Written out from the softmax Jacobian: with weights p over the kept keys,
  dv_j += p_j g, ds_j = p_j (g.v_j - sum_i p_i g.v_i), dq += scale ds_j k_j,
  dk_j += scale ds_j q. Keys outside the kept set (masked, -inf bias, not
  selected) get nothing; rows with nothing kept give zeros.
  """
  q, k, v, cot = (np.asarray(x, np.float64) for x in (q, k, v, cot))
  lg, live, _ = admissible_logits(q, k, scale=scale, bias=bias, mask=mask, is_causal=is_causal)
  keep = np.asarray(kept, bool) & live
  dq, dk, dv = np.zeros_like(q), np.zeros_like(k), np.zeros_like(v)
  n, kh = q.shape[-2], k.shape[-2]
  g_ = n // kh
  for idx in np.ndindex(*lg.shape[:-1]):
    *b, hn, t = idx
    b = tuple(b)
    on = keep[idx]
    if not on.any():
      continue
    w, _ = _row_softmax(lg[idx], on)
    g = cot[b + (t, hn)]
    kv = hn // g_
    dp = v[b + (slice(None), kv)] @ g  # [S]
    ds = np.where(on, w * (dp - (w * dp).sum()), 0.0)
    dv[b + (slice(None), kv)] += np.outer(np.where(on, w, 0.0), g)
    dq[b + (t, hn)] += scale * ds[on] @ k[b + (slice(None), kv)][on]  # reads kept keys only
    dk[b + (slice(None), kv)] += scale * np.outer(ds, q[b + (t, hn)])
  return dq, dk, dv


def kept_from_indices(indices, s):
  """`[..., T, N, k]` indices (-1 = none) -> `[..., N, T, S]` boolean kept set."""
  idx = np.asarray(indices)
  kept = np.zeros((*idx.shape[:-1], s), bool)
  for pos in np.ndindex(*idx.shape[:-1]):
    row = idx[pos][idx[pos] >= 0]
    assert len(set(row.tolist())) == len(row), f"repeated index in {idx[pos]}"
    kept[pos][row] = True
  return np.swapaxes(kept, -2, -3)


def check_topk_route(out, stats, q, k, v, *, topk, exact, logit_tol=0.0, out_tol=2e-6, **kw):
  """Checks a `topk_attention(..., return_stats=True)` result against this reference.

  `exact`: the route claims the exact top-k (then its kept set must be a
  top-k of the reference logits up to `logit_tol`, and hold min(k, live)
  keys); otherwise any subset of the live keys is allowed, and the output and
  certificate are checked for that subset. Returns the kept set and the
  reference. `out_tol` is the absolute tolerance per unit of max |value|.
  """
  lg, live, adm = admissible_logits(q, k, **kw)
  s = lg.shape[-1]
  kept = kept_from_indices(stats.indices, s)
  assert not (kept & ~live).any(), "listed a masked, -inf-bias or -inf-logit key"
  if exact:
    for idx in np.ndindex(*lg.shape[:-1]):
      row, on, kp = lg[idx], live[idx], kept[idx]
      assert kp.sum() == min(topk, on.sum()), (idx, kp, on)
      if np.isnan(row[on]).any():
        continue  # NaN ranks first: checked through the NaN pattern below
      dropped = on & ~kp
      if dropped.any() and kp.any():
        assert row[kp].min() >= row[dropped].max() - logit_tol, (idx, row, kp)
  r = topk_reference(q, k, v, kept=kept, **kw)
  out = np.asarray(out, np.float64)
  av = np.abs(np.asarray(v, np.float64))
  vmax = max(1.0, float(np.max(av[np.isfinite(av)], initial=0.0)))
  np.testing.assert_array_equal(np.isnan(out), np.isnan(r.output))
  np.testing.assert_array_equal(np.isposinf(out), np.isposinf(r.output))
  np.testing.assert_allclose(out, r.output, rtol=0, atol=out_tol * vmax)
  tail = np.asarray(stats.tail_mass_bound, np.float64)
  lse = np.asarray(stats.logsumexp, np.float64)
  err = np.asarray(stats.error_bound, np.float64)
  np.testing.assert_array_equal(np.isnan(tail), r.nan_row)
  assert not np.isfinite(lse[r.nan_row]).any(), "a NaN row has a finite logsumexp"
  assert np.isnan(err[r.nan_row]).all(), "a NaN row has a non-NaN error bound"
  ok = ~r.nan_row & np.isfinite(r.logsumexp)
  np.testing.assert_allclose(lse[ok], r.logsumexp[ok], rtol=0, atol=1e-5 + logit_tol)
  ok = ~r.nan_row & np.isfinite(r.tail)
  assert (tail[ok] >= r.tail[ok] - 1e-5 - 2 * logit_tol).all(), "tail bound violated"
  # Error bound per row: NaN where the row may attend a non-finite value row
  # (its dense output is not finite), finite elsewhere (Lemma C5, docs/theory.md).
  vbad = ~np.isfinite(np.asarray(v, np.float64)).all(axis=-1)  # [..., S, K]
  vbad = np.swapaxes(np.repeat(vbad, lg.shape[-3] // vbad.shape[-1], axis=-1), -1, -2)
  reach = np.swapaxes((adm & vbad[..., None, :]).any(axis=-1), -1, -2)  # [..., T, N]
  assert np.isnan(err[reach]).all(), "a row that may attend a non-finite value has a bound"
  defined = ~reach & ~r.nan_row & np.isfinite(r.output).all(axis=-1)
  assert np.isfinite(err[defined]).all(), "a row with finite values only has a NaN bound"
  dist = np.linalg.norm(r.dense - r.output, axis=-1)
  ok = ~r.nan_row & np.isfinite(dist) & np.isfinite(err)
  assert (err[ok] >= dist[ok] - out_tol * vmax * 4).all(), "error bound violated"
  return kept, r
