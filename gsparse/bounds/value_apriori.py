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
from gsparse.bounds._iso_events import (
  log_tail_sum_hi,
  peeled_levels,
  quad_form_hi,
  tail_mean_floor,
)
from gsparse.bounds.norms import InteractionNorms, _norm_fields
from gsparse.bounds.row_tail import _row_tails
from gsparse.bounds.tau import _quad_form_range, _tau_range_point

_NUM_TAU_CELLS = 4  # geometric cells of the tau range, Theorem 2R at each left end
_TAU_SUBCELLS = 24  # finer cells in each, for the head and the absolute tail sum
_NUM_THETA_CELLS = 64  # cells of the diagonal's head share theta in [0, 1]
_NUM_G1_CELLS = 48  # cells of the largest off-diagonal standardised score in [c_lo, g1_hi]
_NP_ROWS = 256  # (tau cell, theta cell) rows per NumPy step (a [256, 1, G] temporary is 100 KB)


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


def _head_shape(a, b, stats, kk, g2):
  """Bounds on `sum r_j^2` and the head's tilted mean `E_h` for `g_(1) <= g2` (`[C, 1, G]`).

  The largest off-diagonal key holds a share `phi <= e^{b g2} / (e^{b g2} + H2_lo)` of
  the off-diagonal head (`H2_lo = (k - 2) e^{tau c_lo}`: the other head keys); the
  others lie in `[c_lo, e2]`, `e2 = min(g2, g2_hi)`. So `E_h <= phi g2 + (1 - phi) e2`
  and `sum r_j^2 <= phi^2 + (1 - phi)^2 F2` (convex in `phi`: worst at an end),
  `F2` the same spread bound as `F` for the others; also `<= F` itself.
  """
  xp = _xp.of(a, b, kk, g2)
  _, c_lo, _, _, g2_hi = stats
  lh2 = xp.log(kk - 2.0) + xp.minimum(a * c_lo, b * c_lo)
  phi = 1.0 / (1.0 + xp.exp(lh2 - xp.maximum(a * g2, b * g2)))
  e2 = xp.minimum(g2, g2_hi)
  f1 = 1.0 / (1.0 + (kk - 2.0) * xp.exp(-b * xp.maximum(g2 - c_lo, 0.0)))
  f2 = 1.0 / (1.0 + xp.maximum(kk - 3.0, 0.0) * xp.exp(-b * xp.maximum(e2 - c_lo, 0.0)))
  f = xp.minimum(f1, xp.maximum(f2, phi * phi + (1.0 - phi) ** 2 * f2))
  return f, phi * g2 + (1.0 - phi) * e2


def _max_abs_gap(et, eh, scale):
  """`max |e_t - scale e_h|` over the vertices `et = (lo, hi)`, `eh = (lo, hi)`, `scale` `[...]`."""
  xp = _xp.of(*et, *eh, scale)
  vals = [xp.abs(a - scale * b) for a in et for b in eh]
  return xp.maximum(xp.maximum(vals[0], vals[1]), xp.maximum(vals[2], vals[3]))


def _t_part(tm):
  """`max t (1 - t)` over `t in [0, tm]`."""
  xp = _xp.of(tm)
  return xp.where(tm <= 0.5, tm * (1.0 - tm), 0.25)


def _head_gap(et_lo, c_hi, c_lo, eh_hi, s0, s1):
  """`max |e_t - s e_h|` over `e_t in {et_lo, c_hi}`, `e_h in {c_lo, eh_hi}`, `s in {s0, s1}`.

  `s0, s1`: `1 - theta` at a theta cell's two ends. The same value as the
  maximum of the eight absolute differences: `|x - y| = max(x - y, y - x)` and a
  rounded difference is monotone in each argument, so the maximum is
  `max(y_hi - x_lo, x_hi - y_lo)` over the extreme `x` and the extreme products `y`.
  """
  xp = _xp.of(et_lo, c_hi, c_lo, eh_hi, s0, s1)
  y0, y1 = s0 * eh_hi, s1 * eh_hi
  yc0, yc1 = s0 * c_lo, s1 * c_lo
  y_lo = xp.minimum(xp.minimum(y0, y1), xp.minimum(yc0, yc1))
  y_hi = xp.maximum(xp.maximum(y0, y1), xp.maximum(yc0, yc1))
  x_lo, x_hi = xp.minimum(et_lo, c_hi), xp.maximum(et_lo, c_hi)
  return xp.maximum(y_hi - x_lo, x_hi - y_lo)


