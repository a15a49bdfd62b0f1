"""Theorems 1 and 2 under a causal mask: row i attends to its first i keys (docs/theory.md, 3.1).

Row `i` has `i` keys (itself and the `i - 1` earlier ones), and the failure
budget is split as `delta_i = 6 delta / (pi^2 i^2)` (these sum to less than
`delta`). Rows are handled in dyadic groups `i in (2^{j-1}, 2^j]`, each with the
smallest budget of the group, `6 delta / (pi^2 4^j)`, and a bound that holds for
every number of keys in the group: Lemma 6 in its uniform-in-n form for the
sparsity, Theorem 2R's cell bounds between two quantiles of `G` for the tail.
"""

from __future__ import annotations

import math
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
  _check_eps,
  _check_n,
  _norm_isf,
  _on_flat,
  _valid,
)
from gsparse.bounds._gcells import _first_admissible_m
from gsparse.bounds.norms import InteractionNorms, _norm_fields
from gsparse.bounds.row import _chernoff_fail, _chernoff_parts, _g_grid
from gsparse.bounds.row_tail import _tail_cell_bounds, _tail_parts
from gsparse.bounds.sparsity import _trivial_k
from gsparse.bounds.tau import _cells, _tau_range_point

_GROUP_SHARE = 6.0 / math.pi**2  # sum_i 1/i^2 = pi^2 / 6
_T_STEPS = 14  # bisection steps on log(t0 / (1 - t0)) (resolution 42 / 2^14)
_NUM_TAIL_G_CELLS = 48  # cells of G between its two quantiles (causal Theorem 2)
_NUM_CAUSAL_G_CELLS = 32  # cells of G per group (causal Theorem 1; one group per octave of rows)


class CausalBound(NamedTuple):
  """Result of `causal_sparsity_bound` / `causal_tail_bound`.

  Attributes:
    value: the bound (k, or the tail mass), the worst over the row groups.
    worst_group: `j` of the group `(2^{j-1}, 2^j]` that attains it (0 for row 1).
  """

  value: jax.Array
  worst_group: jax.Array


def _groups(xp, n):
  """Number of dyadic groups `j = 1, ..., J` with `2^{j-1} + 1 <= n`: `ceil(log2 n)`."""
  num = xp.ceil(xp.log2(xp.maximum(n, 1.0)) - 1e-9)
  return int(num) if xp is _xp.NP else num.astype("int32")


def _group(xp, n, j, delta):
  """`(N1, N2, delta_j)`: off-diagonal key counts of rows `(2^{j-1}, 2^j] & [1, n]`, budget."""
  jf = xp.asarray(j, n.dtype)
  lo = xp.exp2(jf - 1.0)  # rows 2^{j-1} + 1 ... have 2^{j-1} ... off-diagonal keys
  hi = xp.minimum(xp.exp2(jf), n) - 1.0
  return lo, hi, delta * _GROUP_SHARE * xp.exp2(-2.0 * jf)


def _causal_k_scalar(n, sigma, eps, delta, frob, op, gram):
  xp = _xp.of(n, sigma, eps, delta, frob, op, gram)

  def body(j, state):
    k, arg = state
    lo, hi, dj = _group(xp, n, j + 1, delta)
    # Half of delta_j for the row's tau (both sides), half for its count.
    tlo, thi = _tau_range_point(xp.ones_like(n), sigma, frob, op, gram, 0.5 * dj)
    ta, tb = _cells(tlo, thi)
    ta, tb = ta[0::2], tb[1::2]  # pairs of adjacent cells merged: 32 cells still cover the range
    c = _g_grid(hi, _NUM_CAUSAL_G_CELLS, n.dtype)
    parts = _chernoff_parts(eps, ta, tb, c)

    def fail(m, cells=None):
      return _chernoff_fail(lo, m, eps, c, parts, cells, nm1_hi=hi)

    # m - 1 off-diagonal entries plus the diagonal; a row has at most hi + 1 keys.
    kj = _first_admissible_m(hi + 1.0, fail, 0.5 * dj, ta.shape[0] - 1)
    return xp.maximum(k, kj), xp.where(kj > k, j + 1.0, arg)

  init = (xp.ones_like(n), xp.zeros_like(n))  # row 1: its one key
  k, arg = xp.fori_loop(0, _groups(xp, n), body, init)
  ok = _valid(
    n >= 1, sigma > 0, eps > 0, eps < 1, delta > 0, delta < 1, frob >= 0, op >= 0, gram >= 0
  )
  k = xp.minimum(k, _trivial_k(n, eps))
  return xp.where(ok, k, xp.nan), arg


def _causal_tail_fail(lo, hi, k, tau, t0, dside, c):
  """Bound on `P(t > t0)` for every row with `lo..hi` off-diagonal keys, given `tau_i >= tau`.

  `c = (grid, _tail_parts(tau, grid))` with `grid = _causal_g_range(lo, hi, k, dside)`.
  `G` (the k-th largest) lies in `[c_lo, c_hi]` except w.p. `2 dside` for every such
  row (`G` is stochastically increasing in the number of keys); in between, the worst
  cell bound of Theorem 2R with the most summands below `G` (`hi - k`).
  """
  xp = _xp.of(lo, hi, k, tau, t0, dside)
  b = _tail_cell_bounds(hi - k, k, tau, t0, c[0], c[1])
  return xp.minimum(2.0 * dside + xp.max(b), 1.0)


