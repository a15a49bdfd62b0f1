"""One tile of the block-level Pallas backward, shared by its Triton and Mosaic kernels.

`tile_valid` is the forward's mask of a `[bq, bk]` tile (key positions past S,
padded query rows, causal, and the index ranges of `range_mask`);
`tile_grads` recomputes its probabilities from the saved log-sum-exp and
returns them with `ds`.
"""

from __future__ import annotations

import jax.numpy as jnp
from jax import lax

from gsparse.kernels._common import DOT_PRECISION, range_mask

NT = (((1,), (1,)), ((), ()))  # a @ b^T
TN = (((0,), (0,)), ((), ()))  # a^T @ b


def dot32(a, b, dims=(((1,), (0,)), ((), ()))):
  """`lax.dot_general` at `DOT_PRECISION` with a float32 result (default: `a @ b`)."""
  return lax.dot_general(a, b, dims, precision=DOT_PRECISION, preferred_element_type=jnp.float32)


def tile_grads(q, kb, vb, do, lse, delta, valid, scale):
  """`(p, ds)` `[bq, bk]` float32 of one tile; lse and delta are `[bq, 1]` columns."""
  ok = valid & (lse != -jnp.inf)
  s = dot32(q, kb, NT) * scale
  p = jnp.where(ok, jnp.exp(jnp.where(ok, s - lse, 0.0)), 0.0)
  dp = dot32(do, vb, NT)
  # Not p * (dp - delta) alone: a masked entry has p = 0, but delta is NaN on
  # a row whose output is NaN (or a padded row that read a NaN row forward).
  return p, jnp.where(ok, p * (dp - delta), 0.0)


def tile_valid(qpos, kpos, rng, *, num_keys, num_queries, is_causal, window):
  """The forward's mask of one tile; `rng`: None or `(q_len, kv_len, q_seg, kv_seg)`."""
  valid = (kpos < num_keys) & (qpos < num_queries)
  if rng is not None:
    valid = valid & range_mask(qpos, kpos, *rng, window)
  return valid & (kpos <= qpos) if is_causal else valid
