"""Per-row top-k tail mass given the row's own tau_i (docs/theory.md, Theorem 2R).

The Theorem-1R method applied to Theorem 2's deterministic step: with `G` the
k-th largest off-diagonal standardised score, `t <= x / (x + Z_top)`,
`x = e^{tau G} + T_rest`, so `{t > t0}` needs
`t0 Z_top - (1 - t0) T_rest < (1 - t0) e^{tau G}`; one Chernoff bound with the
Laplace transform of the top sum and the moment generating function of the
rest, both bounded by upper Riemann sums.
"""

from __future__ import annotations

import functools

import jax
from jax.typing import ArrayLike

from gsparse.bounds import _laplace, _xp
from gsparse.bounds._common import (
  PointFormula,
  _check,
  _check_delta,
  _check_n,
  _on_flat,
  _safety,
  _valid,
)
from gsparse.bounds._gcells import _prob_up
from gsparse.bounds.row import _NUM_LAMBDA, _g_grid

_T0_STEPS = 16  # bisection steps on log(t0 / (1 - t0)) (resolution 42 / 2^16)
_NUM_TAIL_G_CELLS = 128  # cells of G on [-3, sqrt(2 ln n) + 2]


def _tail_parts(tau, c):
  """The t0-free parts of `_tail_cell_bounds`, computed once per row.

  `(top, rest)`: the Riemann weights of the top transforms at the cell tops
  `c_{l+1}` and the `[L, K]` log MGF bounds of one summand below `G` at `c_l`
  (`[C, L, K]` for a 1-D `tau [C]`). The cells share Riemann offsets in bands as in
  `_laplace`: one band per cell (each as its scalar call) unless `C % 8 == 0`, when
  bands of 8 consecutive cells share their band's offsets (still valid sums, but not
  bit for bit the scalar calls').
  """
  xp = _xp.of(tau, c)
  t = xp.reshape(tau, (-1,))
  theta = xp.linspace(-3.0, 9.0, _NUM_LAMBDA, dtype=c.dtype)  # log(lam (1 - t0))
  rest = _laplace._log_transform(
    _laplace._rest_weights(t, c[:-1], mgf=True), theta, 1, tc=(t, c[:-1])
  )
  return _laplace._top_weights(t, c[1:]), rest if xp.ndim(tau) else rest[0]


def _tail_cell_bounds(nrest, k, tau, t0, c, parts=None):
  """`[L]` (`[C, L]`) bounds on `P(t > t0 | tau_i = tau, G in (c_l, c_{l+1}])` (Theorem 2R).

  Divided by `e^{tau G}`, `{t > t0}` needs `t0 sum_top e^{tau (g - G)} - (1 - t0)
  sum_rest e^{tau (g - G)} < 1 - t0`. For `G` in `(c_l, c_{l+1}]` the top residuals are
  stochastically at least those at `c_{l+1}` and the rest's `G - g` at least those at
  `c_l` (log-concavity), which fixes the laws of one Chernoff bound per cell.
  `nrest` summands lie below G; `parts = _tail_parts(tau, c)` (computed here when
  not given). A 1-D `tau [C]` (its `parts`) with `t0 [C]` gives `[C, L]`, each row
  a bound at that `(tau, t0)` (the scalar call's when `C % 8 != 0`; see `_tail_parts`).
  """
  xp = _xp.of(nrest, k, tau, t0, c)
  top_w, rest = _tail_parts(tau, c) if parts is None else parts
  theta = xp.linspace(-3.0, 9.0, _NUM_LAMBDA, dtype=c.dtype)  # log(lam (1 - t0))
  log_lam = _tail_log_lam(theta, t0)  # lam t0, [C, 1, K]
  top = _laplace._log_transform(top_w, log_lam, -1, tc=(xp.reshape(tau, (-1,)), c[1:]))  # [C, L, K]
  log_b = xp.exp(theta) + (k - 1.0) * xp.minimum(top, 0.0)
  log_b = log_b + nrest * xp.maximum(rest, 0.0)
  log_b = xp.where(xp.isnan(log_b), xp.inf, log_b)  # inf * 0 in an overflowed MGF: no bound
  b = xp.exp(xp.minimum(xp.min(log_b, axis=-1), 0.0))  # [C, L]
  return b if xp.ndim(tau) else b[0]


