"""Theorem 2 (the top-k error of every row) and the value-norm bound (docs/theory.md, section 4)."""

from __future__ import annotations

import functools
from typing import NamedTuple

import jax
import jax.numpy as jnp
from jax.scipy.special import log_ndtr
from jax.typing import ArrayLike

from gsparse.bounds._common import (
  _NUM_LEVELS,
  DEFAULT_DELTA,
  _binom_max_p,
  _binom_min_p,
  _check,
  _check_delta,
  _check_n,
  _float_dtype,
  _log1mexp,
  _log_moments,
  _norm_isf,
  _on_flat,
  _valid,
)
from gsparse.bounds.norms import InteractionNorms, _norm_fields
from gsparse.bounds.tau import _cells, _quad_form_range, _tau_range_scalar


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
  dtype = _float_dtype()
  n, sigma, delta, frob, op, gram = (
    jnp.asarray(v, dtype) for v in (n, sigma, delta, frob, op, gram)
  )
  return _value_norm_jit(n, sigma, frob, op, gram, delta)


@jax.jit
def _value_norm_jit(n, sigma, frob, op, gram, delta):
  _, hi2 = _quad_form_range(sigma * sigma, frob, op, gram, jnp.log(n / delta))
  return jnp.sqrt(hi2)


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
  dt = tau_hi.dtype
  nm1 = jnp.maximum(n - 1.0, 1.0)
  ta, tb = _cells(tau_lo, tau_hi)
  drow = jnp.exp(log_drow)
  d_side = 0.25 * drow
  d_rest = 0.25 * drow
  d_top = 0.25 * drow
  kk = jnp.clip(k, 2.0, nm1)
  c_hi = _norm_isf(_binom_max_p(nm1, kk, d_side))
  c_lo = _norm_isf(_binom_min_p(nm1, kk, d_side))
  u = jnp.linspace(0.0, 1.0, _NUM_LEVELS + 1, dtype=dt)
  grid = c_lo + u * (c_hi - c_lo)
  c1 = grid[:-1][None, :]  # [1, G]
  c2 = grid[1:][None, :]
  ta_, tb_ = ta[:, None], tb[:, None]  # [C, 1]
  ninf = jnp.asarray(-jnp.inf, dt)
  # Rest: n - 1 - k scores with g < c2, coupled to W = e^{tb g} (g > 0), e^{ta g} (g <= 0).
  cnt = jnp.maximum(nm1 - kk, 0.0)
  lo_part = jnp.minimum(c2, 0.0)
  hi_part = jnp.maximum(c2, 0.0)
  m1n, m1p, m2n, m2p = _log_moments(
    [
      (ta_, ninf, lo_part),
      (tb_, 0.0, hi_part),
      (2.0 * ta_, ninf, lo_part),
      (2.0 * tb_, 0.0, hi_part),
    ]
  )
  lphi = log_ndtr(c2)
  ell = -jnp.log(d_rest)
  log_cnt = jnp.log(jnp.maximum(cnt, 1e-30))
  lb = tb_ * hi_part + ta_ * lo_part
  rest = jnp.stack(
    jnp.broadcast_arrays(
      log_cnt + jnp.logaddexp(m1n, m1p) - lphi,
      0.5 * (jnp.log(2.0 * ell) + log_cnt + jnp.logaddexp(m2n, m2p) - lphi),
      lb + jnp.log(ell / 3.0),
    )
  )
  log_rest = jnp.where(cnt > 0, jax.nn.logsumexp(rest, axis=0), -jnp.inf)
  log_g_up = jnp.maximum(ta_ * c2, tb_ * c2)  # e^{tau G} <= this
  log_x = jnp.logaddexp(log_g_up, log_rest)
  # Top: P(max of k-1 scores above G < G + Delta | G = c) <= d_top.
  log_rho = _log1mexp(jnp.log(d_top) / jnp.maximum(kk - 1.0, 1.0))
  top = _norm_isf(jnp.exp(log_rho + log_ndtr(-c1)))  # c + Delta at c = c1
  log_g_lo = jnp.minimum(ta_ * c1, tb_ * c1)
  log_top = jnp.minimum(ta_ * top, tb_ * top)
  log_km2 = jnp.log(jnp.maximum(kk - 2.0, 1e-30))
  log_y = jnp.where(kk > 2.0, jnp.logaddexp(log_km2 + log_g_lo, log_top), log_top)
  log_t = log_x - jnp.logaddexp(log_x, log_y)
  log_t = jnp.max(log_t)
  return jnp.where(k < 2.0, 0.0, jnp.minimum(log_t, 0.0))


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
  conditioning on the k-th largest off-diagonal score (docs/theory.md,
  Theorem 2).

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
  dtype = _float_dtype()
  if value_norm is not None:
    _check("value_norm", value_norm, lo=0)
    vf = vo = vg = jnp.zeros((), dtype)
    vn = jnp.asarray(value_norm, dtype)
  else:
    vf, vo, vg = _norm_fields(value_norms)
    vn = jnp.zeros((), dtype)
  values = (n, sigma, k, delta, frob, op, gram, vf, vo, vg, vn)
  return ErrorBound(*_on_flat(_error_flat, values, given=value_norm is not None))


def _error_scalar(n, sigma, k, delta, frob, op, gram, vf, vo, vg, vn, *, given):
  dpart = delta / 4.0
  tlo, thi = _tau_range_scalar(n, sigma, frob, op, gram, dpart)
  log_row = jnp.log(2.0 * dpart) - jnp.log(n)
  log_t = _tail_core(n, tlo, thi, k, log_row)
  t = jnp.where(k >= n, 0.0, jnp.exp(log_t))
  if given:
    vmax = vn
  else:
    _, hi2 = _quad_form_range(sigma * sigma, vf, vo, vg, jnp.log(n / dpart))
    vmax = jnp.sqrt(hi2)
  ok = _valid(n >= 1, sigma > 0, k >= 1, delta > 0, delta < 1, frob >= 0, op >= 0, gram >= 0)
  ok = ok & (vn >= 0) & (vf >= 0) & (vo >= 0) & (vg >= 0)
  nan = jnp.asarray(jnp.nan, n.dtype)
  err = 2.0 * t * vmax
  return jnp.where(ok, err, nan), jnp.where(ok, t, nan), jnp.where(ok, vmax, nan)


@functools.partial(jax.jit, static_argnames=("given",))
def _error_flat(*args, given):
  return jax.vmap(functools.partial(_error_scalar, given=given))(*args)
