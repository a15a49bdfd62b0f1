"""The n^C claims as theorems: sufficiency (Theorem R3) and the collapsed-phase law (§6).

Theorem R3 (docs/theory.md, section 6) bounds the probability that the top-k
tail mass of `n` i.i.d. `N(0, tau^2)` scores exceeds `eps`, at every finite
`n`; under `k = alpha n^C` and `tau = beta sqrt(ln n)` the bound tends to 0
whenever `beta^2 > 2 (1 - C)`. With Theorem R1' (`head_mass_exceeds_prob`),
which shows the tail tends to 1 below that threshold, this settles when
"`n^C` keys suffice". In the collapsed phase (`beta > sqrt 2`) and at fixed
`k` the tail does not vanish: it converges in law to the tail after the
`k` largest weights of a Poisson-Dirichlet `PD(m, 0)` partition with
`m = sqrt(2) / beta` (`collapsed_tail_mean` gives its mean).
"""

from __future__ import annotations

import jax
import numpy as np
import scipy.special as sps
from jax.scipy import special as jsp
from jax.typing import ArrayLike

from gsparse.bounds import _xp
from gsparse.bounds._common import (
  PointFormula,
  _binom_tail,
  _check,
  _check_n,
  _norm_isf,
  _on_flat,
  _safety,
  _valid,
)
from gsparse.bounds.converse import _levels, _log_z_lower

# Lower bound on Z from the j-th largest level: Z >= j e^{tau m} unless fewer than j levels
# exceed m, where Phi_bar(m) = rho j / n.
_ORDER_J = 2.0 ** np.arange(0, 11)
_ORDER_RHO = np.array([1.5, 2.0, 4.0, 8.0])
# Quadrature nodes of the collapsed-phase integral: s = e^u, u uniform on this range.
_LOG_S_RANGE = (-23.0, 4.2)
_NUM_S = 2049


def _log_chernoff(xp, n, x, p):
  """`-n KL(x/n || p)`: the log of Chernoff's bound on `P(X >= x)` (`x >= np`) or `P(X <= x)`."""
  a = xp.clip(x / n, 0.0, 1.0)
  p = xp.clip(p, 1e-300, 1.0 - 1e-16)
  first = xp.where(a > 0, a * (xp.log(xp.maximum(a, 1e-300)) - xp.log(p)), 0.0)
  return -n * (first + (1.0 - a) * (xp.log1p(-xp.minimum(a, 1.0 - 1e-16)) - xp.log1p(-p)))


def _count_above(xp, n, k, p, dtype):
  """Bound on `P(Binomial(n, p) >= k + 1)`: exact (betainc, float32 margin) or Chernoff."""
  exact = _binom_tail(n, k, p) / _safety(dtype)
  exact = xp.where(xp.isnan(exact), 1.0, exact)
  chern = xp.where(k + 1.0 >= n * p, xp.exp(_log_chernoff(xp, n, k + 1.0, p)), 1.0)
  return xp.minimum(xp.minimum(exact, chern), 1.0)


def _log_z_order(xp, n, tau, dtype):
  """Order-statistic lower bounds on `Z`: `(log L, log fail)`, flat `[J * RHO]`.

  `Z >= j e^{tau m}` unless `Binomial(n, Phi_bar(m)) <= j - 1`, bounded by Chernoff.
  """
  j = xp.asarray(_ORDER_J, dtype)[:, None]
  p = xp.minimum(j * xp.asarray(_ORDER_RHO, dtype)[None, :] / n, 0.5)
  m = _norm_isf(p)
  log_fail = xp.where(j - 1.0 < n * p, _log_chernoff(xp, n, j - 1.0, p), 0.0)
  log_fail = xp.where(j <= n, log_fail, 0.0)
  return (xp.log(j) + tau * m).reshape(-1), log_fail.reshape(-1)


