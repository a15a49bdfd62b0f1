"""The converse of the n^C claim: when top-k keeps almost none of the softmax mass.

Theorem R1 of docs/theory.md (section 6): for `n` i.i.d. `N(0, tau^2)`
scores, top-k with `q = Phi_bar^{-1}(k / n) > 0`, and `eps in (0, 1)`, let
`c = 2 (k / n) exp(tau q - tau^2 / 2)`. If `c < eps`,

    P(head mass 1 - t > eps) <= 4 e^{tau^2} / n + 2 Phi_bar(q - tau) / (eps - c).

Under `k = alpha n^C` with `0 < C < 1` the right side tends to 0 when tau is
fixed, or when `tau = beta sqrt(ln n)` with `beta < min(1, sqrt(2 (1 - C)))`:
keeping `n^C` keys then fails (the tail mass, which is the total-variation
distance to the top-k renormalisation, tends to 1).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from jax.scipy.special import ndtr
from jax.typing import ArrayLike

from gsparse.bounds._common import _check, _check_n, _float_dtype, _norm_isf


def head_mass_exceeds_prob(
  n: ArrayLike, tau: ArrayLike, *, k: ArrayLike, eps: ArrayLike
) -> jax.Array:
  """Upper bound on `P(1 - t > eps)` for top-k of `n` i.i.d. `N(0, tau^2)` scores (Theorem R1).

  `1 - t` is the softmax mass of the k largest scores. The bound is the
  sum of a Chebyshev bound on the normaliser falling below half its mean and
  a Markov bound on the mass above the level `q = Phi_bar^{-1}(k/n)`; it is 1
  where the theorem's condition `c < eps` fails (or `k >= n`).

  Args:
    n: number of scores (>= 1).
    tau: score standard deviation (>= 0).
    k: kept scores (>= 1).
    eps: head-mass level in (0, 1).

  Returns:
    The bound in `[0, 1]`, broadcast over the arguments (jit/vmap-able).
  """
  _check_n(n)
  _check("tau", tau, lo=0)
  _check("k", k, lo=1)
  _check("eps", eps, lo=0, hi=1, lo_open=True, hi_open=True)
  dtype = _float_dtype()
  n, tau, k, eps = (jnp.asarray(v, dtype) for v in (n, tau, k, eps))
  frac = jnp.clip(k / n, 0.0, 1.0)
  q = _norm_isf(frac)
  c = 2.0 * frac * jnp.exp(tau * q - 0.5 * tau * tau)
  ok = (k < n) & (q > 0) & (c < eps)
  cheb = 4.0 * jnp.exp(tau * tau) / n
  markov = 2.0 * ndtr(tau - q) / jnp.where(ok, eps - c, 1.0)
  return jnp.where(ok, jnp.minimum(cheb + markov, 1.0), 1.0)
