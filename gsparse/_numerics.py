"""Small numerical helpers with safe gradients."""

from __future__ import annotations

import jax
import jax.numpy as jnp


def safe_norm(x: jax.Array, axis: int = -1) -> jax.Array:
  """Euclidean norm over `axis` whose gradient at 0 is 0 rather than NaN."""
  s = jnp.sum(x * x, axis=axis)
  pos = s > 0
  return jnp.where(pos, jnp.sqrt(jnp.where(pos, s, 1.0)), 0.0)
