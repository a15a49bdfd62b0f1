"""Theorem 2 (the top-k error of every row) and the value-norm bound (docs/theory.md, section 4)."""

from __future__ import annotations

from typing import NamedTuple

import jax
from jax.typing import ArrayLike

from gsparse.bounds import _xp
from gsparse.bounds._common import (
  _NUM_LEVELS,
  DEFAULT_DELTA,
  PointFormula,
  _binom_max_p,
  _binom_min_p,
  _check,
  _check_delta,
  _check_n,
  _log1mexp,
  _log_moments,
  _norm_isf,
  _on_flat,
  _valid,
)
from gsparse.bounds.norms import InteractionNorms, _norm_fields
from gsparse.bounds.row_tail import _row_tail_scalar
from gsparse.bounds.tau import _cells, _quad_form_range, _tau_range_point


def value_norm_bound(
  n: ArrayLike, sigma: ArrayLike, value_norms: InteractionNorms, *, delta: ArrayLike
) -> jax.Array:
  """Bound on `max_j ||v_j||`, `v_j = W_V^T x_j`, holding with probability `>= 1 - delta`.

  `||v_j||^2 = sigma^2 g^T W_V W_V^T g`; Laurent-Massart upper tail with
  `x = log(n / delta)` and a union bound over the `n` rows.

  Args:
    n: number of rows.
    sigma: input standard deviation.
    value_norms: `interaction_norms(W_V)` for one head's `W_V` `[d, h_v]`.
    delta: failure probability.

  Returns:
    The bound, broadcast over the arguments.
  """
  _check_n(n)
  _check("sigma", sigma, lo=0, lo_open=True)
  _check_delta(delta)
  frob, op, gram = _norm_fields(value_norms)
  (out,) = _on_flat(_VALUE_NORM, (n, sigma, frob, op, gram, delta))
  return out


def _value_norm_point(n, sigma, frob, op, gram, delta):
  xp = _xp.of(n, sigma, frob, op, gram, delta)
  _, hi2 = _quad_form_range(sigma * sigma, frob, op, gram, xp.log(n / delta))
  return (xp.sqrt(hi2),)


_VALUE_NORM = PointFormula(_value_norm_point)


class ErrorBound(NamedTuple):
  """Result of `topk_error_bound`.

  Attributes:
    error: with probability `>= 1 - delta`, every row's
      `||o_i - o_i^{(k)}||_2 <= error`.
    tail_mass: the bound on every row's tail mass `t_i` (in `[0, 1]`).
    value_norm: the bound on `max_j ||v_j||` used (or the one given).
  """

  error: jax.Array
  tail_mass: jax.Array
  value_norm: jax.Array


def _tail_core(n, tau_lo, tau_hi, k, log_drow):
  """Log bound on every row's top-k tail mass, per-row failure `exp(log_drow)` given tau in range.

  Conditions on `G`, the k-th largest off-diagonal standardised score
  (docs/theory.md, Theorem 2, steps 1-3): `G` lies in `[c_lo, c_hi]` (binomial quantiles,
  half of the budget), the `n - 1 - k` scores below it are i.i.d. truncated
  normals whose exponential sum is bounded above by Bernstein (a quarter), and
  the largest of the `k - 1` above it exceeds `G` by at least `Delta` (a
  quarter). Then `t <= x / (x + y)` with `x = e^{tau G} + T_rest` and
  `y = (k - 2) e^{tau G} + e^{tau (G + Delta)}`.
  """
  xp = _xp.of(n, tau_lo, tau_hi, k, log_drow)
  dt = tau_hi.dtype
  nm1 = xp.maximum(n - 1.0, 1.0)
  ta, tb = _cells(tau_lo, tau_hi)
  drow = xp.exp(log_drow)
  d_side = 0.25 * drow
  d_rest = 0.25 * drow
  d_top = 0.25 * drow
  kk = xp.clip(k, 2.0, nm1)
  c_hi = _norm_isf(_binom_max_p(nm1, kk, d_side))
  c_lo = _norm_isf(_binom_min_p(nm1, kk, d_side))
  u = xp.linspace(0.0, 1.0, _NUM_LEVELS + 1, dtype=dt)
  grid = c_lo + u * (c_hi - c_lo)
  c1 = grid[:-1][None, :]  # [1, G]
  c2 = grid[1:][None, :]
  ta_, tb_ = ta[:, None], tb[:, None]  # [C, 1]
  ninf = xp.asarray(-xp.inf, dt)
  # Rest: n - 1 - k scores with g < c2, coupled to W = e^{tb g} (g > 0), e^{ta g} (g <= 0).
  cnt = xp.maximum(nm1 - kk, 0.0)
  lo_part = xp.minimum(c2, 0.0)
  hi_part = xp.maximum(c2, 0.0)
  m1n, m1p, m2n, m2p = _log_moments(
    [
      (ta_, ninf, lo_part),
      (tb_, 0.0, hi_part),
      (2.0 * ta_, ninf, lo_part),
      (2.0 * tb_, 0.0, hi_part),
    ]
  )
  lphi = xp.log_ndtr(c2)
  ell = -xp.log(d_rest)
  log_cnt = xp.log(xp.maximum(cnt, 1e-30))
  lb = tb_ * hi_part + ta_ * lo_part
  rest = xp.stack(
    xp.broadcast_arrays(
      log_cnt + xp.logaddexp(m1n, m1p) - lphi,
      0.5 * (xp.log(2.0 * ell) + log_cnt + xp.logaddexp(m2n, m2p) - lphi),
      lb + xp.log(ell / 3.0),
    )
  )
  log_rest = xp.where(cnt > 0, xp.logsumexp(rest, axis=0), -xp.inf)
  log_g_up = xp.maximum(ta_ * c2, tb_ * c2)  # e^{tau G} <= this
  log_x = xp.logaddexp(log_g_up, log_rest)
  # Top: P(max of k-1 scores above G < G + Delta | G = c) <= d_top.
  log_rho = _log1mexp(xp.log(d_top) / xp.maximum(kk - 1.0, 1.0))
  top = _norm_isf(xp.exp(log_rho + xp.log_ndtr(-c1)))  # c + Delta at c = c1
  log_g_lo = xp.minimum(ta_ * c1, tb_ * c1)
  log_top = xp.minimum(ta_ * top, tb_ * top)
  log_km2 = xp.log(xp.maximum(kk - 2.0, 1e-30))
  log_y = xp.where(kk > 2.0, xp.logaddexp(log_km2 + log_g_lo, log_top), log_top)
  log_t = log_x - xp.logaddexp(log_x, log_y)
  log_t = xp.max(log_t)
  return xp.where(k < 2.0, 0.0, xp.minimum(log_t, 0.0))