def _tail_log_lam(theta, t0):
  """`[C, 1, K]` `log(lam t0)` for `theta = log(lam (1 - t0))` and one `t0` per tau cell
  (`_laplace._lam_down`: in float32, the transforms' `lam` is at most the `e^theta` term's)."""
  xp = _xp.of(theta, t0)
  t0 = xp.reshape(t0, (-1, 1, 1))
  log_lam = theta - xp.log1p(-t0) + xp.log(t0)
  return _laplace._lam_down(log_lam, theta, xp.log1p(-t0) - xp.log(t0))


def _tail_weights(nm1, k, c):
  """`(f, t_top)`, the t0- and tau-free G-cell probabilities of `_tail_fail` (`F_l` rounded up)."""
  xp = _xp.of(nm1, k, c)
  inv_safe = 1.0 / _safety(c.dtype)
  # `_prob_up`: a float32 betainc below 0 or NaN counts as 1 (it would lower the sum).
  f = _prob_up(xp.betainc(xp.maximum(nm1 - k + 1.0, 1.0), k, xp.ndtr(c)) * inv_safe)
  t_top = _prob_up(xp.betainc(k, xp.maximum(nm1 - k + 1.0, 1.0), xp.ndtr(-c[-1])) * inv_safe)
  return f, t_top


def _tail_fail(nm1, k, tau, t0, c, parts=None, weights=None):
  """Bound on `P(t > t0 | tau_i = tau)` (Theorem 2R), summed over the cells of G.

  `[C]` for a 1-D `tau [C]` and `t0 [C]`; `weights = _tail_weights(nm1, k, c)`.
  """
  b = _tail_cell_bounds(nm1 - k, k, tau, t0, c, parts)
  return _tail_sum(b, _tail_weights(nm1, k, c) if weights is None else weights)


def _tail_sum(b, weights):
  """`sum_l P(G in cell l) b_l` for cell bounds `b [..., L]`, `weights = (f [L + 1], t_top)`."""
  xp = _xp.of(b, *weights)
  # With bt = running max from the right (non-increasing) and F_l = P(G <= c_l) rounded
  # up: F_0 + T_L + F_L bt_{L-1} + sum_l F_l (bt_{l-1} - bt_l).
  f, t_top = weights
  bt = xp.cummax(b, axis=-1, reverse=True)
  body = xp.sum(f[1:-1] * (bt[..., :-1] - bt[..., 1:]), axis=-1)
  return xp.minimum(f[0] + t_top + f[-1] * bt[..., -1] + body, 1.0)


def _np_tail_fail_fn(nm1, k, taus, c, weights):
  """`t0 [C] -> _tail_fail(nm1, k, taus, t0, c, weights=weights)` in NumPy: the same bits, cheaper.

  Three savings. (1) Only the G cells `l >= s` are evaluated, `s + 1` the first
  `l >= 1` with `F_l > 0`: a cell below enters `_tail_sum` only through the terms
  `F_j (bt_{j-1} - bt_j)` with `j <= s`, and `bt_{j-1} - bt_j` is finite (every
  `b_l` is in `[0, 1]`), so with `F_j = 0` each is `+0.0` whatever the `b_l`
  below `s`; they are set to `b_s`, which keeps `bt_s` and every term the same
  (and the sum's order: the full `[C, L]` array is summed). Each cell's bound is
  computed from its own row of the weights (elementwise operations and one row of
  a matrix product), so the rows kept are the full call's bit for bit. (2) The
  t0-free parts (`e^x` of the top nodes, passed to `_laplace._log_transform`, the
  rest's `nrest max(rest, 0)`, `e^theta`) once, not per bisection step.
  (3) Temporaries written in place.
  """
  np = _xp.NP
  f = weights[0]
  num_l = c.shape[0] - 1
  pos = np.flatnonzero(f[1:-1] > 0)
  s = int(pos[0]) if pos.size else num_l - 1
  theta = np.linspace(-3.0, 9.0, _NUM_LAMBDA, dtype=c.dtype)  # log(lam (1 - t0))
  x, p, floor = _laplace._top_weights(taus, c[1:][s:])
  rest = _laplace._rest_weights(taus, c[:-1][s:], mgf=True)
  rest = (nm1 - k) * np.maximum(_laplace._log_transform(rest, theta, 1), 0.0)
  e_x, e_theta, km1 = np.exp(x), np.exp(theta), k - 1.0
  b = np.empty((taus.shape[0], num_l), c.dtype)

  def fail(t0):
    log_lam = _tail_log_lam(theta, t0)
    top = _laplace._log_transform((x, p, floor), log_lam, -1, ex=e_x)
    log_b = np.add(e_theta, np.multiply(km1, np.minimum(top, 0.0, out=top), out=top), out=top)
    log_b = np.add(log_b, rest, out=log_b)
    log_b[np.isnan(log_b)] = np.inf  # inf * 0 in an overflowed MGF: no bound
    # The minimum over the Chernoff parameters, with them on the middle axis (a faster
    # reduction): the same set, no NaN, so the same minimum but for the sign of a zero,
    # which `exp(min(., 0))` does not see.
    low = np.minimum.reduce(log_b.transpose(0, 2, 1).copy(), axis=1)
    b[:, s:] = np.exp(np.minimum(low, 0.0, out=low), out=low)
    b[:, :s] = b[:, s : s + 1]
    return _tail_sum(b, weights)

  return fail