def _below_exceeds(xp, ln_n, tau, q, log_x):
  """Bound on `P(B_q > x)`, `B_q = sum_j e^{tau g_j} 1{g_j <= q}`: Markov or Cantelli.

  `E B_q = n mu Phi(q - tau)` and `Var B_q <= n e^{2 tau^2} Phi(q - 2 tau)`; broadcasts
  `q` against `log_x`.
  """
  log_mean = ln_n + 0.5 * tau * tau + xp.log_ndtr(q - tau)
  log_var = ln_n + 2.0 * tau * tau + xp.log_ndtr(q - 2.0 * tau)
  markov = xp.exp(log_mean - log_x)
  # Cantelli: P(B > x) <= V / (V + s^2), s = x - E B > 0.
  excess = log_x - log_mean
  log_s = log_mean + xp.log(xp.expm1(xp.maximum(excess, 1e-30)))
  cantelli = xp.where(excess > 0, xp.sigmoid(log_var - 2.0 * log_s), 1.0)
  return xp.minimum(xp.minimum(markov, cantelli), 1.0)


def _tail_point(n, tau, k, eps):
  """Theorem R3 at one point, minimised over the grids of `q` and of the lower bound on `Z`."""
  xp = _xp.of(n, tau, k, eps)
  dtype = tau.dtype
  ln_n = xp.log(n)
  q = _levels(xp, n, k, dtype)  # [Q]
  binom = _count_above(xp, n, k, _norm_sf(xp, q), dtype)  # P(N_q >= k + 1)
  log_l_a, log_fail_a = _log_z_lower(xp, ln_n, tau)
  log_l_b, log_fail_b = _log_z_order(xp, n, tau, dtype)
  log_thr = xp.log(eps) + xp.concatenate([log_l_a, log_l_b])[None, :]  # log(eps L)
  log_fail = xp.concatenate([log_fail_a, log_fail_b])[None, :]
  below = _below_exceeds(xp, ln_n, tau, q[:, None], log_thr)  # P(B_q > eps L)
  bound = binom[:, None] + xp.exp(log_fail) + below
  out = xp.where(k >= n, 0.0, xp.minimum(xp.min(bound), 1.0))
  valid = _valid(n >= 1, tau >= 0, k >= 1, eps > 0, eps < 1)
  return (xp.where(valid, out, xp.nan),)


def _norm_sf(xp, x):
  """`Phi_bar(x)`."""
  return xp.ndtr(-x)


_TAIL = PointFormula(_tail_point)


def tail_mass_exceeds_prob(
  n: ArrayLike, tau: ArrayLike, *, k: ArrayLike, eps: ArrayLike
) -> jax.Array:
  """Upper bound on `P(t > eps)` for the top-k tail mass `t` of `n` i.i.d. `N(0, tau^2)` scores.

  Theorem R3: if at most `k` levels exceed `q`, the tail is at most
  `B_q / Z` with `B_q` the softmax numerator below `q`; a binomial tail for
  the count above `q`, a lower bound on `Z` (truncated second moment, or the
  largest term) and Markov's inequality for `B_q` give the bound, minimised
  over a fixed grid of `q` and of the lower bound. Under `k = alpha n^C`
  (`0 < C < 1`) and `tau = beta sqrt(ln n)` with `beta^2 > 2 (1 - C)` the
  theorem's bound tends to 0 (docs/theory.md, Corollary R4); the bound is
  loose at moderate `n` (first and second moments only). For one
  attention row pass the row's `tau_i` and the `n - 1` off-diagonal keys
  (Lemma G); the diagonal only adds mass to the head when it is kept.

  Args:
    n: number of scores (>= 1).
    tau: score standard deviation (>= 0).
    k: kept scores (integer-valued, >= 1).
    eps: tail-mass level in (0, 1).

  Returns:
    The bound in `[0, 1]` (0 for `k >= n`), broadcast over the arguments
    (jit/vmap-able).
  """
  _check_n(n)
  _check("tau", tau, lo=0)
  _check("k", k, lo=1, integer=True)
  _check("eps", eps, lo=0, hi=1, lo_open=True, hi_open=True)
  (out,) = _on_flat(_TAIL, (n, tau, k, eps))
  return out