def topk_error_bound(
  n: ArrayLike,
  sigma: ArrayLike,
  norms: InteractionNorms,
  *,
  k: ArrayLike,
  value_norms: InteractionNorms | None = None,
  value_norm: ArrayLike | None = None,
  delta: ArrayLike = DEFAULT_DELTA,
) -> ErrorBound:
  """Theorem 2: with prob `>= 1 - delta`, the top-k output error of every row.

  With `t_i` the softmax mass outside the k largest scores of row i,
  `||o_i - o_i^{(k)}|| = t_i ||mu_tail - mu_head|| <= 2 t_i max_j ||v_j||`
  (exact identity, docs/theory.md Lemma 1). The tail mass is bounded by
  conditioning on the k-th largest off-diagonal score: the smaller of the
  per-row bound (Theorem 2R) at the lower end of the tau range, which bounds
  every larger tau too (Lemma M), a cell-wise bound over the range, and the
  free `1 - k/n` (docs/theory.md, Theorem 2).

  Failure-probability split: `delta / 4` for the tau interval, `delta / 2` for
  the rows (`delta / (2 n)` each: half for where the k-th largest score lies,
  a quarter for the sum below it, a quarter for the largest score above it),
  and `delta / 4` for `max_j ||v_j||` from `value_norms` (unused, so the
  statement is conservative, when a deterministic `value_norm` is given).

  Args:
    n: sequence length (integer-valued, >= 1).
    sigma: input standard deviation (> 0).
    norms: `InteractionNorms` of `M`.
    k: number of kept keys per row (integer-valued, >= 1).
    value_norms: `interaction_norms(W_V)` (one head), used when `value_norm`
      is None.
    value_norm: a known bound on `max_j ||v_j||` (e.g. from the data).
    delta: failure probability in (0, 1).

  Returns:
    `ErrorBound(error, tail_mass, value_norm)`.
  """
  _check_n(n)
  _check("sigma", sigma, lo=0, lo_open=True)
  _check("k", k, lo=1, integer=True)
  _check_delta(delta)
  frob, op, gram = _norm_fields(norms)
  if (value_norms is None) == (value_norm is None):
    raise ValueError("exactly one of value_norms and value_norm must be given")
  if value_norm is not None:
    _check("value_norm", value_norm, lo=0)
    vf = vo = vg = 0.0
    vn = value_norm
  else:
    vf, vo, vg = _norm_fields(value_norms)
    vn = 0.0
  values = (n, sigma, k, delta, frob, op, gram, vf, vo, vg, vn)
  return ErrorBound(*_on_flat(_ERROR, values, given=value_norm is not None))


def _error_scalar(n, sigma, k, delta, frob, op, gram, vf, vo, vg, vn, *, given):
  xp = _xp.of(n, sigma, k, delta, frob, op, gram, vf, vo, vg, vn)
  dpart = delta / 4.0
  tlo, thi = _tau_range_point(n, sigma, frob, op, gram, dpart)
  log_row = xp.log(2.0 * dpart) - xp.log(n)
  # Theorem 2: the better of Theorem 2R at tau_lo (the tail bound R of its proof is
  # pathwise non-increasing in tau) and the cell-wise core; both fixed before the data.
  (t_row,) = _row_tail_scalar(n, tlo, k, xp.exp(log_row))
  t = xp.minimum(xp.exp(_tail_core(n, tlo, thi, k, log_row)), t_row)
  t = xp.where(k >= n, 0.0, xp.minimum(t, 1.0 - xp.minimum(k, n) / n))  # top-k holds >= k/n
  if given:
    vmax = vn
  else:
    _, hi2 = _quad_form_range(sigma * sigma, vf, vo, vg, xp.log(n / dpart))
    vmax = xp.sqrt(hi2)
  ok = _valid(n >= 1, sigma > 0, k >= 1, delta > 0, delta < 1, frob >= 0, op >= 0, gram >= 0)
  ok = ok & (vn >= 0) & (vf >= 0) & (vo >= 0) & (vg >= 0)
  nan = xp.asarray(xp.nan, n.dtype)
  err = 2.0 * t * vmax
  return xp.where(ok, err, nan), xp.where(ok, t, nan), xp.where(ok, vmax, nan)


_ERROR = PointFormula(_error_scalar, static=("given",))
