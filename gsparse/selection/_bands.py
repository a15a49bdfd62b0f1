"""Band counts of the dropped logits: the statistics of the band-count certificate.

The exact selections hold the whole logit row of a query (a chunk of rows at
a time) and know its (k+1)-th logit `u = s_{k+1}` once the top-k is found.
One more pass over the same row counts the dropped logits in bands of width
`BAND_WIDTH` below `u`; with the log-sum-exp of the kept logits these counts
bound the dropped softmax mass within a factor `e^w + N e^{-B w}` of the
truth (Proposition C4 in docs/theory.md,
`gsparse.bounds.certificates.band_count_tail_bound`), where the single gap
(`gsparse.certificate.kept_set_tail_bound`, every dropped key at `e^u`) can
be loose by the number of dropped keys in a collapsed row.

Only computed when statistics are asked for (`return_stats=True`): the
default route never runs this pass.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

# 64 bands of 0.25 nats: 16 nats below s_{k+1}, a factor at most
# e^0.25 + N e^{-16} = 1.284 + 1.1e-7 N over the true tail (Proposition C4).
BAND_WIDTH = 0.25
NUM_BANDS = 64


def dropped_band_counts(
  logits: jax.Array, next_logit: jax.Array, num_keys: jax.Array, num_kept: jax.Array
) -> jax.Array:
  """Counts of the dropped admissible logits per band below the (k+1)-th logit.

  Entry `b < NUM_BANDS` counts the dropped logits in `(u - (b + 1) w, u - b w]`
  (`u = next_logit`, `w = BAND_WIDTH`), the last entry the rest (`<= u - B w`,
  admissible `-inf` logits included): the `counts` argument of
  `gsparse.bounds.certificates.band_count_tail_bound`. A logit at least `w`
  below `u` is never kept (the kept ones are `>= u`), so bands `b >= 1` are
  counted directly, in one pass (a histogram by scatter-add, not one pass per
  band), and band 0 gets the remaining dropped keys, which also takes
  the ties at `u` and any NaN logit (a NaN row's bound is NaN anyway).
  Counts are exact integers; the gap `u - x` and the band edges round as
  float32 (docs/theory.md, section 5: a logit on an edge may land one band low).

  Args:
    logits: `[..., S]` the row's logits, `-inf` on inadmissible keys.
    next_logit: `[...]` the (k+1)-th largest admissible logit `u` (`-inf`:
      nothing with weight is dropped, all counts are then unused).
    num_keys: `[...]` admissible keys of the row (`-inf` logits included).
    num_kept: `[...]` keys kept (the rest of the admissible keys is dropped).

  Returns:
    `[..., NUM_BANDS + 1]` int32 counts, summing to `num_keys - num_kept`.
  """
  s = logits.shape[-1]
  x = logits.astype(jnp.float32)
  u = jnp.asarray(next_logit, jnp.float32)[..., None]
  gap = (u - x) / BAND_WIDTH  # +inf for a -inf logit below a finite u; NaN skipped
  far = gap >= 1.0
  band = jnp.where(far, jnp.clip(jnp.floor(jnp.where(far, gap, 1.0)), 1, NUM_BANDS), 0)
  # A histogram per row by a scatter-add vmapped over the leading axes: the
  # scatter keeps them as batch axes, so no flat bin index can overflow int32
  # and a sharded call partitions it by rows (a flat [rows * (B + 1)] index did
  # neither: found in review).
  hist = _row_histogram
  for _ in range(band.ndim - 1):
    hist = jax.vmap(hist)
  hist = hist(band.astype(jnp.int32))
  # The last band also counted the inadmissible keys (-inf, infinitely far
  # below a finite u): remove them; admissible -inf logits stay (weight 0,
  # counted at u - B w: still an upper bound).
  num_keys = jnp.asarray(num_keys, jnp.int32)
  dropped = num_keys - jnp.asarray(num_kept, jnp.int32)
  inadmissible = jnp.where(jnp.isfinite(u[..., 0]), s - num_keys, 0)
  last = jnp.maximum(hist[..., -1] - inadmissible, 0)
  mid = hist[..., 1:-1]
  first = jnp.maximum(dropped - jnp.sum(mid, axis=-1) - last, 0)
  counts = jnp.concatenate([first[..., None], mid, last[..., None]], axis=-1)
  return jax.lax.stop_gradient(counts)


def _row_histogram(band: jax.Array) -> jax.Array:
  """`[NUM_BANDS + 1]` int32 counts of the band indices `band` (`[S]`, in range)."""
  return jnp.zeros((NUM_BANDS + 1,), jnp.int32).at[band].add(1, mode="drop")
