"""Theorem 1 (every row is (eps, k)-sparse) and its inverse (docs/theory.md, section 3)."""

from __future__ import annotations

from typing import NamedTuple

import jax
import numpy as np
from jax.typing import ArrayLike

from gsparse.bounds import _laplace, _npsearch, _xp
from gsparse.bounds._common import (
  _EPS_BISECTION_STEPS,
  _NUM_CELLS,
  _NUM_GRID,
  DEFAULT_DELTA,
  _binom_tail,
  _check,
  _check_delta,
  _check_eps,
  _check_n,
  _log1mexp,
  _log_moments,
  _on_flat,
  _safety,
  _valid,
)
from gsparse.bounds._gcells import _first_admissible_m, _prob_up, _sum_over_g_cells
from gsparse.bounds._logz import _row_log_z, _row_setting, _RowsFormula
from gsparse.bounds.norms import InteractionNorms, _norm_fields
from gsparse.bounds.row import _chernoff_fail, _chernoff_parts, _g_grid

_NUM_APRIORI_G_CELLS = 64  # cells of G for Lemma 6, per tau cell (64 of them)
# Lemma 6 in Theorem 1: 16 Chernoff parameters (any set is valid; 24 changed k by -2..+1 on
# 36 settings, for about 1.5 ms of a call), band scales on a ladder (masses kept between calls).
_LEMMA6 = {"ladder": True, "num_lambda": 16}


# ------------------------------------------------------------------- Theorem 1


class SparsityBound(NamedTuple):
  """Result of `sparsity_bound` (all fields broadcast over the arguments).

  Attributes:
    k: the certified k (integer-valued float): with probability `>= 1 - delta`
      every row is (eps, k)-sparse. `min(k_gauss, trivial_k)`.
    trivial_k: `min(ceil(1/eps) - 1, n)` (the largest K with `K eps < 1`), true for
      every probability row (Fact 1).
    informative: `k_gauss < trivial_k`, i.e. the Gaussian structure helped.
    k_gauss: the Gaussian bound before taking the minimum with `trivial_k`.
    exceed_prob: `p*`, the worst-case probability that one off-diagonal score
      exceeds the threshold `log(eps * Z_lower)`.
    tau_lo, tau_hi: the tau interval used.
  """

  k: jax.Array
  trivial_k: jax.Array
  informative: jax.Array
  k_gauss: jax.Array
  exceed_prob: jax.Array
  tau_lo: jax.Array
  tau_hi: jax.Array


def _trivial_k(n, eps):
  """`min(max{K integer : K eps < 1}, n) = min(ceil(1/eps) - 1, n)` (Fact 1), exactly.

  `fl(1/eps)` is within an ulp of `1/eps`, so the answer is `c = ceil(fl(1/eps)) - 1`
  or `c + 1`; which one is decided by the sign of the exact product `(c + 1) eps - 1`
  (an error-free product, `_mul_less_than_one`), not by rounded arithmetic.
  """
  xp = _xp.of(n, eps)
  c = xp.ceil(1.0 / eps) - 1.0
  return xp.minimum(xp.where(_mul_less_than_one(c + 1.0, eps), c + 1.0, c), n)


