"""Small numerical helpers with safe gradients."""

from __future__ import annotations

import jax
import jax.numpy as jnp


def safe_norm(x: jax.Array, axis: int = -1) -> jax.Array:
  """Euclidean norm over `axis` whose gradient at 0 is 0 rather than NaN.

  A NaN in `x` gives a NaN norm (it is not mapped to 0).
  """
  s = jnp.sum(x * x, axis=axis)
  pos = s > 0
  # Where s is not positive it is 0 (norm 0, gradient 2x = 0) or NaN (propagated).
  return jnp.where(pos, jnp.sqrt(jnp.where(pos, s, 1.0)), s)


def sortable_int32(x: jax.Array) -> jax.Array:
  """Float -> int32 keys ordered as `jax.lax.top_k` orders the floats.

  The bit pattern of a float32 read as int32 is increasing for positive floats
  and decreasing for negative ones; flipping the non-sign bits of negatives
  makes it increasing everywhere (-inf < ... < -0.0 < 0.0 < ... < inf < NaN,
  the total order of XLA's TopK comparator). Narrower floats widen exactly;
  float64 rounds to float32, which keeps the order weakly (ties only).
  """
  i = jax.lax.bitcast_convert_type(x.astype(jnp.float32), jnp.int32)
  return jnp.where(i < 0, i ^ jnp.int32(0x7FFFFFFF), i)


def float_from_sortable(key: jax.Array) -> jax.Array:
  """The float32 whose `sortable_int32` key is `key` (the map is its own inverse on bits)."""
  i = jnp.where(key < 0, key ^ jnp.int32(0x7FFFFFFF), key)
  return jax.lax.bitcast_convert_type(i, jnp.float32)
