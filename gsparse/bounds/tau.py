"""The range of the row scales `tau_i = sigma ||M^T x_i||` (docs/theory.md, Lemma 2)."""

from __future__ import annotations

from typing import NamedTuple

import jax
from jax.typing import ArrayLike

from gsparse.bounds import _xp
from gsparse.bounds._common import (
  _FIRST_CELL_FRACTION,
  _NUM_CELLS,
  DEFAULT_DELTA,
  PointFormula,
  _check,
  _check_delta,
  _check_n,
  _on_flat,
)
from gsparse.bounds.norms import InteractionNorms, _norm_fields


class TauRange(NamedTuple):
  """An interval `[lo, hi]` that holds every `tau_i` with probability `>= 1 - delta`."""

  lo: jax.Array
  hi: jax.Array


@_xp.memo_scalar  # on Python numbers `c` depends on n, delta and the norms' ratio, not sigma
def _solve_w_minus_log_w(c, upper):
  """Root `w` of `w - log w = c` (`c >= 1`) with `w <= 1` (`upper=False`) or `w >= 1`."""
  xp = _xp.of(c)
  c = xp.maximum(c, 1.0)
  lo = xp.where(upper, xp.zeros_like(c), -c - 1.0)
  hi = xp.where(upper, c + 1.0, xp.zeros_like(c))
  if xp is _xp.NP and lo.ndim == 0 and _xp.NP.ndim(upper) == 0:
    return _np_solve_scalar(c, bool(upper), lo[()], hi[()])

  def body(_, state):
    lo, hi = state
    mid = 0.5 * (lo + hi)
    f = xp.exp(mid) - mid - c  # decreasing on v < 0, increasing on v > 0
    go_right = xp.where(upper, f < 0, f > 0)
    return xp.where(go_right, mid, lo), xp.where(go_right, hi, mid)

  lo, hi = xp.fori_loop(0, 64, body, (lo, hi))
  # Round outwards: the lower root down, the upper root up.
  return xp.exp(xp.where(upper, hi, lo))


def _np_solve_scalar(c, upper, lo, hi):
  """`_solve_w_minus_log_w` at one NumPy point: the same 64 steps on scalars, in Python."""
  for _ in range(64):
    mid = 0.5 * (lo + hi)
    f = _xp.NP.exp(mid) - mid - c
    if (f < 0) if upper else (f > 0):
      lo = mid
    else:
      hi = mid
  return _xp.NP.exp(hi if upper else lo)


def _quad_form_range(sigma2, frob, op, gram, x):
  """Interval for `sigma2 * g^T A g`, `A = M M^T`, each side failing w.p. `<= e^{-x}`.

  The better (deterministically chosen) of Laurent-Massart (needs `||M||_F`,
  `||M M^T||_F`, `||M||_op`) and the effective-rank Chernoff bound
  (`r = ||M||_F^2 / ||M||_op^2`, docs/theory.md Lemma 2).
  """
  xp = _xp.of(sigma2, frob, op, gram, x)
  mean = frob * frob
  op2 = op * op
  up_lm = mean + 2.0 * gram * xp.sqrt(x) + 2.0 * op2 * x
  lo_lm = xp.maximum(mean - 2.0 * gram * xp.sqrt(x), 0.0)
  r = mean / xp.where(op2 > 0, op2, 1.0)
  c = 1.0 + 2.0 * x / xp.where(r > 0, r, 1.0)
  up_ch = mean * _solve_w_minus_log_w(c, True)
  # Lower side: the two-moment rank r2 = (tr A)^2 / ||A||_F^2 >= r (docs/theory.md, Lemma 2).
  r2 = mean * mean / xp.where(gram > 0, gram * gram, 1.0)
  c2 = 1.0 + 2.0 * x / xp.where(r2 > 0, xp.maximum(r2, r), 1.0)
  lo_ch = mean * _solve_w_minus_log_w(c2, False)
  up = xp.where(op2 > 0, xp.minimum(up_lm, up_ch), 0.0)
  lo = xp.where(op2 > 0, xp.maximum(lo_lm, lo_ch), 0.0)
  return sigma2 * lo, sigma2 * up


def tau_range(
  n: ArrayLike, sigma: ArrayLike, norms: InteractionNorms, *, delta: ArrayLike = DEFAULT_DELTA
) -> TauRange:
  """Interval holding all `n` row scales `tau_i = sigma ||M^T x_i||` with prob `>= 1 - delta`.

  `tau_i^2 = sigma^4 g^T M M^T g` with `g ~ N(0, I_d)`; the Laurent-Massart
  inequality with `x = log(2 n / delta)` on each side and a union bound over
  the rows (docs/theory.md, Lemma 2).

  Args:
    n: number of rows (>= 1).
    sigma: input standard deviation (> 0).
    norms: `InteractionNorms` of `M`.
    delta: total failure probability in (0, 1).

  Returns:
    `TauRange(lo, hi)`.
  """
  _check_n(n)
  _check("sigma", sigma, lo=0, lo_open=True)
  _check_delta(delta)
  frob, op, gram = _norm_fields(norms)
  return TauRange(*_on_flat(_TAU_RANGE, (n, sigma, frob, op, gram, delta)))


def _cells(tau_lo, tau_hi):
  """`[C]` cell endpoints covering `[tau_lo, tau_hi]`: one small first cell, then geometric."""
  xp = _xp.of(tau_lo, tau_hi)
  start = xp.maximum(tau_lo, _FIRST_CELL_FRACTION * tau_hi)
  start = xp.maximum(start, xp.finfo(tau_hi.dtype).tiny)
  hi_safe = xp.maximum(tau_hi, start)
  u = xp.linspace(0.0, 1.0, _NUM_CELLS, dtype=tau_hi.dtype)
  geo = start * xp.exp(u * (xp.log(hi_safe) - xp.log(start)))  # [C]
  a = xp.concatenate([tau_lo[..., None], geo[..., :-1]], axis=-1)
  b = xp.concatenate([start[..., None], geo[..., 1:]], axis=-1)
  b = xp.maximum(a, b)
  return a, b


def _tau_range_point(n, sigma, frob, op, gram, delta):
  """`(lo, hi)` of `tau_range` at one point (Lemma 2 with `x = log(2 n / delta)`)."""
  xp = _xp.of(n, sigma, frob, op, gram, delta)
  lo2, hi2 = _quad_form_range(sigma**4, frob, op, gram, xp.log(2.0 * n / delta))
  return xp.sqrt(lo2), xp.sqrt(hi2)


_TAU_RANGE = PointFormula(_tau_range_point)
