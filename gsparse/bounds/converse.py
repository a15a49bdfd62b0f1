"""When top-k keeps almost none of the softmax mass: Theorems R1 and R1' (docs/theory.md, §6).

For `n` i.i.d. `N(0, tau^2)` scores `tau g_j`, `Z = sum_j e^{tau g_j}` and the
top-k head sum `H`, Theorem R1' bounds `P(H / Z > eps)`. For every level `q`,
truncation `a in (-inf, inf]` and `lam in (0, 1)`, with `mu = e^{tau^2/2}`,
`L = lam n mu Phi(a - tau)` and `c = k e^{tau q} / L < eps`,

    P(H / Z > eps) <= e^{tau^2} Phi(a - 2 tau) / ((1 - lam)^2 n Phi(a - tau)^2)
                      + n mu Phi_bar(q - tau) / ((eps - c) L).

Theorem R1 is the case `a = inf`, `lam = 1/2`, `q = Phi_bar^{-1}(k/n)`. The
truncation at `a = sqrt(2 ln n)` (the typical maximum) is what closes the
failure band: under `k = alpha n^C` and `tau = beta sqrt(ln n)` the bound
tends to 0 for every `beta < sqrt(2 (1 - C))`, so keeping `n^C` keys fails
exactly below the threshold that Theorem R3 (`gsparse.bounds.asymptotics`)
shows sufficient above.
"""

from __future__ import annotations

import jax
import numpy as np
from jax.typing import ArrayLike

from gsparse.bounds import _xp
from gsparse.bounds._common import PointFormula, _check, _check_n, _norm_isf, _on_flat, _valid

# Fixed grids of the free parameters (any choice gives a valid bound; the minimum is taken).
# Levels q: Phi_bar(q) = r k / n.
_Q_FRACTIONS = 2.0 ** -np.linspace(0.0, 6.0, 13)
# Truncation levels a = tau + offset, plus sqrt(2 ln n) and +inf (added per point).
_A_OFFSETS = np.linspace(-2.0, 6.0, 17)
_LAMBDAS = np.array([0.25, 0.5, 0.75])


def _levels(xp, n, k, dtype):
  """The grid of levels `q` with `Phi_bar(q) = r k / n`, `[Q]`."""
  frac = xp.clip(k * xp.asarray(_Q_FRACTIONS, dtype) / n, 1e-300, 1.0)
  return _norm_isf(frac)


def _log_z_lower(xp, ln_n, tau):
  """Lemma Z (truncated second moment) over the grid: `(log L, log fail)`, each flat `[A * 3]`.

  `Z >= Z_a >= L = lam E Z_a` except with probability at most
  `Var Z_a / ((1 - lam) E Z_a)^2`, where `Z_a = sum_j e^{tau g_j} 1{g_j <= a}`,
  `E Z_a = n mu Phi(a - tau)` and `Var Z_a <= n e^{2 tau^2} Phi(a - 2 tau)`.
  """
  dtype = tau.dtype
  ends = xp.stack([xp.sqrt(2.0 * ln_n), xp.asarray(np.inf, dtype)])
  a = xp.concatenate([tau + xp.asarray(_A_OFFSETS, dtype), ends.astype(dtype)])
  log_mean = ln_n + 0.5 * tau * tau + xp.log_ndtr(a - tau)  # log E Z_a
  log_var = ln_n + 2.0 * tau * tau + xp.log_ndtr(a - 2.0 * tau)  # log of a bound on Var Z_a
  lam = xp.asarray(_LAMBDAS, dtype)
  log_l = xp.log(lam)[None, :] + log_mean[:, None]
  log_fail = (log_var - 2.0 * log_mean)[:, None] - 2.0 * xp.log1p(-lam)[None, :]
  return log_l.reshape(-1), log_fail.reshape(-1)


def _head_point(n, tau, k, eps):
  """Theorem R1' at one point, minimised over the grids of `q`, `a` and `lam`."""
  xp = _xp.of(n, tau, k, eps)
  ln_n = xp.log(n)
  q = _levels(xp, n, k, tau.dtype)[:, None]  # [Q, 1]
  log_l, log_fail = _log_z_lower(xp, ln_n, tau)  # [R]
  c = xp.exp(xp.log(k) + tau * q - log_l[None, :])  # [Q, R]
  ok = c < eps
  gap = xp.where(ok, eps - c, 1.0)
  log_markov = ln_n + 0.5 * tau * tau + xp.log_ndtr(tau - q) - xp.log(gap) - log_l[None, :]
  bound = xp.where(ok, xp.exp(log_fail)[None, :] + xp.exp(log_markov), 1.0)
  out = xp.where(k >= n, 1.0, xp.minimum(xp.min(bound), 1.0))
  valid = _valid(n >= 1, tau >= 0, k >= 1, eps > 0, eps < 1)
  return (xp.where(valid, out, xp.nan),)


_HEAD = PointFormula(_head_point)


def head_mass_exceeds_prob(
  n: ArrayLike, tau: ArrayLike, *, k: ArrayLike, eps: ArrayLike
) -> jax.Array:
  """Upper bound on `P(1 - t > eps)` for top-k of `n` i.i.d. `N(0, tau^2)` scores (Theorem R1').

  `1 - t` is the softmax mass of the k largest scores. The bound is a
  truncated-second-moment (Chebyshev) bound on the normaliser falling below
  a fraction of its truncated mean, plus a Markov bound on the mass above a
  level `q`, minimised over a fixed grid of the truncation, the fraction and
  the level (the grid contains Theorem R1's choice, so it is never worse than
  R1). It is 1 where no grid point meets the condition `c < eps` (or
  `k >= n`).

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
  (out,) = _on_flat(_HEAD, (n, tau, k, eps))
  return out


__all__ = ["head_mass_exceeds_prob"]