def _mul_less_than_one(a, b):
  """Whether the exact real product `a * b` is `< 1` (Dekker's error-free product)."""
  xp = _xp.of(a, b)
  bits = xp.finfo(b.dtype).nmant + 1
  split = float(2 ** ((bits + 1) // 2) + 1)

  def halves(x):
    t = split * x
    hi = t - (t - x)
    return hi, x - hi

  p = a * b
  ah, al = halves(a)
  bh, bl = halves(b)
  err = ((ah * bh - p) + ah * bl + al * bh) + al * bl  # a * b = p + err exactly
  return (p < 1.0) | ((p == 1.0) & (err < 0.0))


def _exceed_log_prob(theta, ta, tb):
  """`log max_{tau in {ta, tb}} Phi_bar(theta / tau)` per cell (tau = 0 handled)."""
  xp = _xp.of(theta, ta, tb)

  def one(t):
    x = xp.where(t > 0, theta / xp.where(t > 0, t, 1.0), xp.where(theta >= 0, xp.inf, -xp.inf))
    return xp.log_ndtr(-x)

  return xp.maximum(one(ta), one(tb))


def _orderstat_moments(ta, tb, c):
  """The parts of `_orderstat_fail` that do not depend on `m` or `eps` (computed once per row).

  Returns `(log E, log E^2, log Phi(c_{l-1}), log Phi_bar(c_l))` of the truncated
  summands, each `[C, L]` or `[1, L]`.
  """
  xp = _xp.of(ta, tb, c)
  ninf = xp.asarray(-xp.inf, ta.dtype)
  cp = c[:-1][None, :]  # truncation levels c_{l-1}, [1, L]
  ta_, tb_ = ta[:, None], tb[:, None]
  lo_part = xp.minimum(cp, 0.0)
  hi_part = xp.maximum(cp, 0.0)
  m1n, m1p, m2n, m2p = _log_moments(
    [
      (tb_, ninf, lo_part),
      (ta_, 0.0, hi_part),
      (2.0 * tb_, ninf, lo_part),
      (2.0 * ta_, 0.0, hi_part),
    ]
  )
  return (
    xp.logaddexp(m1n, m1p),
    xp.logaddexp(m2n, m2p),
    xp.log_ndtr(cp),
    xp.log_ndtr(-c[1:][None, :]),
  )


def _orderstat_m_parts(nm1, m, moments):
  """`(log mu, log v)` of `_orderstat_fail` (sum below `G`): free of `eps`, kept per fixed `m`."""
  xp = _xp.of(nm1, m)
  log_m1, log_m2, lphi = moments[:3]
  log_cnt = xp.log(xp.maximum(nm1 - m[..., None, None], 1.0))
  return log_cnt + log_m1 - lphi, log_cnt + log_m2 - lphi


def _orderstat_fail(nm1, m, eps, ta, tb, c, moments):
  """Bound on `P(at least m off-diagonal p_ij > eps)` per tau cell, by the m-th order statistic.

  Conditioning on the m-th largest standardised score `G = c`, the other
  `n - 1 - m` lower ones are i.i.d. `N(0, 1)` truncated to `(-inf, c)`; the
  event needs `e^{tau G} (1 - eps m) > eps Z_rest`, a lower-tail (Bernstein)
  event for the truncated sum. Summed over a grid of cells of `G`
  (docs/theory.md, Lemma 5).

  Args:
    nm1: `n - 1`.
    m: `[...]` numbers of exceedances (>= 1), evaluated at once.
    eps: threshold.
    ta, tb: `[C]` tau cells.
    c: `[L + 1]` increasing grid of standardised levels.
    moments: `_orderstat_moments(ta, tb, c)` (its `[C, L]` parts for these cells),
      optionally followed by `_orderstat_m_parts(nm1, m, moments)` for this `m`.

  Returns:
    `[..., C]` probability bounds.
  """
  xp = _xp.of(nm1, m, eps, ta, tb, c)
  mc = m[..., None]  # [..., 1]: one m per cell row
  ml = mc[..., None]  # [..., 1, 1]: one m per (cell, level)
  slack = 1.0 - eps * ml
  cnt = nm1 - ml
  cn = c[1:][None, :]  # cell tops c_l
  ta_, tb_ = ta[:, None], tb[:, None]
  tail_cn = moments[3]
  log_mu, log_v = moments[4:] if len(moments) == 6 else _orderstat_m_parts(nm1, m, moments)
  log_lam = xp.log(xp.maximum(slack, 1e-30)) - xp.log(eps) + xp.maximum(ta_ * cn, tb_ * cn)
  gap = _log1mexp(xp.minimum(log_lam - log_mu, 0.0))
  b = xp.where(
    (log_lam < log_mu) & (cnt >= 1.0),
    xp.exp(-0.5 * xp.exp(2.0 * (log_mu + gap) - log_v)),
    1.0,
  )
  # The m - 1 scores above G: if the largest exceeds G by Delta, the m-th entry
  # cannot exceed eps. P(all below G + Delta | G = c) is largest at the cell top.
  ta_safe = xp.where(ta_ > 0, ta_, 1.0)
  log_r = xp.log(xp.maximum(1.0 - eps * (ml - 1.0), 1e-30)) - xp.log(eps)
  delta_c = xp.where(ta_ > 0, xp.maximum(log_r, 0.0) / ta_safe, xp.inf)
  log_q = (ml - 1.0) * _log1mexp(xp.minimum(xp.log_ndtr(-(cn + delta_c)) - tail_cn, 0.0))
  b = b * xp.exp(xp.where(ml > 1.0, log_q, 0.0))
  return xp.where(1.0 - eps * mc <= 0, 0.0, _sum_over_g_cells(nm1, mc, c, b))


def _row_parts(n, tau_lo, tau_hi, log_drow, *, group=1, m=None):
  """What `_fail_fn` needs that depends on neither `eps` nor `m`: computed once per row.

  In NumPy, Lemma 5's moments are computed for `group` cells at a time when first
  asked, with their `m`-dependent parts for `m` when it is given (one fixed `m`).
  """
  xp = _xp.of(n, tau_lo, tau_hi, log_drow)
  nm1, ta, tb, lz, witness = _row_log_z(n, tau_lo, tau_hi, log_drow)
  c = _lemma5_grid(nm1, ta.dtype)
  if xp is _xp.NP:  # per cell, when first asked (`_fail_fn` asks Lemma 5 last)
    moments = lambda idx: _lemma5_cells(nm1, ta[idx], tb[idx], c, m)
    cells = _npsearch.PerCell(ta.shape[0], moments, group)
    if witness is not None and m is None and group == 1:  # computed with the other points'
      cells.put(*witness)
    return ta, tb, lz, c, cells
  return ta, tb, lz, c, _orderstat_moments(ta, tb, c)


def _lemma5_grid(nm1, dtype):
  """`[_NUM_GRID + 1]` levels of Lemma 5's G cells: `[-3, 1]`, the positive part stretched."""
  xp = _xp.of(nm1)
  c = xp.linspace(-3.0, 1.0, _NUM_GRID + 1, dtype=dtype)
  return c + xp.where(c > 0, c * (xp.sqrt(2.0 * xp.log(nm1)) + 2.0) - c, 0.0)


def _lemma5_cells(nm1, ta, tb, c, m=None):
  """NumPy: Lemma 5's moments of the cells `[ta, tb]` (`[W]`) as `PerCell` rows (`[W, L]` each)."""
  m1, m2, lphi, tail = _orderstat_moments(ta, tb, c)
  out = (m1, m2, *(_xp.NP.broadcast_to(x, m1.shape) for x in (lphi, tail)))
  return out if m is None else (*out, *_orderstat_m_parts(nm1, m, out))


def _witness_cell(ta, tb):
  """The m-scan's first witness: the cell with the largest tau (`[..., C]` cells)."""
  return _xp.of(ta, tb).argmax(ta * 0.0 + tb, axis=-1)


def _witness_moments(nm1, ta, tb):
  """`(witness cell, its Lemma 5 rows)` of each of P points (`[P, C]` cells, one n), at once.

  The witness is the first cell the scan asks Lemma 5 for (`_RowsFormula`'s `stacked`).
  """
  w = _witness_cell(ta, tb)
  pick = np.arange(w.size), w
  rows = _lemma5_cells(nm1, ta[pick], tb[pick], _lemma5_grid(nm1, ta.dtype))
  return [(w[i : i + 1], tuple(r[i : i + 1] for r in rows)) for i in range(w.size)]


def _fail_fn(n, parts, eps, log_drow, chernoff=None, level=None):
  """`(cell_fail, p*)` of one row: `cell_fail(m)` bounds `P(at least m entries > eps)` per tau cell.

  Per cell the best of the union bound (Lemma 4), the order-statistic bound
  (Lemma 5) and, when `chernoff = (c, _chernoff_parts(eps, ta, tb, c))` is given,
  the Chernoff bound (Lemma 6): all three bound the same conditional probability,
  so their minimum does. A row's bound is the worst cell,
  `max(cell_fail(m), axis=-1)`. `m` is an array (`[...]`, several m at once),
  `cells` an optional `[W]` index array restricting the cells (`[..., W]` out,
  else `[..., C]`). `p*` is the union bound's exceedance probability. `parts` is
  `_row_parts(n, tau_lo, tau_hi, log_drow)`. In NumPy, `chernoff[1]` is a
  `_npsearch.PerCell` of `_chernoff_parts`, and with a `level` the bounds are
  evaluated in the order 4, 6, 5, each only where the value is still above the
  level (`_npsearch.min_bounds`: a value `<= level` may be a larger bound, still
  `<= level`).
  """
  xp = _xp.of(n, eps, log_drow)
  ta, tb, lz, c, moments = parts
  nm1 = xp.maximum(n - 1.0, 1.0)
  drow = xp.exp(log_drow)
  theta = xp.log(eps) + lz
  p_cell = xp.exp(_exceed_log_prob(theta, ta, tb))  # [C]
  if xp is _xp.NP:
    return _np_cell_fail(n, nm1, eps, drow, p_cell, parts, chernoff, level), xp.max(p_cell)

  def cell_fail(m, cells=None):
    p, a, b, mom = p_cell, ta, tb, moments
    if cells is not None:
      p, a, b = p[cells], a[cells], b[cells]
      mom = (mom[0][cells], mom[1][cells], *mom[2:])
    out = xp.minimum(_union_fail(n, m, p, drow), _orderstat_fail(nm1, m, eps, a, b, c, mom))
    if chernoff is not None:
      out = xp.minimum(out, _chernoff_fail(nm1, m, eps, chernoff[0], chernoff[1], cells))
    return out

  return cell_fail, xp.max(p_cell)


def _union_fail(n, m, p, drow):
  """Lemma 4 per cell: `drow / 2` for `Z < Z_lower`, plus `P(Bin(n - 1, p) >= m)` (`[..., C]`)."""
  inv_safe = 1.0 / _safety(p.dtype)
  # `_prob_up`: a float32 tail below 0 (-inf at n = 1e8) would otherwise admit any m.
  return 0.5 * drow + _prob_up(_binom_tail(n - 1.0, m[..., None] - 1.0, p) * inv_safe)


def _np_cell_fail(n, nm1, eps, drow, p_cell, parts, chernoff, level):
  """`_fail_fn`'s `cell_fail` in NumPy: Lemma 4, then 6, then 5, each where still needed."""
  ta, tb, _, c, moments = parts  # `moments` and `chernoff[1]`: `_npsearch.PerCell`s

  def lemma6(m, sub):
    lam_a, top, rest = chernoff[1].get(sub)
    return _chernoff_fail(nm1, m, eps, chernoff[0], (lam_a[0], top, rest), k_axis=-2)

  def cell_fail(m, cells=None):
    idx = _xp.NP.arange(ta.shape[0]) if cells is None else _xp.NP.asarray(cells)
    sub = lambda f: lambda cols: f(m, idx[cols])
    lemma5 = lambda m, i: _orderstat_fail(nm1, m, eps, ta[i], tb[i], c, moments.get(i))
    bounds = [sub(lemma5)] if chernoff is None else [sub(lemma6), sub(lemma5)]
    return _npsearch.min_bounds(_union_fail(n, m, p_cell[idx], drow), bounds, level)

  return cell_fail


def _sparsity_core(n, tau_lo, tau_hi, eps, log_drow):
  """Scalar core of Theorem 1 for a given tau interval: `(k_gauss, p*)`."""
  xp = _xp.of(n, tau_lo, tau_hi, eps, log_drow)
  parts = _row_parts(n, tau_lo, tau_hi, log_drow)
  nm1 = xp.maximum(n - 1.0, 1.0)
  c = _g_grid(nm1, _NUM_APRIORI_G_CELLS, tau_hi.dtype)
  drow = xp.exp(log_drow)
  if xp is _xp.NP:  # per two bands of tau cells, when first asked
    ta, tb = parts[0], parts[1]

    def lemma6(idx):  # lam A is the same for every cell: kept as a row per cell
      lam_a, top, rest = _chernoff_parts(eps, ta[idx], tb[idx], c, **_LEMMA6)
      top, rest = (xp.ascontiguousarray(v.transpose(0, 2, 1)) for v in (top, rest))  # [W, K, L]
      return xp.broadcast_to(lam_a, (idx.shape[0], lam_a.shape[0])), top, rest

    # Two bands of shared offsets at a time: fewer pieces to copy together than one band.
    chernoff = (c, _npsearch.PerCell(ta.shape[0], lemma6, 2 * _laplace._BAND))
  else:
    chernoff = (c, _chernoff_parts(eps, parts[0], parts[1], c, **_LEMMA6))
  cell_fail, p_star = _fail_fn(n, parts, eps, log_drow, chernoff, level=drow)
  # The scan stops by m = ceil(1/eps), where the order-statistic bound is 0, and
  # by m = n (only n - 1 off-diagonal entries); m - 1 entries plus the diagonal.
  witness = _witness_cell(parts[0], parts[1])  # first guess: the largest tau cell
  k = _first_admissible_m(n, cell_fail, drow, witness, parts[0].shape[0])
  return xp.where(n <= 1.0, n, k), p_star


def sparsity_bound(
  n: ArrayLike,
  sigma: ArrayLike,
  norms: InteractionNorms,
  *,
  eps: ArrayLike,
  delta: ArrayLike = DEFAULT_DELTA,
) -> SparsityBound:
  """Theorem 1: a k such that every row is (eps, k)-sparse with prob `>= 1 - delta`.

  For `n` i.i.d. rows `x_i ~ N(0, sigma^2 I_d)` and scores `x_i^T M x_j`, with
  probability at least `1 - delta` every one of the `n` rows of the softmax
  matrix has at most `k` entries larger than `eps`. The failure probability
  is split in two halves: `delta / 2` for the tau interval (`tau_range`) and
  `delta / 2` for the rows, `delta / (2 n)` each by a union bound. Per row,
  given tau in a cell of the interval, the best of three bounds on
  `P(at least m off-diagonal entries > eps)` is used: a union bound (half for a
  lower bound on the normaliser, half for a binomial count of exceedances), an
  order-statistic bound, and one Chernoff bound on the sums above and below the
  m-th largest score (docs/theory.md, Theorem 1, Lemmas 4-6).

  Everything is a jnp function of its arguments: jit and vmap over any of them.

  Args:
    n: sequence length (integer-valued, >= 1).
    sigma: input standard deviation (> 0).
    norms: `InteractionNorms` of `M` (`interaction_norms(M)` or
      `interaction_norms_from_weights(w_q, w_k)`), each `>= 0`.
    eps: threshold in (0, 1).
    delta: failure probability in (0, 1), default 1e-4.

  Returns:
    `SparsityBound`; `k` never exceeds the trivial `min(ceil(1/eps) - 1, n)` and
    `informative` says whether the Gaussian bound beat it.
  """
  _check_n(n)
  _check("sigma", sigma, lo=0, lo_open=True)
  _check_eps(eps)
  _check_delta(delta)
  frob, op, gram = _norm_fields(norms)
  return SparsityBound(*_on_flat(_SPARSITY, (n, sigma, eps, delta, frob, op, gram)))


def _sparsity_scalar(n, sigma, eps, delta, frob, op, gram):
  xp = _xp.of(n, sigma, eps, delta, frob, op, gram)
  tlo, thi, log_row = _row_setting(n, sigma, delta, frob, op, gram)
  k_g, p = _sparsity_core(n, tlo, thi, eps, log_row)
  triv = _trivial_k(n, eps)
  ok = _valid(
    n >= 1, sigma > 0, eps > 0, eps < 1, delta > 0, delta < 1, frob >= 0, op >= 0, gram >= 0
  )
  nan = xp.asarray(xp.nan, n.dtype)
  k = xp.where(ok, xp.minimum(k_g, triv), nan)
  return (
    k,
    triv,
    ok & (k_g < triv),
    xp.where(ok, k_g, nan),
    xp.where(ok, p, nan),
    tlo,
    thi,
  )


class SparsityEpsBound(NamedTuple):
  """Result of `sparsity_eps_bound`.

  Attributes:
    eps: with probability `>= 1 - delta` every row is (eps, k)-sparse;
      `min(eps_gauss, trivial_eps)` (0 when `k >= n`).
    trivial_eps: `1 / (k + 1)`, true for every probability row.
    informative: `eps_gauss < trivial_eps`.
    eps_gauss: the Gaussian bound alone.
  """

  eps: jax.Array
  trivial_eps: jax.Array
  informative: jax.Array
  eps_gauss: jax.Array


def sparsity_eps_bound(
  n: ArrayLike,
  sigma: ArrayLike,
  norms: InteractionNorms,
  *,
  k: ArrayLike,
  delta: ArrayLike = DEFAULT_DELTA,
) -> SparsityEpsBound:
  """Inverse of Theorem 1: the eps achieved for a given k.

  Returns `eps` such that, with probability `>= 1 - delta`, every row has at
  most `k` entries above `eps`. Same events and split as `sparsity_bound`, so
  `sparsity_bound(..., eps=e).k <= k` for every `e` slightly above the
  returned `eps_gauss` (up to the bisection resolution of the binomial
  inversion, which errs on the safe side).

  Args:
    n: sequence length (integer-valued, >= 1).
    sigma: input standard deviation (> 0).
    norms: `InteractionNorms` of `M`.
    k: number of allowed large entries (integer-valued, >= 1).
    delta: failure probability in (0, 1).

  Returns:
    `SparsityEpsBound`.
  """
  _check_n(n)
  _check("sigma", sigma, lo=0, lo_open=True)
  _check("k", k, lo=1, integer=True)
  _check_delta(delta)
  frob, op, gram = _norm_fields(norms)
  return SparsityEpsBound(*_on_flat(_EPS, (n, sigma, k, delta, frob, op, gram)))


def _eps_scalar(n, sigma, k, delta, frob, op, gram):
  xp = _xp.of(n, sigma, k, delta, frob, op, gram)
  tlo, thi, log_row = _row_setting(n, sigma, delta, frob, op, gram)
  # 1/(k+1), rounded up when fl(1/(k+1)) is below it: k+1 entries above eps need (k+1) eps < 1.
  r = 1.0 / (k + 1.0)
  r = xp.where(_mul_less_than_one(k + 1.0, r), xp.nextafter(r, xp.inf), r)
  triv = xp.where(k >= n, 0.0, r)
  # Bisection on log eps; `hi` is always an eps whose Theorem-1 k is <= k (verified).
  lo = xp.log(1e-3 / n)
  hi = xp.log(triv)
  drow = xp.exp(log_row)
  kk = xp.minimum(k, n)
  # Every bisection step that accepts needs Lemma 5 on most cells: its moments at once.
  parts = _row_parts(n, tlo, thi, log_row, group=_NUM_CELLS, m=kk)  # NumPy: m = k throughout

  cells = _npsearch.CellOrder()  # NumPy: the cells worst-first, to reject at the first batch

  def admissible(log_eps):
    # fail(k) <= drow implies the first admissible m of Theorem 1 is <= k, for
    # this eps and (fail being non-increasing in eps) every larger one.
    cell_fail, _ = _fail_fn(n, parts, xp.exp(log_eps), log_row, level=drow)
    if xp is _xp.NP:
      fail = lambda idx: cell_fail(kk) if idx is None else cell_fail(kk, idx)
      return not cells.exceeds(fail, drow, nan_exceeds=True)[0]
    return xp.max(cell_fail(kk)) <= drow

  found = admissible(hi)

  def body(_, state):
    lo, hi = state
    mid = 0.5 * (lo + hi)
    ok = admissible(mid)
    return xp.where(ok, lo, mid), xp.where(ok, mid, hi)

  _, hi = xp.fori_loop(0, _EPS_BISECTION_STEPS, body, (lo, hi))
  eps_g = xp.where(k >= n, 0.0, xp.where(found, xp.exp(hi), xp.inf))
  ok = _valid(n >= 1, sigma > 0, k >= 1, delta > 0, delta < 1, frob >= 0, op >= 0, gram >= 0)
  nan = xp.asarray(xp.nan, n.dtype)
  eps = xp.minimum(eps_g, triv)
  return (
    xp.where(ok, eps, nan),
    triv,
    ok & (eps_g < triv),
    xp.where(ok, eps_g, nan),
  )


_SPARSITY = _RowsFormula(_sparsity_scalar, stacked=_witness_moments)
_EPS = _RowsFormula(_eps_scalar)
