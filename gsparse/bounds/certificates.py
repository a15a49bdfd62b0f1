"""The multi-gap certificate: a tail-mass bound from a few more order statistics.

The single-gap certificate (`gsparse.certificate.tail_mass_certificate`)
bounds every dropped logit by the (k+1)-th, `s_{k+1}`, and so counts the
tail as `(m - k) e^{s_{k+1}}`. In a collapsed row the logits below
`s_{k+1}` are far smaller and that count is loose by orders of magnitude.
Carrying the logits at a few more ranks `r_0 = k + 1 < r_1 < ... < r_{B-1}`
splits the dropped keys into bands: every logit of band `b` (ranks
`r_b .. r_{b+1} - 1`, the last band running to `m`) is at most `s_{r_b}`, so

    T = sum_{j > k} e^{s_j} <= sum_b c_b e^{s_{r_b}},   c_b = #band b,

and `t = T / (H + T) <= T_up / (H + T_up)` (docs/theory.md, Proposition C2).
With the dyadic ranks `r_b = k + 2^b` reaching `m` the bound is within a
factor 2 of the true tail (Corollary C3). Counts of the dropped logits in
bands of width `w` below an upper bound `u` (one pass, no sort) give the same
kind of bound for ANY kept set, within `e^w` of the tail plus a remainder
(`band_count_tail_bound`, Proposition C4). Nothing is random: these can only
be violated by floating-point rounding.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
from jax.typing import ArrayLike

from gsparse import _checks


def dyadic_band_ranks(k: int, *, max_rank: int) -> np.ndarray:
  """The ranks `k + 1, k + 2, k + 4, ..., k + 2^b <= max_rank` (1-based), as int array.

  With `max_rank >= num_keys` the multi-gap certificate on these ranks is
  within a factor 2 of the true tail (docs/theory.md, Corollary C3); a
  selection that keeps only the top `max_rank` logits uses the ranks it has.

  Args:
    k: number of kept keys (>= 0).
    max_rank: largest rank available (>= k + 1).

  Returns:
    `[B]` strictly increasing int64 ranks, `B = 1 + floor(log2(max_rank - k))`.
  """
  k, max_rank = int(k), int(max_rank)
  if k < 0:
    raise ValueError(f"k={k} must be >= 0")
  if max_rank < k + 1:
    raise ValueError(f"max_rank={max_rank} must be >= k + 1 = {k + 1}")
  out = [k + 1]
  step = 2
  while k + step <= max_rank:
    out.append(k + step)
    step *= 2
  return np.asarray(out, np.int64)


def multi_gap_tail_bound(
  kept_lse: ArrayLike,
  band_logits: ArrayLike,
  num_keys: ArrayLike,
  *,
  k: ArrayLike,
  band_ranks: ArrayLike,
) -> jax.Array:
  """Upper bound on the softmax mass outside the top-k set from several order statistics.

  For a row with admissible logits `s_1 >= ... >= s_m` and kept set the top
  `k`, `band_logits[..., b] = s_{r_b}` at the 1-based ranks `r_b =
  band_ranks[b]` (`r_0 = k + 1`, strictly increasing). Band `b` holds the
  ranks `r_b .. r_{b+1} - 1` (the last one `r_{B-1} .. m`), `c_b` keys, each
  logit at most `s_{r_b}`; the result is `T_up / (e^{kept_lse} + T_up)` with
  `T_up = sum_b c_b e^{s_{r_b}}` (docs/theory.md, Proposition C2). Ranks beyond
  `m` give empty bands (their logits are ignored, e.g. `-inf` padding).

  Args:
    kept_lse: `[...]` log-sum-exp of the top-k logits.
    band_logits: `[..., B]` the logits at ranks `band_ranks` (non-increasing).
    num_keys: `[...]` number of admissible keys `m` of the row.
    k: number of kept keys, `[...]` or scalar (`r_0 = k + 1`).
    band_ranks: `[B]` or `[..., B]` 1-based ranks, strictly increasing.

  Returns:
    `[...]` bound in `[0, 1]`: 0 when nothing with weight is dropped, 1 when
    the kept set is empty (`kept_lse = -inf`) and something is dropped, NaN
    when `kept_lse` or a used band logit is NaN.
  """
  band_logits = _checks.check_float_array("band_logits", band_logits, min_ndim=1)
  ranks_c = _checks.concrete_or_none(band_ranks)
  k_c = _checks.concrete_or_none(k)
  if ranks_c is not None:
    if ranks_c.ndim < 1 or np.any(np.diff(ranks_c, axis=-1) <= 0):
      raise ValueError(f"band_ranks={ranks_c!r} must be a strictly increasing [..., B] array")
    if ranks_c.shape[-1] != band_logits.shape[-1]:
      raise ValueError(
        f"band_ranks has {ranks_c.shape[-1]} ranks but band_logits.shape={band_logits.shape}"
      )
    if k_c is not None and np.any(ranks_c[..., 0] != k_c + 1):
      raise ValueError(f"band_ranks[..., 0] must be k + 1; got {ranks_c[..., 0]!r} with k={k_c!r}")
  dtype = jnp.promote_types(band_logits.dtype, jnp.float32)
  a = band_logits.astype(dtype)
  lse_k = jnp.asarray(kept_lse, dtype)
  m = jnp.asarray(num_keys, dtype)[..., None]
  r = jnp.asarray(band_ranks, dtype)
  nxt = jnp.concatenate([r[..., 1:], jnp.full(r.shape[:-1] + (1,), jnp.inf, dtype)], axis=-1)
  count = jnp.clip(jnp.minimum(nxt, m + 1.0) - r, 0.0, None)  # keys of each band among the m
  bad = jnp.any(jnp.isnan(a) & (count > 0), axis=-1)
  return _bound_from_bands(lse_k, count, a, bad)


def _bound_from_bands(lse_k, count, level, bad):
  """`T_up / (e^{lse_k} + T_up)`, `T_up = sum_b count_b e^{level_b}`, in log space.

  0 when no band has weight, 1 when the kept set is empty (`lse_k = -inf`) and
  a band has weight, NaN where `lse_k` is NaN or `+inf` or `bad`.
  """
  used = (count > 0) & (level != -jnp.inf)
  log_c = jnp.log(jnp.where(used, count, 1.0))
  terms = jnp.where(used, log_c + jnp.where(used, level, 0.0), -jnp.inf)
  log_tail = jax.nn.logsumexp(terms, axis=-1)
  has_tail = jnp.any(used, axis=-1)
  finite_head = jnp.isfinite(lse_k)
  bound = jax.nn.sigmoid(jnp.where(has_tail, log_tail, 0.0) - jnp.where(finite_head, lse_k, 0.0))
  bound = jnp.where(finite_head, bound, 1.0)
  bound = jnp.where(has_tail, bound, 0.0)
  nan = jnp.isnan(lse_k) | (lse_k == jnp.inf) | bad
  return jnp.where(nan, jnp.nan, bound)


def band_counts(
  logits: ArrayLike, dropped: ArrayLike, upper: ArrayLike, *, width: float, num_bands: int
) -> jax.Array:
  """Counts of dropped logits per band below `upper`, the statistics of `band_count_tail_bound`.

  Band `b < num_bands` holds the dropped logits in `(upper - (b + 1) width,
  upper - b width]`; the last entry counts the rest (at most `upper -
  num_bands width`, `-inf` included). One pass over the row, no sort.

  Args:
    logits: `[..., m]` logits of the row.
    dropped: `[..., m]` bool, the admissible keys outside the kept set.
    upper: `[...]` an upper bound on every dropped logit (e.g. `s_{k+1}`).
    width: band width in nats (> 0).
    num_bands: number of bands (>= 1).

  Returns:
    `[..., num_bands + 1]` float counts.
  """
  if not width > 0:
    raise ValueError(f"width={width!r} must be > 0")
  if int(num_bands) != num_bands or num_bands < 1:
    raise ValueError(f"num_bands={num_bands!r} must be an integer >= 1")
  s = _checks.check_float_array("logits", logits, min_ndim=1)
  dtype = jnp.promote_types(s.dtype, jnp.float32)
  gap = (jnp.asarray(upper, dtype)[..., None] - s.astype(dtype)) / width
  idx = jnp.clip(jnp.floor(jnp.where(jnp.isfinite(gap), gap, num_bands)), 0, num_bands)
  dropped = jnp.asarray(dropped, bool)
  # One band at a time (lax.map): memory stays that of the row, not row x bands.
  per_band = jax.lax.map(
    lambda b: jnp.sum(dropped & (idx == b), axis=-1, dtype=dtype),
    jnp.arange(num_bands + 1, dtype=dtype),
  )
  return jnp.moveaxis(per_band, 0, -1)


def band_count_tail_bound(
  kept_lse: ArrayLike, upper: ArrayLike, counts: ArrayLike, *, width: ArrayLike
) -> jax.Array:
  """Upper bound on the softmax mass outside a kept set from band counts (Proposition C4).

  With `u >= ` every dropped logit and `counts[..., b]` the number of dropped
  logits in `(u - (b + 1) w, u - b w]` (the last entry: all the rest), the
  dropped mass is at most `T_up = sum_b counts_b e^{u - b w}` (the last entry
  weighted `e^{u - B w}`), and the result is `T_up / (e^{kept_lse} + T_up)`.
  Within a factor `e^w + (#dropped) e^{-B w}` of the true tail when `u` is the
  largest dropped logit (docs/theory.md, Proposition C4).

  Args:
    kept_lse: `[...]` log-sum-exp of the kept logits (any kept set).
    upper: `[...]` the upper bound `u` used to form the bands.
    counts: `[..., B + 1]` band counts (`band_counts`).
    width: band width `w` (> 0).

  Returns:
    `[...]` bound in `[0, 1]` (0 when nothing is dropped, 1 for an empty kept
    set with something dropped, NaN for NaN inputs).
  """
  counts = _checks.check_float_array("counts", counts, min_ndim=1)
  w_c = _checks.concrete_or_none(width)
  if w_c is not None and np.any(~(w_c > 0)):
    raise ValueError(f"width={width!r} must be > 0")
  dtype = jnp.promote_types(counts.dtype, jnp.float32)
  c = counts.astype(dtype)
  u = jnp.asarray(upper, dtype)
  lse_k = jnp.asarray(kept_lse, dtype)
  steps = jnp.arange(c.shape[-1], dtype=dtype)
  levels = u[..., None] - jnp.asarray(width, dtype)[..., None] * steps
  bad = jnp.isnan(u) & jnp.any(c > 0, axis=-1)
  return _bound_from_bands(lse_k, c, levels, bad)
