"""Theorem 1's lower bound on the softmax normaliser per tau cell, alone or stacked over points.

`_log_z_lower` is the bound (docs/theory.md, Theorem 1); `_RowsFormula` is the
`PointFormula` of Theorem 1 and its inverse, whose NumPy path first evaluates it
for the cells of every point at once (one call per `(n, delta)`), so that a call on
many points (`rank_layers_by_sparsity`: one per head) pays one stacked evaluation
instead of one per point. Each cell's value is the same elementwise computation,
and its own row's maximum, either way: the points get the same bits.
"""

from __future__ import annotations

import contextvars
import math

import numpy as np

from gsparse.bounds import _memo, _xp
from gsparse.bounds._common import _NUM_LEVELS, PointFormula, _log1mexp, _log_moments, _norm_isf
from gsparse.bounds.tau import _cells, _tau_range_point


def _log_z_lower(nm1, ta, tb, log_dz):
  """Lower bound on `log Z_i` valid for every `tau_i` in the cell `[ta, tb]`.

  Off-diagonal part only (`Z_i` also has the positive diagonal term). Holds
  with probability `>= 1 - exp(log_dz)` given `tau_i` in the cell. The best of
  three candidates, each chosen from `(n, cell, delta)` only (never the data):
  AM-GM, the maximum, and a lower-tail Bernstein bound on truncated summands.

  Args:
    nm1: `n - 1 >= 1`, scalar.
    ta, tb: `[C]` cell endpoints.
    log_dz: scalar log failure probability.

  Returns:
    `[C]` lower bounds (may be `-inf`).
  """
  xp = _xp.of(ta, tb, log_dz)
  ell = -log_dz
  lnm1 = xp.log(nm1)
  # AM-GM: log Z >= log(n-1) + mean_j s_ij, the mean ~ N(0, tau^2/(n-1)).
  z = _norm_isf(xp.exp(log_dz))
  amgm = lnm1 - xp.maximum(tb * z, ta * z) / xp.sqrt(nm1)
  # Maximum: P(max_j g_j < c) = Phi(c)^(n-1) = dz  =>  Phi_bar(c*) = 1 - dz^(1/(n-1)).
  cstar = _norm_isf(-xp.expm1(log_dz / nm1))
  maxb = xp.where(cstar >= 0, ta * cstar, tb * cstar)
  # Truncated summands Y = e^{tb g} (g <= 0), e^{ta g} (0 < g <= c), e^{ta c} (g > c).
  cmax = xp.sqrt(2.0 * lnm1) + 1.0
  c = xp.linspace(0.0, 1.0, _NUM_LEVELS, dtype=ta.dtype) * cmax  # [G]
  ta_, tb_, c_ = ta[:, None], tb[:, None], c[None, :]
  ninf = xp.asarray(-xp.inf, ta.dtype)
  l_tail = xp.log_ndtr(-c_)
  m_neg, m_mid, m2_neg, m2_mid = _log_moments(
    [(tb_, ninf, 0.0), (ta_, 0.0, c_), (2.0 * tb_, ninf, 0.0), (2.0 * ta_, 0.0, c_)]
  )
  ley = xp.logaddexp(xp.logaddexp(m_neg, m_mid), ta_ * c_ + l_tail)
  ley2 = xp.logaddexp(xp.logaddexp(m2_neg, m2_mid), 2.0 * ta_ * c_ + l_tail)
  r = 0.5 * xp.log(2.0 * ell / nm1) + 0.5 * ley2 - ley
  bern = xp.where(r < 0, lnm1 + ley + _log1mexp(xp.minimum(r, 0.0)), -xp.inf)
  bern = xp.max(bern, axis=-1)
  return xp.maximum(xp.maximum(amgm, maxb), bern)


def _log_z_inputs(n, tau_lo, tau_hi, log_drow):
  """`(n - 1, ta, tb, log_dz)`: `_log_z_lower`'s arguments for one row of Theorem 1.

  Union bound: `Z >= Z_lower` with probability `1 - drow / 2`; then a binomial count.
  """
  xp = _xp.of(n, tau_lo, tau_hi, log_drow)
  ta, tb = _cells(tau_lo, tau_hi)
  return xp.maximum(n - 1.0, 1.0), ta, tb, log_drow - math.log(2.0)


