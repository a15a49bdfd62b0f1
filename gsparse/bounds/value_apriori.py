"""Theorem 2V: an a-priori top-k error bound, value factor from isotropy (docs/theory.md, 4.2).

Theorem 2 bounds every row's error by `2 t_bar max_j ||v_j||`. Here the error
`sum_j omega_j v_j` (`omega = t w`, Lemma V's signed weights times the tail
mass) is split, given `x_i` and the standardised scores `g`, into the
diagonal's own value, a part along `W_V^T u` and a Gaussian part independent of
the scores (Lemma V), and each factor is bounded before any score or value is
seen: the tail mass by Theorem 2R on cells of the tau range, the head's
concentration and the tilted score means by order statistics of `g`, and the
diagonal jointly with the tail through its head share `theta`.
"""

from __future__ import annotations

from typing import NamedTuple

import jax
from jax.typing import ArrayLike

from gsparse.bounds import _xp
from gsparse.bounds._common import (
  _MARGIN_DTYPE,
  DEFAULT_DELTA,
  PointFormula,
  _binom_max_p,
  _binom_min_p,
  _check,
  _check_delta,
  _check_n,
  _norm_isf,
  _on_flat,
  _valid,
)
from gsparse.bounds._iso_cases import _cell_base
from gsparse.bounds._iso_events import log_tail_sum_hi, peeled_levels, tail_mean_floor
from gsparse.bounds._iso_grid import _grid_error
from gsparse.bounds.norms import InteractionNorms, _norm_fields
from gsparse.bounds.row_tail import _row_tails
from gsparse.bounds.tau import _quad_form_range, _tau_range_point

_NUM_TAU_CELLS = 4  # geometric cells of the tau range, Theorem 2R at each left end
_TAU_SUBCELLS = 24  # finer cells in each, for the head and the absolute tail sum
_NUM_THETA_CELLS = 64  # cells of the diagonal's head share theta in [0, 1]
_NUM_G1_CELLS = 48  # cells of the largest off-diagonal standardised score in [c_lo, g1_hi]


class IsotropicErrorBound(NamedTuple):
  """Result of `isotropic_error_bound` (all broadcast over the arguments).

  Attributes:
    error: with probability `>= 1 - delta`, every row's `||o_i - o_i^{(k)}||_2 <= error`.
    tail_mass: the bound on every row's tail mass (Theorem 2R at the lower end of the
      tau range, at most `1 - k/n`).
    value_norm: the bound `V` on `max_j ||v_j||` (it bounds the diagonal's own value).
    diag_part: at the worst (tau cell, diagonal case) of the isotropic sum (before
      the minimum with Theorem 2's `2 t V`), the diagonal's term `|omega_i| V`.
    mean_part: there, the along-`W_V^T u` term `sigma |sum_j omega_j g_j| ||W_V||_op`.
    gauss_part: there, the Gaussian term `sqrt(sum_{j != i} omega_j^2) U`.
  """

  error: jax.Array
  tail_mass: jax.Array
  value_norm: jax.Array
  diag_part: jax.Array
  mean_part: jax.Array
  gauss_part: jax.Array


def isotropic_error_bound(
  n: ArrayLike,
  sigma: ArrayLike,
  norms: InteractionNorms,
  *,
  value_norms: InteractionNorms,
  k: ArrayLike,
  delta: ArrayLike = DEFAULT_DELTA,
  with_theorem2: bool = True,
) -> IsotropicErrorBound:
  """Theorem 2V: with prob `>= 1 - delta`, every row's top-k error, a-priori.

  Same statement and inputs as `topk_error_bound` with `value_norms`, but the
  value factor `2 max_j ||v_j||` is replaced by Lemma V's split, each factor
  bounded before any score or value is seen (docs/theory.md, section 4.2);
  never larger than Theorem 2 at the same tail bound (its `2 t V` is kept per
  tau cell as a fallback on the same event).

  Failure-probability split: `delta / 4` for the tau range, `delta / 4` for
  `max_j ||v_j|| <= V`, and `delta / (2 n)` per row: half for the tail mass
  (Theorem 2R), an eighth each for the largest standardised score, the k-th
  largest (both sides), the tail's score sums (a sixteenth for the floor on its
  tilted mean, a sixteenth for its absolute sum), and the Gaussian part (a
  sixteenth for its norm, a sixteenth for its projection on the fixed part,
  each spread over the cells of the largest score by their exact probabilities,
  as the Gaussian part is independent of the scores; where one level for every
  cell gives the smaller bound, that is used: a choice fixed by the arguments).

  Rounding: concrete arguments (at most 256 points after broadcasting) are rounded
  to the default float dtype, evaluated in float64 with NumPy, and `error`,
  `tail_mass` and `value_norm` are rounded up to that dtype: the bound for the
  rounded inputs. Traced arguments (jit, vmap, grad) and more than 256 points are
  evaluated in the default dtype (float32 unless x64) and not rounded up (they
  agree with the NumPy path to about 1e-5 relative in float32).

  Args:
    n: sequence length (integer-valued, >= 1).
    sigma: input standard deviation (> 0).
    norms: `interaction_norms(M)`.
    value_norms: `interaction_norms(W_V)` for one head's `W_V` `[d, h_v]`.
    k: kept keys per row (integer-valued, >= 1).
    delta: failure probability in (0, 1).
    with_theorem2: keep Theorem 2's `2 t V` per tau cell where it is smaller
      (both hold on the same event). False returns the isotropic sum alone,
      which is what the Monte Carlo tests check.

  Returns:
    `IsotropicErrorBound(error, tail_mass, value_norm, diag_part, mean_part, gauss_part)`.
  """
  _check_n(n)
  _check("sigma", sigma, lo=0, lo_open=True)
  _check("k", k, lo=1, integer=True)
  _check_delta(delta)
  frob, op, gram = _norm_fields(norms)
  vf, vo, vg = _norm_fields(value_norms)
  if not isinstance(with_theorem2, bool):
    raise TypeError(f"with_theorem2 must be a bool, got {with_theorem2!r}")
  values = (n, sigma, k, delta, frob, op, gram, vf, vo, vg)
  return IsotropicErrorBound(*_on_flat(_ISO, values, with_theorem2=with_theorem2))


