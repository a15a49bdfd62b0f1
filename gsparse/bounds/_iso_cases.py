"""Theorem 2V's two cases per grid cell (docs/theory.md 4.2): the diagonal in the head or the tail.

On the grid of `value_apriori` (tau cells `[C, 1, 1]`, theta cells `[1, L, 1]`, cells of
the largest off-diagonal standardised score `g_(1)` `[1, 1, G]`), each function bounds
Lemma V's isotropic sum (diagonal, mean and Gaussian parts, joined by `_combine`) in
one case: case H (the diagonal among the kept keys, its head share `theta` in a theta
cell, `_head_sum`) and case T (the diagonal in the tail, `_tail_case`). `_cell_base`
evaluates the theta-free and level-free factors of both once per tau cell;
`_cell_parts` adds the Gaussian levels to the tail case. Which cell is worst is found
in `_iso_grid`.
"""

from __future__ import annotations

from gsparse.bounds import _xp


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


def _max_abs_gap(et, eh, scale):
  """`max |e_t - scale e_h|` over the vertices `et = (lo, hi)`, `eh = (lo, hi)`, `scale` `[...]`."""
  xp = _xp.of(*et, *eh, scale)
  vals = [xp.abs(a - scale * b) for a in et for b in eh]
  return xp.maximum(xp.maximum(vals[0], vals[1]), xp.maximum(vals[2], vals[3]))


def _t_part(tm):
  """`max t (1 - t)` over `t in [0, tm]`."""
  xp = _xp.of(tm)
  return xp.where(tm <= 0.5, tm * (1.0 - tm), 0.25)


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
