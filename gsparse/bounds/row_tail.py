"""Per-row top-k tail mass given the row's own tau_i (docs/theory.md, Theorem 2R).

The Theorem-1R method applied to Theorem 2's deterministic step: with `G` the
k-th largest off-diagonal standardised score, `t <= x / (x + Z_top)`,
`x = e^{tau G} + T_rest`, so `{t > t0}` needs
`t0 Z_top - (1 - t0) T_rest < (1 - t0) e^{tau G}`; one Chernoff bound with the
Laplace transform of the top sum and the moment generating function of the
rest, both bounded by upper Riemann sums.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from jax.scipy.special import betainc, log_ndtr, ndtr
from jax.typing import ArrayLike

from gsparse.bounds._common import (
  _check,
  _check_delta,
  _check_n,
  _log_phi_diff,
  _on_flat,
  _safety,
  _valid,
)
from gsparse.bounds.row import _FLOOR, _NUM_G_CELLS, _NUM_LAMBDA, _NUM_QUAD, _log_laplace_upper

_T0_STEPS = 22  # bisection steps on log(t0 / (1 - t0))


def _log_mgf_upper(log_mu, tau, lo, hi):
  """Upper bound on `log E[exp(mu e^{tau g}) 1{g <= hi}]`, `g ~ N(0, 1)`, `lo < hi` a floor.

  The integrand is increasing in g: on `[g_q, g_{q+1}]` it is at most its
  value at `g_{q+1}` times `phi`; below `lo` at most its value at `lo`.
  Shapes: `log_mu [..., K]`, `lo, hi [...]`; returns `[..., K]`.
  """
  u = jnp.linspace(0.0, 1.0, _NUM_QUAD + 1, dtype=hi.dtype)
  g = lo[..., None] + (hi - lo)[..., None] * u
  lw = _log_phi_diff(g[..., 1:], g[..., :-1])
  expo = jnp.exp(log_mu[..., :, None] + tau * g[..., None, 1:])
  below = jnp.exp(log_mu + tau * lo[..., None]) + log_ndtr(lo)[..., None]
  parts = jnp.concatenate([expo + lw[..., None, :], below[..., None]], axis=-1)
  return jax.nn.logsumexp(parts, axis=-1)


def _tail_fail(nm1, k, tau, t0, c):
  """Bound on `P(t > t0 | tau_i = tau)` (Theorem 2R), summed over the cells of G."""
  c1, c2 = c[:-1], c[1:]
  log_thr = jnp.log1p(-t0) + tau * c2  # (1 - t0) e^{tau c2}
  theta = jnp.linspace(-3.0, 9.0, _NUM_LAMBDA, dtype=c.dtype)
  log_lam = theta[None, :] - log_thr[:, None]  # [L, K]
  top = _log_laplace_upper(log_lam + jnp.log(t0), tau, c1, c1 + 10.0, True)
  top = top - log_ndtr(-c1)[:, None]
  lo = jnp.minimum(c2 - 1.0, _FLOOR)
  rest = _log_mgf_upper(log_lam + jnp.log1p(-t0), tau, lo, c2) - log_ndtr(c2)[:, None]
  log_b = jnp.exp(theta)[None, :] + (k - 1.0) * jnp.minimum(top, 0.0)
  log_b = log_b + (nm1 - k) * jnp.maximum(rest, 0.0)
  log_b = jnp.where(jnp.isnan(log_b), jnp.inf, log_b)  # inf * 0 in an overflowed MGF: no bound
  b = jnp.exp(jnp.minimum(jnp.min(log_b, axis=-1), 0.0))  # [L]
  # sum_l P(G in cell l) b_l with bt = running max from the right (non-increasing) and
  # F_l = P(G <= c_l) rounded up: F_0 + T_L + F_L bt_{L-1} + sum_l F_l (bt_{l-1} - bt_l).
  inv_safe = 1.0 / _safety(c.dtype)
  bt = jax.lax.cummax(b, axis=0, reverse=True)
  f = jnp.minimum(betainc(jnp.maximum(nm1 - k + 1.0, 1.0), k, ndtr(c)) * inv_safe, 1.0)
  t_top = jnp.minimum(betainc(k, jnp.maximum(nm1 - k + 1.0, 1.0), ndtr(-c[-1])) * inv_safe, 1.0)
  body = jnp.sum(f[1:-1] * (bt[:-1] - bt[1:]))
  return jnp.minimum(f[0] + t_top + f[-1] * bt[-1] + body, 1.0)


def _row_tail_scalar(n, tau, k, delta):
  nm1 = jnp.maximum(n - 1.0, 1.0)
  kk = jnp.clip(k, 2.0, nm1)
  u = jnp.linspace(0.0, 1.0, _NUM_G_CELLS + 1, dtype=tau.dtype)
  c = -3.0 + u * (jnp.sqrt(2.0 * jnp.log(nm1)) + 5.0)

  def ok(z):  # z = log(t0 / (1 - t0))
    return _tail_fail(nm1, kk, tau, jax.nn.sigmoid(z), c) <= delta

  def body(_, state):
    lo, hi = state
    mid = 0.5 * (lo + hi)
    good = ok(mid)
    return jnp.where(good, lo, mid), jnp.where(good, mid, hi)

  lo0 = jnp.asarray(-30.0, tau.dtype)
  hi0 = jnp.asarray(12.0, tau.dtype)
  _, hi = jax.lax.fori_loop(0, _T0_STEPS, body, (lo0, hi0))
  t = jnp.where(ok(hi), jax.nn.sigmoid(hi), 1.0)  # only a checked value is returned
  t = jnp.where(k >= n, 0.0, jnp.where(k < 2.0, 1.0, t))
  valid = _valid(n >= 1, tau >= 0, k >= 1, delta > 0, delta < 1)
  return (jnp.where(valid, t, jnp.nan),)


_row_tail_flat = jax.jit(jax.vmap(_row_tail_scalar))


def row_tail_bound(n: ArrayLike, tau: ArrayLike, *, k: ArrayLike, delta: ArrayLike) -> jax.Array:
  """Theorem 2R: a bound on row i's top-k tail mass holding w.p. `>= 1 - delta` given tau_i.

  Conditional on the query row `x_i` (so on `tau_i = sigma ||M^T x_i||`), with
  the diagonal score arbitrary. For every row at once pass `delta / n` (union
  bound); with Lemma 1 the top-k error of the row is at most the result times
  `||mu_tail - mu_head|| <= 2 max_j ||v_j||`. 1 for `k = 1` (not covered), 0
  for `k >= n`.

  Args:
    n: sequence length (integer-valued, >= 1).
    tau: the row's score scale (>= 0).
    k: kept keys (integer-valued, >= 1).
    delta: conditional failure probability in (0, 1).

  Returns:
    The tail-mass bound in `[0, 1]`, broadcast over the arguments.
  """
  _check_n(n)
  _check("tau", tau, lo=0)
  _check("k", k, lo=1, integer=True)
  _check_delta(delta)
  (t,) = _on_flat(_row_tail_flat, (n, tau, k, delta))
  return t
