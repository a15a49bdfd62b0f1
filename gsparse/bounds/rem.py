"""The n^C view: the k policy `alpha n^C` and random-energy-model predictions (theory.md §6)."""

from __future__ import annotations

from typing import NamedTuple

import jax
import jax.numpy as jnp
from jax.scipy.special import ndtr
from jax.typing import ArrayLike

from gsparse.bounds import _xp
from gsparse.bounds._common import DEFAULT_DELTA, _check, _check_n, _float_dtype, _norm_isf
from gsparse.bounds.error import ErrorBound, topk_error_bound
from gsparse.bounds.norms import InteractionNorms


def power_law_k(n: ArrayLike, *, alpha: ArrayLike, C: ArrayLike) -> jax.Array:
  """The k policy `k = alpha * n^C` of the n^C view.

  Rounding: `k = clip(ceil(alpha * n^C), 1, n)` computed in floating point (so
  a product that lands on an integer up to rounding, e.g. `1 * 1024^0.5`, gives
  that integer). Use `int(power_law_k(...))` for the static `k` of
  `gsparse.topk_attention`.

  Args:
    n: sequence length (integer-valued, >= 1).
    alpha: prefactor, > 0.
    C: exponent in [0, 1].

  Returns:
    int32 array broadcast over the arguments.
  """
  _check_n(n)
  _check("alpha", alpha, lo=0, lo_open=True)
  _check("C", C, lo=0, hi=1)
  dtype = _float_dtype()
  n, alpha, C = (jnp.asarray(v, dtype) for v in (n, alpha, C))
  raw = alpha * jnp.power(n, C)
  # Snap values within a few ulps of an integer before the ceiling.
  snapped = jnp.where(
    jnp.abs(raw - jnp.round(raw)) <= 8 * jnp.finfo(dtype).eps * raw, jnp.round(raw), raw
  )
  return jnp.clip(jnp.ceil(snapped), 1.0, n).astype(jnp.int32)


def power_law_error_bound(
  n: ArrayLike,
  sigma: ArrayLike,
  norms: InteractionNorms,
  *,
  alpha: ArrayLike,
  C: ArrayLike,
  value_norms: InteractionNorms | None = None,
  value_norm: ArrayLike | None = None,
  delta: ArrayLike = DEFAULT_DELTA,
) -> ErrorBound:
  """Theorem 2 evaluated at the policy `k = power_law_k(n, alpha=alpha, C=C)`.

  Vmap or broadcast over `n` to see how the certified error falls with `n`.
  """
  k = power_law_k(n, alpha=alpha, C=C)
  return topk_error_bound(
    n, sigma, norms, k=k, value_norms=value_norms, value_norm=value_norm, delta=delta
  )


def predicted_tail_mass(n: ArrayLike, tau: ArrayLike, *, k: ArrayLike) -> jax.Array:
  """Typical (not certified) tail mass of top-k for i.i.d. `N(0, tau^2)` scores.

  Random-energy-model prediction valid while the row is not condensed
  (`tau < sqrt(2 ln n)`): the k largest of n standard Gaussians lie above
  `q = Phi_bar^{-1}(k/n)` and the softmax with inverse temperature tau weighs
  the level `g` by `e^{tau g}`, i.e. the tilted law `N(tau, 1)`, so the mass
  below `q` is `Phi(q - tau)`. Under `k = alpha n^C` and fixed tau it tends to
  1 as n grows (`q ~ sqrt(2 (1-C) ln n)`); it falls with n only when tau
  grows at least like `sqrt(2 (1-C) ln n)` (docs/theory.md, section 6:
  Theorems R1' (`head_mass_exceeds_prob`) and R3 (`tail_mass_exceeds_prob`)
  prove both sides of that threshold; this formula itself is a heuristic).

  Args:
    n: sequence length.
    tau: score scale (>= 0).
    k: kept entries (1 <= k <= n).

  Returns:
    The prediction in `[0, 1]`.
  """
  _check_n(n)
  _check("tau", tau, lo=0)
  _check("k", k, lo=1)
  dtype = _float_dtype()
  n, tau, k = (jnp.asarray(v, dtype) for v in (n, tau, k))
  q = _norm_isf(jnp.clip(k / n, 0.0, 1.0))
  return jnp.where(k >= n, 0.0, ndtr(q - tau))


class RemBoundaries(NamedTuple):
  """Regime boundaries in tau for sequence length n (random energy model).

  Attributes:
    diffuse: `sqrt(ln n / 2)`: below, effective support ~ `n e^{-tau^2}`.
    collapse: `sqrt(2 ln n)`: above, the row condenses onto O(1) entries.
  """

  diffuse: jax.Array
  collapse: jax.Array


def rem_boundaries(n: ArrayLike) -> RemBoundaries:
  """The tau values where the effective support changes regime.

  See `predicted_effective_support`.
  """
  _check_n(n)
  ln = jnp.log(jnp.asarray(n, _float_dtype()))
  return RemBoundaries(jnp.sqrt(0.5 * ln), jnp.sqrt(2.0 * ln))


def rem_regime(n: ArrayLike, tau: ArrayLike) -> jax.Array:
  """0 = diffuse (`tau < sqrt(ln n / 2)`), 1 = n^C-like, 2 = collapsed (`tau >= sqrt(2 ln n)`)."""
  b = rem_boundaries(n)
  _check("tau", tau, lo=0)
  tau = jnp.asarray(tau, _float_dtype())
  return (tau >= b.diffuse).astype(jnp.int32) + (tau >= b.collapse).astype(jnp.int32)


def predicted_effective_support(n: ArrayLike, tau: ArrayLike) -> jax.Array:
  """Leading-order prediction of `1 / sum_j p_j^2` for n i.i.d. `N(0, tau^2)` scores.

  With `a = sqrt(2 ln n)` (random energy model, docs/theory.md section 6):
  `log ESS = ln n - tau^2` for `tau <= a/2`, `(a - tau)^2` for
  `a/2 <= tau <= a`, and 0 (ESS of order one) beyond. Continuous, decreasing,
  exact at exponential scale only (sub-exponential factors are not modelled).
  The exponent `C = log ESS / ln n` is `1 - tau^2/ln n`, then
  `2 (1 - tau/a)^2`: n^C-sparsity with `C < 1` needs `tau^2` proportional
  to `ln n`. Theorem R5 (docs/theory.md) proves that exponent, i.e.
  `log ESS / ln n -> log(prediction) / ln n` in probability under
  `tau = beta sqrt(ln n)`; the prefactors are not proven.

  Returns:
    The predicted effective support, in `[1, n]`.
  """
  _check_n(n)
  _check("tau", tau, lo=0)
  dtype = _float_dtype()
  n, tau = (jnp.asarray(v, dtype) for v in (n, tau))
  return jnp.exp(_log_effective_support(n, tau))


def _log_effective_support(n, tau):
  """`log` of `predicted_effective_support`, unchecked, in the namespace of its arguments."""
  xp = _xp.of(n, tau)
  ln = xp.log(n)
  a = xp.sqrt(2.0 * ln)
  return xp.where(tau <= 0.5 * a, ln - tau * tau, xp.where(tau <= a, (a - tau) ** 2, 0.0))
