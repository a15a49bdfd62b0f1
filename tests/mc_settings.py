"""Shared pieces of the Monte Carlo validity tests of gsparse.bounds.

The interaction matrices M of the four kinds the issue asks for (generic,
positive-definite, rank-1, negative-definite), and the violation count a
Binomial(R, delta) sample exceeds with probability at most alpha (from scipy,
independently of gsparse).
"""

import math

import jax
import jax.numpy as jnp
import numpy as np
import scipy.stats


def interaction(kind: str, key: jax.Array, d: int, dtype=float) -> jax.Array:
  """A `[d, d]` interaction matrix of the given kind (entries of scale 1/sqrt(d)).

  `dtype=float` is the default float type (float64 when x64 is enabled).
  """
  a = jax.random.normal(key, (d, d), dtype) / math.sqrt(d)
  if kind == "pd":
    return a @ a.T + 0.1 * jnp.eye(d, dtype=dtype)
  if kind == "nd":
    return -(a @ a.T) - 0.1 * jnp.eye(d, dtype=dtype)
  if kind == "rank1":
    return jnp.outer(a[:, 0], a[:, 1])
  return a


def allowed_violations(delta: float, trials: int, alpha: float) -> int:
  """Smallest q with P(Binomial(trials, delta) > q) <= alpha."""
  q = np.arange(trials + 1)
  return int(q[np.argmax(scipy.stats.binom.sf(q, trials, delta) <= alpha)])