@_xp.memo_scalar  # on Python numbers: depends on n, k and delta, not on sigma or the norms
def _order_stats(n, k, d_one, d_k, d_sum):
  """Bounds on the standardised off-diagonal scores `g` of one row (each failing w.p. as given).

  Returns `(g1_hi, c_lo, c_hi, et_lo, g2_hi)`: `g_(1) <= g1_hi`, `g_(2) <= g2_hi` (half
  of `d_one` each); the k-th largest in
  `[c_lo, c_hi]`; the plain mean of the scores outside the top `m` (`m = k - 1`
  or `k`) at least `et_lo`. For that: the tail's sum is at least
  `sum_j min(g_j, c_lo) - m c_lo` (every top score is `>= c_lo`), and
  `sum_j min(g_j, c_lo)`, a sum of `n - 1` i.i.d. 1-Lipschitz images of
  `N(0, 1)`, is at least its mean minus `sqrt(2 (n - 1) log(1/d_sum))`.
  """
  xp = _xp.of(n, k, d_one, d_k, d_sum)
  nm1 = xp.maximum(n - 1.0, 1.0)
  g1_hi = _norm_isf(0.5 * d_one / nm1)
  g2_hi = _norm_isf(_binom_max_p(nm1, xp.minimum(2.0, nm1), 0.5 * d_one))
  c_lo = _norm_isf(_binom_min_p(nm1, k, 0.5 * d_k))
  c_hi = _norm_isf(_binom_max_p(nm1, k, 0.5 * d_k))
  mean_min = c_lo * xp.ndtr(-c_lo) - xp.exp(-0.5 * c_lo * c_lo) / xp.sqrt(2.0 * xp.pi)
  low = nm1 * mean_min - xp.sqrt(2.0 * nm1 * xp.log(1.0 / d_sum))
  low = xp.minimum(low - k * c_lo, low - (k - 1.0) * c_lo)
  cnt = xp.maximum(nm1 - k, 1.0)
  et_lo = xp.minimum(low / cnt, low / (cnt + 1.0))
  return g1_hi, c_lo, c_hi, et_lo, g2_hi