def _head_sum(t_c, l_t, l_off, shape, stats, kk, th0, th1, scal):
  """Diagonal in the head, share `theta in [th0, th1]`: `(isotropic sum, its three parts)`.

  All arguments broadcast: `[C, L, G]` on the full grid (`th0, th1` `[1, L, 1]`), or
  `[R, 1, G]` on chosen (tau cell, theta cell) rows. `l_off`: log bound on the
  off-diagonal head; `shape = _head_shape(...)`.
  """
  xp = _xp.of(t_c, l_t, l_off, kk, th0, th1)
  _, c_lo, c_hi, et_lo, _ = stats
  svo, vmax, u_gauss, cross, t_free = scal
  # T <= e^{l_t}: 1 / (1 + e^{l_off} / ((1 - theta) e^{l_t})) (sigmoid: no log on the grid)
  t_abs = xp.sigmoid(l_t + xp.log1p(-th0) - l_off)
  t_rel = t_c * (1.0 - th0) / xp.maximum(t_c * (1.0 - th0) + 1.0 - t_c, 1e-30)
  tm = xp.minimum(xp.minimum(t_rel, t_abs), t_free)  # t_c bounds R; t <= 1 - k/n too
  f, eh_hi = shape
  q = _t_part(tm) * (1.0 - th0) / (kk - 1.0) + tm * tm * (1.0 - th0) ** 2 * f
  gap = tm * _head_gap(et_lo, c_hi, c_lo, eh_hi, 1.0 - th0, 1.0 - th1)
  head = (tm * th1 * vmax, svo * gap, xp.sqrt(q) * u_gauss)
  return _combine(head, u_gauss, cross), head


def _tail_case(a, b, t_c, l_t, stats, kk, gam, shape):
  """Diagonal in the tail: `(bound on p_i, t bound, q bound, mean gap bound)`, `[C, 1, G]`."""
  xp = _xp.of(a, b, t_c, l_t, kk, gam)
  _, c_lo, c_hi, et_lo, _ = stats
  g1 = gam[..., :-1]
  l_h = xp.logaddexp(xp.minimum(a * g1, b * g1), xp.log(kk - 1.0) + xp.minimum(a * c_lo, b * c_lo))
  # t = (T + e^{s_ii}) / (T + e^{s_ii} + H) with e^{s_ii} <= H / k: at most this.
  num = xp.logaddexp(l_t, l_h - xp.log(kk))
  t = xp.minimum(t_c, xp.exp(num - xp.logaddexp(l_t, l_h + xp.log1p(1.0 / kk))))
  pd = xp.minimum(t, 1.0 / (kk + 1.0))
  f, eh_hi = shape
  q = _t_part(t) / kk + t * t * f
  et, eh = (et_lo, c_hi), (c_lo, eh_hi)
  gap = t * _max_abs_gap(et, eh, 1.0) + pd * xp.maximum(xp.abs(et_lo), xp.abs(c_hi))
  return pd, t, q, gap


def _iso_scalar(n, sigma, k, delta, frob, op, gram, vf, vo, vg, *, with_theorem2):
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
  fine = _NUM_TAU_CELLS * _TAU_SUBCELLS
  u = xp.linspace(0.0, 1.0, fine + 1, dtype=dt)
  lo = xp.maximum(tlo, 1e-3 * thi)
  edges = lo * xp.exp(u * (xp.log(xp.maximum(thi, lo)) - xp.log(lo)))
  a = xp.concatenate([tlo[None], edges[1:-1]])
  # The last edge is thi itself: exp(log(thi) - log(lo)) * lo may round below it.
  b = xp.concatenate([edges[1:-1], xp.maximum(thi, lo)[None]])
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