# NumPy path, several points: `_log_z_lower` of every point's cells, computed in one stacked call
# per (n, delta) before the points are evaluated one by one (`_RowsFormula`), keyed by its inputs.
_PREPARED: contextvars.ContextVar = contextvars.ContextVar("log_z_prepared", default=None)


def _row_setting(n, sigma, delta, frob, op, gram):
  """`(tau_lo, tau_hi, log drow)` of Theorem 1 and its inverse: `delta / 2` for tau, for rows."""
  xp = _xp.of(n, sigma, delta, frob, op, gram)
  prepared = _PREPARED.get() if xp is _xp.NP else None
  if prepared:  # computed by `_RowsFormula.numpy` for every point already
    kept = prepared.pop(("setting", _memo.key(n, sigma, delta, frob, op, gram)), None)
    if kept is not None:
      return kept
  tlo, thi = _tau_range_point(n, sigma, frob, op, gram, delta / 2.0)
  return tlo, thi, xp.log(delta / 2.0) - xp.log(n)


class _RowsFormula(PointFormula):
  """`PointFormula` whose NumPy path first computes every point's `_log_z_lower` stacked.

  Each cell's lower bound is the same elementwise computation (and its own row's
  maximum) whether its point is evaluated alone or stacked with others, so the
  values are those of the per-point evaluation; one call on `P` points costs less
  than `P` calls (`rank_layers_by_sparsity` asks one point per head). The point
  function's arguments are `(n, sigma, eps or k, delta, frob, op, gram)`. With
  `stacked(nm1, ta [P, C], tb [P, C])` (a list of P objects), each point's object
  is handed to its evaluation too (`_row_log_z`'s last output).
  """

  def __init__(self, point, *, stacked=None):
    super().__init__(point)
    self.stacked = stacked

  def numpy(self, values, dtype, *, margin_dtype, **kwargs):
    if int(np.prod(np.broadcast_shapes(*(np.shape(v) for v in values)))) < 2:
      return super().numpy(values, dtype, margin_dtype=margin_dtype, **kwargs)
    *args, tlo, thi, log_row = _SETTING.numpy(values, dtype, margin_dtype=margin_dtype)
    groups: dict[tuple, list] = {}
    prepared: dict[tuple, object] = {}
    for i in np.ndindex(tlo.shape):
      prepared["setting", _memo.key(*(a[i] for a in args))] = (tlo[i], thi[i], log_row[i])
      nm1, ta, tb, log_dz = _log_z_inputs(args[0][i], tlo[i], thi[i], log_row[i])
      groups.setdefault(_memo.key(nm1, log_dz), []).append((nm1, ta, tb, log_dz))
    with np.errstate(all="ignore"):
      for rows in groups.values():
        nm1, log_dz = rows[0][0], rows[0][3]
        ta, tb = (np.stack([r[j] for r in rows]) for j in (1, 2))
        lz = _log_z_lower(nm1, ta.reshape(-1), tb.reshape(-1), log_dz).reshape(ta.shape)
        lz.flags.writeable = False  # its rows are handed out as views
        extra = [None] * len(rows) if self.stacked is None else self.stacked(nm1, ta, tb)
        for r, v, e in zip(rows, lz, extra, strict=True):
          prepared[_memo.key(*r)] = (v, e)
    token = _PREPARED.set(prepared)
    try:
      return super().numpy(values, dtype, margin_dtype=margin_dtype, **kwargs)
    finally:
      _PREPARED.reset(token)


def _row_log_z(n, tau_lo, tau_hi, log_drow):
  """`(n - 1, ta, tb, log Z_lower [C], extra)` of one row: stacked values when prepared.

  `extra` is the row's object from `_RowsFormula`'s `stacked` (None when there is none).
  """
  xp = _xp.of(n, tau_lo, tau_hi, log_drow)
  nm1, ta, tb, log_dz = _log_z_inputs(n, tau_lo, tau_hi, log_drow)
  prepared = _PREPARED.get() if xp is _xp.NP else None
  kept = prepared.pop(_memo.key(nm1, ta, tb, log_dz), None) if prepared else None
  if kept is None:
    return nm1, ta, tb, _log_z_lower(nm1, ta, tb, log_dz), None
  return nm1, ta, tb, *kept


# A point's rounded arguments (the ones `_row_setting` sees) and its `_row_setting`.
_SETTING = PointFormula(
  lambda n, sigma, _, delta, frob, op, gram: (
    *(n, sigma, delta, frob, op, gram),
    *_row_setting(n, sigma, delta, frob, op, gram),
  )
)