def _iso_scalar(n, sigma, k, delta, frob, op, gram, vf, vo, vg, *, with_theorem2):
  """`isotropic_error_bound` at one point: the events' bounds, the grid, its worst cell."""
  xp = _xp.of(n, sigma, k, delta, frob, op, gram, vf, vo, vg)
  dt = sigma.dtype
  dpart = 0.25 * delta
  tlo, thi = _tau_range_point(n, sigma, frob, op, gram, dpart)
  s2 = sigma * sigma
  vmax = xp.sqrt(_quad_form_range(s2, vf, vo, vg, xp.log(n / dpart))[1])
  drow = 2.0 * dpart / n  # delta / (2 n) per row
  d8, d16 = drow / 8.0, drow / 16.0
  kk = xp.clip(k, 2.0, xp.maximum(n - 1.0, 2.0))
  stats = _order_stats(n, kk, d8, d8, d16)
  g1_hi, c_lo, c_hi, _, _ = stats
  # Tau cells [a, b]: Theorem 2R at the left end of each coarse cell (Lemma M), shared by
  # its finer sub-cells, where the head (at b) and the absolute tail sum (at a) are bounded.
  a, b = _tau_cells(tlo, thi, dt)
  a_coarse = a[::_TAU_SUBCELLS]
  t_row = _row_tails(n, a_coarse, kk, 0.5 * drow)
  t_row = xp.repeat(t_row, _TAU_SUBCELLS)
  # t_c bounds R (the share of the n - k smallest of n - 1 off-diagonal terms, at most
  # (n - k)/(n - 1)); the tail mass t is also at most 1 - k/n (docs/theory.md 4.2, event (i)).
  kn = xp.minimum(k, n)
  t_c = xp.minimum(t_row, (n - kn) / xp.maximum(n - 1.0, 1.0))[:, None, None]  # [C, 1, 1]
  t_free = 1.0 - kn / n
  l_t = log_tail_sum_hi(n, a, b, c_hi, d16)[:, None, None]
  # The tilted tail mean's floor per tau cell (event (iii): one of two kinds, fixed by the cell).
  et = tail_mean_floor(n, kk, a, c_lo, c_hi, stats[3], d16)[:, None, None]
  stats = (*stats[:3], et, stats[4])
  a, b = a[:, None, None], b[:, None, None]
  th = xp.linspace(0.0, 1.0, _NUM_THETA_CELLS + 1, dtype=dt)[None, :, None]
  gam = c_lo + xp.linspace(0.0, 1.0, _NUM_G1_CELLS + 1, dtype=dt) * xp.maximum(g1_hi - c_lo, 0.0)
  gam = xp.concatenate([gam[:-1], xp.maximum(g1_hi, c_lo)[None]])  # the last edge is g1_hi
  gam = gam[None, None, :]
  cap = 2.0 * xp.minimum(t_c[:, 0, 0], t_free) * vmax  # Theorem 2's 2 t V on the same events
  grid = (_cell_base(a, b, t_c, l_t, stats, kk, gam, t_free), stats, kk, th)
  grid = (*grid, cap if with_theorem2 else None)
  scal = (sigma, s2, vf, vo, vg, vmax, t_free)
  # (v), (vi) at a level per cell of g_(1) (the Gaussian part is independent of g given x_i)
  # or at the single level d16: the smaller bound is kept (a choice fixed by the arguments).
  lvl = peeled_levels(n, gam, d16)
  err, split, g_at = _grid_error(grid, scal, lvl, None)
  if g_at is not None and lvl[0, 0, g_at] >= d16:
    err_1, split_1 = xp.inf, split  # NumPy: the single level cannot give less (`_grid_error`)
  else:
    err_1, split_1, _ = _grid_error(grid, scal, xp.full_like(lvl, d16), err)
  keep = err <= err_1
  split = [xp.where(keep, p, p_1) for p, p_1 in zip(split, split_1, strict=True)]
  return _finish(
    n,
    k,
    xp.where(keep, err, err_1),
    xp.minimum(xp.max(t_c), t_free),
    vmax,
    split,
    (delta, frob, op, gram, vf, vo, vg),
  )


def _tau_cells(tlo, thi, dt):
  """`(a, b)` `[C]`: the fine tau cells' ends, geometric from `max(tlo, 1e-3 thi)` to `thi`.

  The first cell starts at `tlo` itself, so the cells cover the whole tau range.
  """
  xp = _xp.of(tlo, thi)
  fine = _NUM_TAU_CELLS * _TAU_SUBCELLS
  u = xp.linspace(0.0, 1.0, fine + 1, dtype=dt)
  lo = xp.maximum(tlo, 1e-3 * thi)
  edges = lo * xp.exp(u * (xp.log(xp.maximum(thi, lo)) - xp.log(lo)))
  a = xp.concatenate([tlo[None], edges[1:-1]])
  # The last edge is thi itself: exp(log(thi) - log(lo)) * lo may round below it.
  b = xp.concatenate([edges[1:-1], xp.maximum(thi, lo)[None]])
  return a, b


def _finish(n, k, err, t_bound, vmax, split, rest):
  """Special cases (`k >= n`: nothing dropped; `k = 1`: the free bound); NaN where invalid."""
  xp = _xp.of(n, k, err, t_bound, vmax)
  small_k = k < 2.0
  t_free = 1.0 - xp.minimum(k, n) / n
  err = xp.where(k >= n, 0.0, xp.where(small_k, 2.0 * t_free * vmax, err))
  t_bound = xp.where(k >= n, 0.0, xp.where(small_k, t_free, t_bound))
  delta, frob, op, gram, vf, vo, vg = rest
  ok = _valid(n >= 1, k >= 1, delta > 0, delta < 1, frob >= 0, op >= 0, gram >= 0)
  ok = ok & (vf >= 0) & (vo >= 0) & (vg >= 0) & xp.isfinite(vmax)
  nan = xp.asarray(xp.nan, err.dtype)
  bounds = tuple(_round_up(xp.where(ok, o, nan)) for o in (err, t_bound, vmax))
  return (*bounds, *(xp.where(ok, o, nan) for o in split))


def _round_up(x):
  """`x` on the grid of the output dtype, rounded toward `+inf` (a bound must not round down).

  NumPy evaluates in float64 and `_on_flat` casts to the default dtype (float32 unless
  x64), which rounds to nearest: here the float32 neighbour at or above `x` is chosen
  first, so that cast is exact. The jax path computes in the output dtype: no cast, no-op.
  """
  xp = _xp.of(x)
  target = _MARGIN_DTYPE.get() if xp is _xp.NP else None
  if target is None or xp.dtype(target) == x.dtype:
    return x
  y = x.astype(target)
  y = xp.where(y.astype(x.dtype) < x, xp.nextafter(y, xp.asarray(xp.inf, target)), y)
  return y.astype(x.dtype)


_ISO = PointFormula(_iso_scalar, static=("with_theorem2",))
