"""Two of Theorem 2V's per-row events (docs/theory.md 4.2): (iii) and the levels of (v), (vi).

The floor on a row's tilted tail mean `E_t` (event (iii)):

`E_t(tau) = d/dtau log T_S(tau)`, `T_S(tau) = sum_{j in S} e^{tau g_j}` over the
off-diagonal tail `S` (`|S| = N_S = n - 1 - m`, `m = k - 1` or `k` keys kept).
`K(tau) = log(T_S(tau) / N_S)` is convex with `K(0) = 0`, so
`E_t(tau) = K'(tau) >= K(tau) / tau >= K(a) / a` for every `0 < a <= tau`.
`T_S(a)` is bounded below by `sum_{j != i} e^{a min(g_j, c_lo)} - m e^{a c_lo}`
(every kept score is `>= c_lo`), a sum of `n - 1` i.i.d. terms in
`[0, e^{a c_lo}]` with a lower-tail bound (Bernstein, or Maurer's for nonnegative
terms). Per tau cell, one event is used: the one, among the plain-mean event of
`_order_stats` and this one at the cells' left ends `a' <= a`, that gives the
largest floor (a choice fixed by the cell, so it costs one event's probability).

The Gaussian part's events (v), (vi) are independent of the scores given `x_i`, so
their level can depend on the cell of the largest score `g_(1)`: a cell reached
only w.p. `P_j` affords a level about `1 / P_j` times larger (`peeled_levels`).
"""

from __future__ import annotations

import numpy as np

from gsparse.bounds import _xp
from gsparse.bounds._common import _log1mexp
from gsparse.bounds.tau import _quad_form_range


def _log_min_moment(s, c):
  """`log E[e^{s min(g, c)}]`, `g ~ N(0, 1)`: `e^{s^2/2} Phi(c - s) + e^{s c} Phi_bar(c)`."""
  xp = _xp.of(s, c)
  return xp.logaddexp(0.5 * s * s + xp.log_ndtr(c - s), s * c + xp.log_ndtr(-c))


def tail_mean_floor(n, kk, a, c_lo, c_hi, et_plain, d_ev):
  """`[C]` lower bounds on `E_t(tau)` for tau in the cells `[a_c, b_c]` (`a` increasing).

  Each fails w.p. `<= d_ev` given the cell (one event per cell, see the module
  docstring); `et_plain`: the plain-mean floor of `_order_stats` (its event at
  the same level). Clipped at `c_hi` (`E_t <= g_(k) <= c_hi` on Theorem 2V's events).
  """
  xp = _xp.of(n, kk, a, c_lo, c_hi, et_plain, d_ev)
  nm1 = xp.maximum(n - 1.0, 1.0)
  pos = a > 0
  s = xp.where(pos, a, 1.0)
  l1, l2 = _log_min_moment(s, c_lo), _log_min_moment(2.0 * s, c_lo)
  ell = -xp.log(d_ev)
  # Variance of e^{s min(g, c)}: the Gaussian Poincare bound E[f'(g)^2] =
  # s^2 e^{2 s^2} Phi(c - 2 s), and the exact E[f^2] - E[f]^2 where its cancellation is
  # mild (2 l1 - l2 <= -1e-2), raised by 0.1% for the rounding of the difference.
  lv = 2.0 * xp.log(s) + 2.0 * s * s + xp.log_ndtr(c_lo - 2.0 * s)
  gap = 2.0 * l1 - l2
  exact = l2 + _log1mexp(xp.minimum(gap, -1e-2)) + 1e-3
  lv = xp.where(gap < -1e-2, xp.minimum(lv, exact), lv)
  mu = xp.exp(l1)
  bern = xp.sqrt(2.0 * nm1 * ell) * xp.exp(0.5 * lv) + mu * ell / 3.0
  maurer = xp.sqrt(2.0 * nm1 * ell) * xp.exp(0.5 * l2)
  y_lo = nm1 * mu - xp.minimum(bern, maurer)
  cap = xp.exp(s * c_lo)
  floor = None
  for m in (kk - 1.0, kk):
    rest = y_lo - m * cap  # a lower bound on T_S(a) when positive
    ok = pos & (rest > 0)
    k_a = xp.log(xp.where(ok, rest, 1.0)) - xp.log(xp.maximum(nm1 - m, 1.0))
    f_m = xp.where(ok, k_a / s, -xp.inf)
    floor = f_m if floor is None else xp.minimum(floor, f_m)
  floor = xp.cummax(floor, axis=0)  # the best left end a' <= a
  return xp.minimum(xp.maximum(floor, et_plain), c_hi)


def peeled_levels(n, g1, d_ev):
  """`[1, 1, G]` failure levels of the Gaussian events in the cells `[g1_j, g1_{j+1}]` of `g_(1)`.

  Cell `j` is reached w.p. `<= P_j = min(1, (n - 1) Phi_bar(g1_j))` (`P(g_(1) >= g1_j)`);
  its level is `min(1, d_ev / (G P_j))`, so the events fail w.p.
  `<= sum_j P(cell j) d_ev / (G P_j) <= d_ev` in all (docs/theory.md 4.2). Equal shares
  `1 / G` did better than shares growing or falling with `P_j` (powers -0.5 to 1 tried).
  """
  xp = _xp.of(n, g1, d_ev)
  log_p = xp.minimum(xp.log(xp.maximum(n - 1.0, 1.0)) + xp.log_ndtr(-g1), 0.0)
  return xp.exp(xp.minimum(xp.log(d_ev / g1.shape[-1]) - log_p, 0.0))


_QUAD_HI: dict[bytes, np.ndarray] = {}  # NumPy: `quad_form_hi` per argument bits
_QUAD_HI_MAX = 256


def quad_form_hi(frob, op, gram, x):
  """`_quad_form_range(1, frob, op, gram, x)[1]` for an array `x` (the per-cell levels).

  In NumPy remembered per argument bits: it depends on `n`, `k`, `delta` and the
  value norms, not on `sigma`, and its root search costs more than the rest of a
  later call's Gaussian levels. The same values as the plain call.
  """
  if _xp.of(frob, op, gram, x) is not _xp.NP:
    return _quad_form_range(1.0, frob, op, gram, x)[1]
  arrays = [np.asarray(v) for v in (frob, op, gram, x)]
  key = b"".join(a.tobytes() + a.dtype.str.encode() + str(a.shape).encode() for a in arrays)
  if key not in _QUAD_HI:
    if len(_QUAD_HI) >= _QUAD_HI_MAX:
      _QUAD_HI.clear()
    _QUAD_HI[key] = _quad_form_range(np.ones_like(x), frob, op, gram, x)[1]
  return _QUAD_HI[key]