def _causal_g_range(lo, hi, k, dside):
  """`[L + 1]` cells on `[c_lo, c_hi]`, the range of G for every row with `lo..hi` keys."""
  xp = _xp.of(lo, hi, k, dside)
  c_hi = _norm_isf(_binom_max_p(hi, k, dside))
  c_lo = _norm_isf(_binom_min_p(xp.maximum(lo, k), k, dside))
  u = xp.linspace(0.0, 1.0, _NUM_TAIL_G_CELLS + 1, dtype=lo.dtype)
  return c_lo + u * xp.maximum(c_hi - c_lo, 0.0)


def _causal_tail_scalar(n, sigma, k, delta, frob, op, gram):
  xp = _xp.of(n, sigma, k, delta, frob, op, gram)
  kk = xp.maximum(k, 2.0)

  def body(j, state):
    t, arg = state
    lo, hi, dj = _group(xp, n, j + 1, delta)
    tlo, _ = _tau_range_point(xp.ones_like(n), sigma, frob, op, gram, 0.5 * dj)
    grid = _causal_g_range(lo, hi, kk, 0.125 * dj)
    c = (grid, _tail_parts(tlo, grid))

    def ok(z):  # z = log(t0 / (1 - t0)); an eighth of delta_j per side of G, a quarter inside
      return _causal_tail_fail(lo, hi, kk, tlo, xp.sigmoid(z), 0.125 * dj, c) <= 0.5 * dj

    def bisect(_, st):
      a, b = st
      mid = 0.5 * (a + b)
      good = ok(mid)
      return xp.where(good, a, mid), xp.where(good, mid, b)

    a0, b0 = xp.asarray(-30.0, n.dtype), xp.asarray(12.0, n.dtype)
    _, b = xp.fori_loop(0, _T_STEPS, bisect, (a0, b0))
    tj = xp.where(ok(b), xp.sigmoid(b), 1.0)
    tj = xp.minimum(tj, 1.0 - k / (hi + 1.0))  # rows with hi + 1 keys: top-k holds >= k/(hi+1)
    tj = xp.where(hi + 1.0 <= k, 0.0, tj)  # at most k keys: nothing dropped
    return xp.maximum(t, tj), xp.where(tj > t, j + 1.0, arg)

  init = (xp.zeros_like(n), xp.zeros_like(n))
  t, arg = xp.fori_loop(0, _groups(xp, n), body, init)
  t = xp.where(k < 2.0, xp.where(n > 1.0, 1.0 - 1.0 / n, 0.0), t)  # k = 1: only 1 - 1/i
  ok = _valid(n >= 1, sigma > 0, k >= 1, delta > 0, delta < 1, frob >= 0, op >= 0, gram >= 0)
  return xp.where(ok, t, xp.nan), arg


_CAUSAL_K = PointFormula(_causal_k_scalar)
_CAUSAL_TAIL = PointFormula(_causal_tail_scalar)


def causal_sparsity_bound(
  n: ArrayLike,
  sigma: ArrayLike,
  norms: InteractionNorms,
  *,
  eps: ArrayLike,
  delta: ArrayLike = DEFAULT_DELTA,
) -> CausalBound:
  """Theorem 1C: under a causal mask every row is (eps, k)-sparse with prob `>= 1 - delta`.

  Row `i` attends to keys `1..i`; the budget `delta_i = 6 delta / (pi^2 i^2)`
  is split per row, half for its `tau_i` and half for its count (docs/theory.md,
  section 3.1). Same setting as `sparsity_bound` otherwise.

  Args:
    n: number of rows = keys (integer-valued, >= 1).
    sigma: input standard deviation (> 0).
    norms: `InteractionNorms` of `M`.
    eps: threshold in (0, 1).
    delta: failure probability in (0, 1), default 1e-4.

  Returns:
    `CausalBound(value=k, worst_group)`; `k` never exceeds the trivial
    `min(ceil(1/eps) - 1, n)`.
  """
  _check_n(n)
  _check("sigma", sigma, lo=0, lo_open=True)
  _check_eps(eps)
  _check_delta(delta)
  frob, op, gram = _norm_fields(norms)
  return CausalBound(*_on_flat(_CAUSAL_K, (n, sigma, eps, delta, frob, op, gram)))


def causal_tail_bound(
  n: ArrayLike,
  sigma: ArrayLike,
  norms: InteractionNorms,
  *,
  k: ArrayLike,
  delta: ArrayLike = DEFAULT_DELTA,
) -> CausalBound:
  """Theorem 2C: under a causal mask every row's top-k tail mass is `<= value` w.p. `>= 1 - delta`.

  Rows with at most `k` keys drop nothing. With Lemma 1 the top-k error of row
  `i` is at most the result times `2 max_j ||v_j||` (docs/theory.md, section 4).

  Args:
    n: number of rows = keys (integer-valued, >= 1).
    sigma: input standard deviation (> 0).
    norms: `InteractionNorms` of `M`.
    k: kept keys per row (integer-valued, >= 1).
    delta: failure probability in (0, 1), default 1e-4.

  Returns:
    `CausalBound(value=tail bound, worst_group)`.
  """
  _check_n(n)
  _check("sigma", sigma, lo=0, lo_open=True)
  _check("k", k, lo=1, integer=True)
  _check_delta(delta)
  frob, op, gram = _norm_fields(norms)
  return CausalBound(*_on_flat(_CAUSAL_TAIL, (n, sigma, k, delta, frob, op, gram)))
