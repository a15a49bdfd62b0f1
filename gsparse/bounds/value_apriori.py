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
from gsparse.bounds.norms import InteractionNorms, _norm_fields
from gsparse.bounds.row_tail import _row_tail_scalar
from gsparse.bounds.tau import _quad_form_range, _tau_range_point

_NUM_TAU_CELLS = 4  # geometric cells of the tau range, Theorem 2R at each left end
_NUM_THETA_CELLS = 32  # cells of the diagonal's head share theta in [0, 1]


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
  value_norms: InteractionNorms,
  *,
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
  largest (both sides), the sum of all scores, and the Gaussian part (a
  sixteenth for its norm, a sixteenth for its projection on the fixed part).

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


def _order_stats(n, k, d_one, d_k, d_sum):
  """Bounds on the standardised off-diagonal scores `g` of one row (each failing w.p. as given).

  Returns `(g1_hi, c_lo, c_hi, et_lo)`: `g_(1) <= g1_hi`; the k-th largest in
  `[c_lo, c_hi]`; the plain mean of the scores outside the top `k - 1` (or `k`)
  at least `et_lo` (the sum of all `n - 1` is at least `-sqrt(2 (n - 1) log(1/d_sum))`).
  """
  xp = _xp.of(n, k, d_one, d_k, d_sum)
  nm1 = xp.maximum(n - 1.0, 1.0)
  g1_hi = _norm_isf(d_one / nm1)
  c_lo = _norm_isf(_binom_min_p(nm1, k, 0.5 * d_k))
  c_hi = _norm_isf(_binom_max_p(nm1, k, 0.5 * d_k))
  low = -xp.sqrt(2.0 * nm1 * xp.log(1.0 / d_sum)) - k * xp.maximum(g1_hi, 0.0)
  cnt = xp.maximum(nm1 - k, 1.0)
  et_lo = xp.minimum(low / cnt, low / (cnt + 1.0))
  return g1_hi, c_lo, c_hi, et_lo


def _max_abs_gap(et, eh, scale):
  """`max |e_t - scale e_h|` over the vertices `et = (lo, hi)`, `eh = (lo, hi)`, `scale` `[...]`."""
  xp = _xp.of(*et, *eh, scale)
  vals = [xp.abs(a - scale * b) for a in et for b in eh]
  return xp.maximum(xp.maximum(vals[0], vals[1]), xp.maximum(vals[2], vals[3]))


