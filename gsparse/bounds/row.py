"""Per-row sparsity given the row's own scale tau_i (docs/theory.md, Theorem 1R).

`tau_i = sigma ||M^T x_i||` is computable from the query row, so a bound
conditional on it avoids the worst case over the Laurent-Massart interval of
Theorem 1. The core replaces Lemma 5's relaxation of the scores above the
m-th largest by one Chernoff bound on `Z_top + Z_rest` given that order
statistic, with the Laplace transforms of the truncated lognormal summands
bounded by rigorous upper Riemann sums, and a grid for the order statistic
whose cells shrink with `1/tau`.
"""

from __future__ import annotations

import jax
from jax.typing import ArrayLike

from gsparse.bounds import _xp
from gsparse.bounds._common import (
  PointFormula,
  _check,
  _check_delta,
  _check_eps,
  _check_n,
  _log_phi_diff,
  _on_flat,
  _valid,
)
from gsparse.bounds.sparsity import _first_admissible_m, _sum_over_g_cells

_NUM_G_CELLS = 256  # cells of the m-th order statistic G on [-3, sqrt(2 ln n) + 2]
_NUM_QUAD = 64  # Riemann cells per truncated Laplace transform
_NUM_LAMBDA = 24  # Chernoff parameters tried (any one gives a valid bound)
_FLOOR = -9.0  # below: the integrand is bounded by 1


def _log_laplace_upper(log_lam, tau, lo, hi, tail_hi):
  """Upper bound on `log E[exp(-lam e^{tau g}) 1{lo < g <= hi}]`, `g ~ N(0, 1)`.

  On each Riemann cell `[g_q, g_{q+1}]` the integrand `exp(-lam e^{tau g}) phi(g)`
  is at most `exp(-lam e^{tau g_q}) phi(g)` (decreasing in g for tau >= 0), which
  integrates to `exp(-lam e^{tau g_q}) (Phi(g_{q+1}) - Phi(g_q))`. `tail_hi`
  adds the mass above `hi` weighted `exp(-lam e^{tau hi})`; below `lo` nothing.
  Shapes: `log_lam [..., K]`, `lo, hi [...]`; returns `[..., K]`.
  """
  xp = _xp.of(log_lam, tau, lo, hi)
  u = xp.linspace(0.0, 1.0, _NUM_QUAD + 1, dtype=hi.dtype)
  g = lo[..., None] + (hi - lo)[..., None] * u  # [..., Q + 1]
  lw = _log_phi_diff(g[..., 1:], g[..., :-1])  # [..., Q]
  expo = -xp.exp(log_lam[..., :, None] + tau * g[..., None, :-1])  # [..., K, Q]
  parts = [expo + lw[..., None, :]]
  if tail_hi:
    top = -xp.exp(log_lam + tau * hi[..., None]) + xp.log_ndtr(-hi)[..., None]
    parts.append(top[..., None])
  return xp.logsumexp(xp.concatenate(parts, axis=-1), axis=-1)


def _chernoff_parts(eps, tau, c):
  """The `m`-independent parts of `_chernoff_fail`: `(theta, top, rest)`, computed once per row.

  `top` and `rest` (`[L, K]`) bound the log Laplace transforms of one score above and
  one below the cell's order statistic, for each Chernoff parameter `theta` (`[K]`).
  """
  xp = _xp.of(eps, tau, c)
  c1, c2 = c[:-1], c[1:]  # [L]
  log_thr = tau * c2 + xp.log1p(-eps) - xp.log(eps)  # [L]
  theta = xp.linspace(-3.0, 9.0, _NUM_LAMBDA, dtype=c.dtype)  # log(lam * threshold)
  log_lam = theta[None, :] - log_thr[:, None]  # [L, K]
  # Rest: nm1 - m scores, g | g < c1 (stochastically smallest in the cell).
  lo = xp.minimum(c1 - 1.0, _FLOOR)
  rest = _log_laplace_upper(log_lam, tau, lo, c1, False)
  rest = xp.logaddexp(rest, xp.log_ndtr(lo)[:, None]) - xp.log_ndtr(c1)[:, None]
  # Top: m - 1 scores, g | g > c1.
  top = _log_laplace_upper(log_lam, tau, c1, c1 + 10.0, True) - xp.log_ndtr(-c1)[:, None]
  return theta, top, rest