def _collapsed_point(k, beta):
  """`E T_k` for `PD(m, 0)`, `m = sqrt(2) / beta`: one integral over `s` (Theorem R6)."""
  xp = _xp.of(k, beta)
  sp = sps if xp is _xp.NP else jsp
  m = xp.sqrt(2.0) / beta
  dtype = m.dtype
  u = xp.linspace(_LOG_S_RANGE[0], _LOG_S_RANGE[1], _NUM_S, dtype=dtype)
  s = xp.exp(u)
  full = sp.gamma(1.0 - m)
  lower = full * sp.gammainc(1.0 - m, s)  # gamma(1 - m, s)
  # Gamma(1 - m, s) = Gamma(1 - m) - gamma(1 - m, s): its cancellation at large s only touches
  # chi where the factor e^{-s} of the integrand makes it negligible.
  upper = full - lower
  s_m = xp.exp(m * u)
  phi = xp.maximum(s_m * lower + xp.expm1(-s), 0.0)  # int_0^1 (1 - e^{-s w}) m w^{-m-1} dw
  dphi = m * s_m / s * lower  # phi'(s)
  chi = xp.clip(xp.exp(-s) - s_m * upper, 0.0, 1.0)  # E e^{-s P}, P ~ Pareto(m) on (1, inf)
  pos = chi > 0
  safe = xp.where(pos, chi, 1.0)  # keeps 0 * log(0) out of the value and of the gradient
  log_f = -s + (k - 1.0) * xp.log(safe) + xp.log(k * dphi) - (k + 1.0) * xp.log1p(phi) + u
  f = xp.where(pos, xp.exp(log_f), 0.0)
  du = (_LOG_S_RANGE[1] - _LOG_S_RANGE[0]) / (_NUM_S - 1)
  total = du * (xp.sum(f) - 0.5 * (f[0] + f[-1]))  # trapezoid rule in u = log s
  valid = _valid(k >= 1, beta > xp.sqrt(2.0))
  return (xp.where(valid, xp.clip(total, 0.0, 1.0), xp.nan),)


_COLLAPSED = PointFormula(_collapsed_point)


def collapsed_tail_mean(k: ArrayLike, beta: ArrayLike) -> jax.Array:
  """Limit of the mean top-k tail mass in the collapsed phase (Theorem R6).

  For `tau = beta sqrt(ln n)` with `beta > sqrt 2` and fixed `k`, the ranked
  softmax weights of `n` i.i.d. `N(0, tau^2)` scores converge in law to
  Poisson-Dirichlet `PD(m, 0)` with `m = sqrt(2) / beta`, so the top-k tail
  mass converges in law, and in mean, to `T_k = sum_{i > k} V_i`. Its mean is
  `int_0^inf e^{-s} chi(s)^{k-1} k phi'(s) / (1 + phi(s))^{k+1} ds` with
  `phi(s) = s^m gamma(1 - m, s) - (1 - e^{-s})` and
  `chi(s) = e^{-s} - s^m Gamma(1 - m, s)`, computed by the trapezoid rule in
  `log s` (error far below the Monte Carlo checks'). At finite `n` the
  effective `m_n = Phi_bar^{-1}(1/n) / tau` is the better parameter
  (docs/theory.md); pass `beta = sqrt(2) / m_n` to use it.

  Args:
    k: kept weights (integer-valued, >= 1).
    beta: `tau / sqrt(ln n)`, > sqrt 2.

  Returns:
    `E T_k` in `(0, 1)`, broadcast over the arguments.
  """
  _check("k", k, lo=1, integer=True)
  _check("beta", beta, lo=float(np.sqrt(2.0)), lo_open=True)
  (out,) = _on_flat(_COLLAPSED, (k, beta))
  return out


__all__ = ["collapsed_tail_mean", "tail_mass_exceeds_prob"]