def _grid_error(grid, scal, lvl, stop):
  """`(error, split)` on the grid, the Gaussian events (v), (vi) at the levels `lvl` `[1, 1, G]`.

  NumPy with `stop` (an error already found): once this grid's error is known to be
  above `stop`, the search ends and returns `(inf, NaN split)` (it loses the comparison).
  The third output (NumPy, else None): the `g_(1)` cell `g` of the maximum, where the
  tau cell `c` of the uncapped maximum also holds the capped one. Then a grid whose
  levels are nowhere below `lvl[g]` has a maximum (capped or not) at least this
  grid's: its sum at the same (c, row, g) is at least as large (`_combine` increases
  in the Gaussian parts, the rest is level-free).
  """
  base, stats, kk, th, cap = grid
  sigma, s2, vf, vo, vg, vmax, t_free = scal
  xp = _xp.of(*base, kk, th, sigma, s2, vf, vo, vg, vmax, lvl)
  u_gauss = xp.sqrt(s2 * quad_form_hi(vf, vo, vg, -xp.log(lvl)))
  cross = sigma * vo * _norm_isf(xp.minimum(lvl, 0.5))  # a . G <= ||a|| sqrt(q) cross (z >= 0)
  scal = (sigma * vo, vmax, u_gauss, cross, t_free)
  # NumPy: a few tau cells at a time, so its temporaries stay small (cached by the allocator,
  # not fresh pages each call); every entry is the same, and so are the maximum and its split.
  cells = _cell_parts(base, scal)
  if xp is _xp.NP:  # only the grid rows that can matter (the same result)
    cell, at, split = _np_rows(cells, stats, kk, th, scal, cap, stop)
    if cell is None:
      return xp.inf, split, None
  else:
    cell, at, split = _worst(cells, stats, kk, th, scal)
  if cap is not None:
    cell = xp.minimum(cell, cap)
  g_at = at[1] if xp is _xp.NP and at[0] == xp.argmax(cell) else None
  return xp.max(cell), split, g_at


def _np_rows(cells, stats, kk, th, scal, cap, stop=None):
  """`_worst`'s result in NumPy, evaluating only the (tau cell, theta cell) rows that can matter.

  Returns `(cell, (c, g), split)`: `g` the `g_(1)` cell of the maximum, which `_worst` omits.

  Rows go in decreasing order of their upper bounds (`_cell_upper`), `_NP_ROWS` at a time;
  a row is skipped when its bound is below the largest sum seen and (with Theorem 2's
  `cap`) its capped bound at most the largest capped maximum seen. A skipped row holds
  neither the maximum nor the largest capped value, so the error, the maximum and its
  split (the first maximum in `_worst`'s order) are the full grid's; `cell` holds each
  tau cell's maximum over the rows evaluated (its capped maximum is unchanged). With
  `stop`, it returns (split NaN) as soon as the largest capped maximum seen is above it.
  """
  np = _xp.NP
  t_c, l_t, l_off, f, eh_hi, total_t, *tail = cells
  capped_max = (lambda x: np.max(x)) if cap is None else (lambda x: np.max(np.minimum(x, cap)))
  if stop is not None and capped_max(np.max(total_t, axis=(1, 2))) > stop:
    return None, None, [np.nan] * 3  # the tail rows alone are above `stop`
  rows_hi, cell = _cell_upper(cells, stats, kk, th, scal)  # [C, L], [C]: the tail rows exact
  capped = rows_hi if cap is None else np.minimum(rows_hi, cap[:, None])
  best, best_cap, found = np.max(cell), capped_max(cell), []
  order = np.argsort(-rows_hi, axis=None, kind="stable")
  for i in range(0, order.size, _NP_ROWS):
    if stop is not None and best_cap > stop:
      return None, None, [np.nan] * 3
    idx = order[i : i + _NP_ROWS]
    idx = idx[~((rows_hi.flat[idx] < best) & (capped.flat[idx] <= best_cap))]
    if idx.size == 0:
      continue
    c, row = np.divmod(idx, rows_hi.shape[1])
    th0, th1 = th[0, row, 0][:, None, None], th[0, row + 1, 0][:, None, None]
    at = (t_c[c], l_t[c], l_off[c], (f[c], eh_hi[c]))
    st = (*stats[:3], stats[3][c], stats[4])  # the tail mean's floor of each row's tau cell
    total, head = _head_sum(*at, st, kk, th0, th1, scal)  # [R, 1, G]
    row_max = np.max(total, axis=(1, 2))
    np.maximum.at(cell, c, row_max)
    # Only rows at their tau cell's maximum so far can hold the final one (`cell` only
    # grows): the others are dropped now, so the chunks' arrays are not all kept alive.
    k = np.flatnonzero(row_max == cell[c])
    found.append((c[k], row[k], total[k, 0], [np.broadcast_to(h, total.shape)[k, 0] for h in head]))
    best, best_cap = np.max(cell), capped_max(cell)
  c = np.argmax(cell)  # the first tau cell with the maximum; in it the head rows come first
  rows = [
    (rs[j], tot[j], [h[j] for h in hd])
    for cs, rs, tot, hd in found
    for j in np.flatnonzero(cs == c)
  ]
  rows = sorted((r for r in rows if np.max(r[1]) == cell[c]), key=lambda r: r[0])
  if rows:
    g = np.argmax(rows[0][1])
    return cell, (c, g), [h[g] for h in rows[0][2]]
  g = np.argmax(total_t[c, 0])
  return cell, (c, g), [pt[c, 0, g] for pt in tail]


