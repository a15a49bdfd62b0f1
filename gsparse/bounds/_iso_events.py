"""Three of Theorem 2V's per-row events (docs/theory.md 4.2): (iii), (iv), the levels of (v), (vi).

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

The bound on the off-diagonal tail sum (event (iv)): Bernstein's inequality for the
capped terms `W(g_j)` (`log_tail_sum_hi`).

The Gaussian part's events (v), (vi) are independent of the scores given `x_i`, so
their level can depend on the cell of the largest score `g_(1)`: a cell that holds
`g_(1)` only w.p. `q_j` affords a level about `1 / q_j` times larger (`peeled_levels`).
"""

from __future__ import annotations

import numpy as np

from gsparse.bounds import _memo, _xp
from gsparse.bounds._common import _log1mexp, _log_phi_diff
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


def log_tail_sum_hi(n, a, b, c_hi, d_sum):
  """`[C]` log bound on a row's off-diagonal tail sum `T` for tau in `[a, b]` (fails w.p. `d_sum`).

  Every tail member has `g <= c_hi` (the k-th largest), so `e^{tau g} <= W(g)`,
  `W(g) = e^{a min(g, c_hi)}` for `g <= 0` and `e^{b min(g, c_hi)}` for `g > 0` (for
  every `g` `e^{a min(g, c_hi)}` when `c_hi <= 0`: the cap `W(c_hi)` is `e^{a c_hi}`), and
  `T <= sum_j W(g_j)` over all `n - 1` off-diagonal scores: i.i.d., bounded by
  `W(c_hi)`; Bernstein's inequality with the exact moments of `W`.
  """
  xp = _xp.of(n, a, b, c_hi, d_sum)
  nm1 = xp.maximum(n - 1.0, 1.0)
  c = c_hi
  lcap = xp.where(c > 0, b * c, a * c)  # log W(c_hi)
  ninf = xp.asarray(-xp.inf, a.dtype)

  def log_moment(m):  # log E[W^m]
    sa, sb = m * a, m * b
    neg = 0.5 * sa * sa + xp.log_ndtr(xp.minimum(c, 0.0) - sa)
    pos = xp.where(c > 0, 0.5 * sb * sb + _log_phi_diff(c - sb, -sb), ninf)
    cap = m * lcap + xp.log_ndtr(-c)
    return xp.logaddexp(xp.logaddexp(neg, pos), cap)

  ell = -xp.log(d_sum)
  terms = xp.stack(
    [
      xp.log(nm1) + log_moment(1.0),
      0.5 * (xp.log(2.0 * ell * nm1) + log_moment(2.0)),
      lcap + xp.log(ell / 3.0),
    ]
  )
  return xp.logaddexp(xp.logaddexp(terms[0], terms[1]), terms[2])


def peeled_levels(n, gam, d_ev):
  """`[1, 1, G]` failure levels of the Gaussian events in the cells `[gam_j, gam_{j+1}]` of `g_(1)`.

  `gam`: `[1, 1, G + 1]` cell edges. Cell `j` holds `g_(1)` w.p.
  `q_j = Phi(gam_{j+1})^{n-1} - Phi(gam_j)^{n-1}`, bounded here from above (raised by
  `1e-4` relative, capped by `(n - 1) Phi_bar(gam_j) >= P(g_(1) >= gam_j)`). Its level is
  `min(1, lam / q_j)`, with `lam` the largest for which `sum_j min(q_j, lam) <= d_ev`
  (water filling), so the events fail w.p. `<= sum_j q_j min(1, lam / q_j) <= d_ev` in
  all (docs/theory.md 4.2); `lam >= d_ev / G`, i.e. at least equal shares of the budget.
  """
  xp = _xp.of(n, gam, d_ev)
  nm1 = xp.maximum(n - 1.0, 1.0)
  # log P(g_(1) <= gam_j); log1p(-Phi_bar) for gam > 0 (jax's float32 log_ndtr is
  # log(ndtr) there, whose rounding near 1 is a large relative error in log Phi).
  pos = gam > 0
  log_phi = xp.where(pos, xp.log1p(-xp.ndtr(-xp.abs(gam))), xp.log_ndtr(xp.minimum(gam, 0.0)))
  log_cdf = nm1 * log_phi
  lo, hi = log_cdf[..., :-1], log_cdf[..., 1:]
  log_q = hi + _log1mexp(xp.minimum(lo - hi, 0.0)) + 1e-4  # log q_j, raised
  log_q = xp.where(hi > lo, log_q, -xp.inf)  # an empty cell (or both ends at -inf)
  log_tail = xp.log(nm1) + xp.log_ndtr(-gam[..., :-1])  # log (n - 1) Phi_bar(gam_j)
  q = xp.exp(xp.minimum(xp.minimum(log_q, log_tail), 0.0))
  q = xp.maximum(q, xp.finfo(q.dtype).tiny)  # an underflow is still counted in the budget
  # lam = max_m (d_ev - (sum of the m smallest q)) / (G - m), m = 0 .. G - 1.
  size = q.shape[-1]
  q_sorted = xp.sort(q, axis=-1)
  spent = xp.cumsum(q_sorted, axis=-1) - q_sorted  # the m smallest, m = 0 .. G - 1
  left = xp.arange(size, 0, -1, dtype=q.dtype)
  lam = xp.max((d_ev - spent) / left, axis=-1, keepdims=True) * (1.0 - 1e-6)
  return xp.where(q > lam, lam / q, 1.0)


_QUAD_HI = _memo.Memo(1 << 20)  # NumPy: `quad_form_hi` per argument bits


def quad_form_hi(frob, op, gram, x):
  """`_quad_form_range(1, frob, op, gram, x)[1]` for an array `x` (the per-cell levels).

  In NumPy remembered per argument bits: it depends on `n`, `k`, `delta` and the
  value norms, not on `sigma`, and its root search costs more than the rest of a
  later call's Gaussian levels. The same values as the plain call (read-only).
  """
  if _xp.of(frob, op, gram, x) is not _xp.NP:
    return _quad_form_range(1.0, frob, op, gram, x)[1]
  return _QUAD_HI.lookup(
    _memo.key(frob, op, gram, x), lambda: _quad_form_range(np.ones_like(x), frob, op, gram, x)[1]
  )