def _chernoff_fail(nm1, m, parts):
  """Per G-cell bound on `P(Z_top + Z_rest < e^{tau G}(1 - eps)/eps | G in (c_l, c_{l+1}])`.

  `parts` is `_chernoff_parts(eps, tau, c)`.
  """
  theta, top, rest = parts
  xp = _xp.of(nm1, m, theta)
  mk = m[..., None, None]  # one m per [L, K] grid
  log_b = xp.exp(theta)[None, :] + (mk - 1.0) * xp.minimum(top, 0.0)
  log_b = log_b + (nm1 - mk) * xp.minimum(rest, 0.0)
  return xp.exp(xp.minimum(xp.min(log_b, axis=-1), 0.0))  # [..., L]


def _row_fail_fn(n, tau, eps, log_drow):
  """`fail(m)`: bound on `P(at least m off-diagonal entries > eps | tau_i = tau)`, per `m [...]`.

  `fail(m, cells)` is the same as `[..., 1]`, one "cell", for `_first_admissible_m`.
  """
  xp = _xp.of(n, tau, eps, log_drow)
  del log_drow  # the grid is fixed; only the comparison uses the level
  nm1 = xp.maximum(n - 1.0, 1.0)
  u = xp.linspace(0.0, 1.0, _NUM_G_CELLS + 1, dtype=tau.dtype)
  c = -3.0 + u * (xp.sqrt(2.0 * xp.log(nm1)) + 5.0)
  parts = _chernoff_parts(eps, tau, c)

  def fail(m, cells=None):
    mm = xp.clip(m, 1.0, nm1)
    new = _sum_over_g_cells(nm1, mm, c, _chernoff_fail(nm1, mm, parts))
    out = xp.where((eps * m >= 1.0) | (m > nm1), 0.0, new)
    return out if cells is None else out[..., None]

  return fail


def _row_scalar(n, tau, eps, delta):
  xp = _xp.of(n, tau, eps, delta)
  fail = _row_fail_fn(n, tau, eps, xp.log(delta))
  # The first m with fail(m) <= delta; as in Theorem 1, no monotonicity assumed.
  m = _first_admissible_m(n, fail, delta, 0)
  k = xp.where(n <= 1.0, n, m)
  ok = _valid(n >= 1, tau >= 0, eps > 0, eps < 1, delta > 0, delta < 1)
  return (xp.where(ok, k, xp.nan),)


_ROW = PointFormula(_row_scalar)


def row_sparsity_bound(
  n: ArrayLike, tau: ArrayLike, *, eps: ArrayLike, delta: ArrayLike
) -> jax.Array:
  """Theorem 1R: a k such that row i is (eps, k)-sparse with probability `>= 1 - delta` given tau_i.

  Conditional on the query row `x_i` (so on `tau_i = sigma ||M^T x_i||`), the
  `n - 1` off-diagonal scores are i.i.d. `N(0, tau_i^2)` (Lemma G); the
  returned k bounds the number of entries above `eps` (the diagonal counted as
  one possible entry, whatever its value) except with conditional probability
  `delta`. For every row of a matrix at once, pass `delta / n` and take a union
  bound.

  Args:
    n: sequence length (integer-valued, >= 1).
    tau: the row's score scale `sigma ||M^T x_i||` (>= 0).
    eps: threshold in (0, 1).
    delta: conditional failure probability in (0, 1).

  Returns:
    Integer-valued k (float), broadcast over the arguments.
  """
  _check_n(n)
  _check("tau", tau, lo=0)
  _check_eps(eps)
  _check_delta(delta)
  (k,) = _on_flat(_ROW, (n, tau, eps, delta))
  return k