def _cell_upper(cells, stats, kk, th, scal):
  """`([C, L], [C])`: upper bounds on the isotropic sum per head row, the tail row's maximum.

  Per theta row, every head part at its largest over the largest scores: `tm` at the
  smallest off-diagonal head (`t_abs` decreases in `l_off`), the mean gap at the
  extreme products `s e_h` and `q` at that `tm` and the largest `f`; `_combine` is
  increasing in each part (`cross >= 0`), and the bound is raised by `1e-9` relative
  so the grid's rounding cannot exceed it. The tail row's maximum is exact.
  """
  xp = _xp.of(*cells, kk, th, *scal)
  t_c, l_t, l_off, f, eh_hi, total_t = cells[:6]
  svo, vmax, u_gauss, cross, t_free = scal
  _, c_lo, c_hi, et_lo, _ = stats
  th1 = th[:, :-1]
  t_abs = xp.sigmoid(l_t + xp.log1p(-th1) - xp.min(l_off, axis=-1, keepdims=True))
  t_rel = t_c * (1.0 - th1) / xp.maximum(t_c * (1.0 - th1) + 1.0 - t_c, 1e-30)
  tm = xp.minimum(xp.minimum(t_rel, t_abs), t_free)  # [C, L, 1]
  e_hi = xp.maximum(xp.max(eh_hi, axis=-1, keepdims=True), c_lo)
  e_lo = xp.minimum(xp.min(eh_hi, axis=-1, keepdims=True), c_lo)
  s_lo, s_hi = 1.0 - th[:, 1:], 1.0 - th1
  y_hi = xp.maximum(s_hi * e_hi, s_lo * e_hi)
  y_lo = xp.minimum(s_hi * e_lo, s_lo * e_lo)
  gap = xp.maximum(y_hi - xp.minimum(et_lo, c_hi), xp.maximum(et_lo, c_hi) - y_lo)
  q = _t_part(tm) * s_hi / (kk - 1.0) + tm * tm * s_hi**2 * xp.max(f, axis=-1, keepdims=True)
  u_gauss, cross = xp.max(u_gauss), xp.max(cross)  # `_combine` increases in both
  head = (tm * th[:, 1:] * vmax, svo * tm * gap, xp.sqrt(q) * u_gauss)
  head = _combine(head, u_gauss, cross) * (1.0 + 1e-9)
  return head[..., 0], xp.max(total_t, axis=(1, 2))


