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