def _row_tails(n, taus, k, delta):
  """Theorem 2R at each of the 1-D `taus` (`[C]`), one bisection for all of them.

  The bisection state, the Chernoff parameters and the bounds are per cell, and
  only the G grid and its cell probabilities (free of tau) are shared; so each cell
  takes the decisions of its own scalar call when `C % 8 != 0` (one Riemann band per
  cell; Theorem 2V's 4 coarse cells). With `C % 8 == 0` bands of 8 cells share their
  Riemann offsets (`_tail_parts`): valid bounds, not bit for bit the scalar calls'.
  """
  xp = _xp.of(n, taus, k, delta)
  nm1 = xp.maximum(n - 1.0, 1.0)
  kk = xp.clip(k, 2.0, nm1)
  c = _g_grid(nm1, _NUM_TAIL_G_CELLS, taus.dtype)
  weights = _tail_weights(nm1, kk, c)
  if xp is _xp.NP:
    fail = _np_tail_fail_fn(nm1, kk, taus, c, weights)
  else:
    parts = _tail_parts(taus, c)
    fail = functools.partial(_tail_fail, nm1, kk, taus, c=c, parts=parts, weights=weights)

  def ok(z):  # z = log(t0 / (1 - t0)), [C]
    return fail(xp.sigmoid(z)) <= delta

  def body(_, state):
    lo, hi, moved = state
    mid = 0.5 * (lo + hi)
    good = ok(mid)
    return xp.where(good, lo, mid), xp.where(good, mid, hi), moved | good

  lo0 = xp.full(taus.shape, -30.0, taus.dtype)
  hi0 = xp.full(taus.shape, 12.0, taus.dtype)
  _, hi, moved = xp.fori_loop(0, _T0_STEPS, body, (lo0, hi0, xp.zeros(taus.shape, bool)))
  # Only a checked value is returned: `hi` moved only to a midpoint found good, so only
  # cells where it never moved need the check (NumPy skips it when there are none).
  if xp is not _xp.NP or not xp.all(moved):
    moved = moved | ok(hi)
  t = xp.where(moved, xp.sigmoid(hi), 1.0)
  t = xp.where(k >= n, 0.0, xp.where(k < 2.0, 1.0, t))
  valid = _valid(n >= 1, taus >= 0, k >= 1, delta > 0, delta < 1)
  return xp.where(valid, t, xp.nan)


def _row_tail_scalar(n, tau, k, delta):
  xp = _xp.of(n, tau, k, delta)
  return (_row_tails(n, xp.reshape(tau, (1,)), k, delta)[0],)


_ROW_TAIL = PointFormula(_row_tail_scalar, eager=False)


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
  (t,) = _on_flat(_ROW_TAIL, (n, tau, k, delta))
  return t