def _cell_base(a, b, t_c, l_t, stats, kk, gam, t_free):
  """The theta-free and level-free parts of every tau cell, once: `[C, 1, G]` arrays.

  `(t_c, l_t, l_off, f, eh_hi, tail p_i, tail q, tail mean gap)`: the off-diagonal
  head's log bound and the head shape for the head case, and the tail case's factors.
  """
  xp = _xp.of(a, b, t_c, l_t, kk, gam, t_free)
  c_lo = stats[1]
  g1, g2 = gam[..., :-1], gam[..., 1:]
  ly1 = xp.minimum(a * g1, b * g1)  # the largest off-diagonal key, g_(1) in [g1, g2]
  l_off = xp.logaddexp(ly1, xp.log(kk - 2.0) + xp.minimum(a * c_lo, b * c_lo))
  shape = _head_shape(a, b, stats, kk, g2)
  pd, _, q_t, gap_t = _tail_case(a, b, xp.minimum(t_c, t_free), l_t, stats, kk, gam, shape)
  return (t_c, l_t, l_off, *shape, pd, q_t, gap_t)


def _cell_parts(base, scal):
  """`[C, 1, G]` arrays for `_worst`: `(t_c, l_t, l_off, f, eh_hi, tail total, its three parts)`.

  The tail case (the diagonal in the tail): Lemma V's sum and its three parts, with the
  Gaussian levels of `scal`.
  """
  xp = _xp.of(*base, *scal)
  svo, vmax, u_gauss, cross, _ = scal
  t_c, pd, q_t, gap_t = base[0], *base[5:]
  tail = (pd * vmax, svo * gap_t, xp.sqrt(q_t) * u_gauss)
  full = (t_c.shape[0], 1, base[2].shape[-1])
  tail = [xp.broadcast_to(x, full) for x in (_combine(tail, u_gauss, cross), *tail)]
  return (*base[:5], *tail)


def _worst(cells, stats, kk, th, scal):
  """The isotropic sum on `[C, L + 1, G]` cells: `([C] cell maxima, (c, None), split)`.

  `c`: the tau cell of the maximum; the split is read at the maximum.

  Rows `0..L-1`: the diagonal in the head, theta cell `l`; row `L`: the diagonal in the
  tail (`cells` from `_cell_parts`). The split is read at the first maximum in that order.
  """
  t_c, l_t, l_off, f, eh_hi, total_t, *tail = cells
  xp = _xp.of(t_c, l_t, l_off, f, eh_hi, total_t, kk, th, *scal)
  total_h, head = _head_sum(t_c, l_t, l_off, (f, eh_hi), stats, kk, th[:, :-1], th[:, 1:], scal)
  h_max, t_max = xp.max(total_h, axis=(1, 2)), xp.max(total_t, axis=(1, 2))
  cell = xp.maximum(h_max, t_max)
  c = xp.argmax(cell)  # the first tau cell with the maximum; in it the head rows come first
  row, g = xp.unravel_index(xp.argmax(total_h[c]), total_h.shape[1:])
  g_t = xp.argmax(total_t[c, 0])
  in_head = h_max[c] >= t_max[c]
  split = [
    xp.where(in_head, _at(ph, c, row, g), pt[c, 0, g_t]) for ph, pt in zip(head, tail, strict=True)
  ]
  return cell, (c, None), split


def _combine(parts, u_gauss, cross):
  """Lemma V's value factor from its `(diagonal, mean, Gaussian)` parts, elementwise.

  `||a + G|| <= min(||a|| + ||G||, sqrt(||a||^2 + ||G||^2 + 2 ||a|| sqrt(q) cross))` with
  `||a|| <= diagonal + mean` and `||G|| <= Gaussian = sqrt(q) U`.
  """
  xp = _xp.of(*parts, u_gauss, cross)
  fixed, gauss = parts[0] + parts[1], parts[2]
  # sqrt(q) = gauss / u_gauss; with W_V = 0 both are 0 (and so is `cross`): the term is 0.
  ok = u_gauss > 0
  sqrt_q = xp.where(ok, gauss / xp.where(ok, u_gauss, 1.0), 0.0)
  root = fixed * fixed + gauss * gauss + 2.0 * fixed * sqrt_q * cross
  return xp.minimum(fixed + gauss, xp.sqrt(xp.maximum(root, 0.0)))


def _at(part, c, row, g):
  """`part[c, row, g]` of a part broadcast to `[C, L, G]`."""
  xp = _xp.of(part, c, row, g)
  full = (part.shape[0], _NUM_THETA_CELLS, part.shape[2])
  return xp.broadcast_to(part, full)[c, row, g]


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