def _iso_scalar(n, sigma, k, delta, frob, op, gram, vf, vo, vg, *, with_theorem2):
  xp = _xp.of(n, sigma, k, delta, frob, op, gram, vf, vo, vg)
  dt = sigma.dtype
  dpart = 0.25 * delta
  tlo, thi = _tau_range_point(n, sigma, frob, op, gram, dpart)
  s2 = sigma * sigma
  vmax = xp.sqrt(_quad_form_range(s2, vf, vo, vg, xp.log(n / dpart))[1])
  drow = 2.0 * dpart / n  # delta / (2 n) per row
  d8 = drow / 8.0
  u_gauss = xp.sqrt(_quad_form_range(s2, vf, vo, vg, -xp.log(0.5 * d8))[1])
  cross = sigma * vo * _norm_isf(0.5 * d8)  # a . G <= ||a|| sqrt(q) cross
  kk = xp.clip(k, 2.0, xp.maximum(n - 1.0, 2.0))
  g1_hi, c_lo, c_hi, et_lo = _order_stats(n, kk, d8, d8, d8)
  et, eh = (et_lo, c_hi), (c_lo, g1_hi)
  # Tau cells [a, b]: Theorem 2R at a (Lemma M), head concentration at b.
  u = xp.linspace(0.0, 1.0, _NUM_TAU_CELLS + 1, dtype=dt)
  lo = xp.maximum(tlo, 1e-3 * thi)
  edges = lo * xp.exp(u * (xp.log(xp.maximum(thi, lo)) - xp.log(lo)))
  a = xp.concatenate([tlo[None], edges[1:-1]])
  b = edges[1:]
  t_row = jax.vmap(_row_tail_scalar, in_axes=(None, 0, None, None))(n, a, kk, 0.5 * drow)[0]
  t_c = xp.minimum(t_row, 1.0 - xp.minimum(k, n) / n)[:, None]  # [C, 1]
  spread = xp.maximum(g1_hi - c_lo, 0.0)
  f_c = (1.0 / (1.0 + (kk - 2.0) * xp.exp(-b * spread)))[:, None]  # sum r'^2 <= r'_max
  th = xp.linspace(0.0, 1.0, _NUM_THETA_CELLS + 1, dtype=dt)
  th1, th2 = th[:-1][None, :], th[1:][None, :]  # [1, L]

  def t_part(tm):  # max of t (1 - t) over t in [0, tm]
    return xp.where(tm <= 0.5, tm * (1.0 - tm), 0.25)

  # Diagonal in the head with share theta: t <= tm(theta) (off-diagonal tail share <= t_c).
  tm = t_c * (1.0 - th1) / xp.maximum(t_c * (1.0 - th1) + 1.0 - t_c, 1e-30)
  q_head = t_part(tm) * (1.0 - th1) / (kk - 1.0) + tm * tm * (1.0 - th1) ** 2 * f_c
  gap_head = xp.maximum(_max_abs_gap(et, eh, 1.0 - th1), _max_abs_gap(et, eh, 1.0 - th2))
  parts_head = (tm * th2 * vmax, sigma * vo * tm * gap_head, xp.sqrt(q_head) * u_gauss)
  # Diagonal in the tail: p_i <= min(t, (1 - t) / k).
  pd = xp.minimum(t_c, 1.0 / (kk + 1.0))
  q_tail = t_part(t_c) / kk + t_c * t_c * f_c
  gap_tail = t_c * _max_abs_gap(et, eh, 1.0) + pd * xp.maximum(xp.abs(et_lo), xp.abs(c_hi))
  parts_tail = (pd * vmax, sigma * vo * gap_tail, xp.sqrt(q_tail) * u_gauss)
  parts = [
    xp.concatenate(xp.broadcast_arrays(ph, pt), axis=1)
    for ph, pt in zip(parts_head, parts_tail, strict=True)
  ]  # [C, L + 1]
  fixed, gauss = parts[0] + parts[1], parts[2]  # ||a||, sqrt(q) U
  root = fixed * fixed + gauss * gauss + 2.0 * fixed * (gauss / u_gauss) * cross
  total = xp.minimum(fixed + gauss, xp.sqrt(xp.maximum(root, 0.0)))
  cell = xp.max(total, axis=1)
  if with_theorem2:  # Theorem 2's 2 t V on the same events: kept where smaller
    cell = xp.minimum(cell, 2.0 * t_c[:, 0] * vmax)
  err = xp.max(cell)
  flat = xp.argmax(total)  # the split of the isotropic bound's own worst case
  split = [p.reshape(-1)[flat] for p in parts]
  t_bound = xp.max(t_c)
  small_k = k < 2.0  # no head structure to use: Theorem 2's free bound
  t_free = 1.0 - xp.minimum(k, n) / n
  err = xp.where(k >= n, 0.0, xp.where(small_k, 2.0 * t_free * vmax, err))
  t_bound = xp.where(k >= n, 0.0, xp.where(small_k, t_free, t_bound))
  ok = _valid(n >= 1, sigma > 0, k >= 1, delta > 0, delta < 1, frob >= 0, op >= 0, gram >= 0)
  ok = ok & (vf >= 0) & (vo >= 0) & (vg >= 0)
  nan = xp.asarray(xp.nan, dt)
  outs = (err, t_bound, vmax, *split)
  return tuple(xp.where(ok, o, nan) for o in outs)


_ISO = PointFormula(_iso_scalar, static=("with_theorem2",), eager=False)
