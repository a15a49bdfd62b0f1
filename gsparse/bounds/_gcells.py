"""Sums over the cells of an order statistic and the scan over m (Theorems 1 and 1R).

Shared by the order-statistic core (Lemma 5) and the Chernoff core (Lemma 6) of
docs/theory.md, section 3.
"""

from __future__ import annotations

import numpy as np

from gsparse.bounds import _memo, _npsearch, _xp
from gsparse.bounds._common import _safety


def _sum_over_g_cells(nm1, m, c, b, head_nm1=None):
  """`P(K >= m) <= P(G <= c_0) + sum_l P(G in (c_{l-1}, c_l]) Bt_l + P(G > c_L)` (Lemma 5).

  `G` is the m-th largest of `nm1` standard normals, `b[..., l]` bounds the
  conditional failure probability on the cell `(c_l, c_{l+1}]` and `Bt` is its
  running maximum; Abel summation leaves only nonnegative coefficients of the
  rounded-up binomial tails `T_l = P(G > c_l)`. `m` broadcasts against
  `b[..., 0]` (one `m` per leading index of `b`). `head_nm1` (default `nm1`) is the
  number of normals in `P(G <= c_0)` (Lemma 6's uniform-in-n form for causal rows).
  """
  xp = _xp.of(nm1, m, c, b)
  bt = xp.cummax(b, axis=-1)  # non-decreasing in l
  tails = _np_g_tails if xp is _xp.NP else _g_tails
  t, head = tails(nm1, m, c, head_nm1, _safety(c.dtype))
  body = xp.sum(t[..., 1:-1] * (bt[..., 1:] - bt[..., :-1]), axis=-1)
  total = head + t[..., 0] * bt[..., 0] + body + t[..., -1] * (1.0 - bt[..., -1])
  return xp.minimum(total, 1.0)


def _g_tails(nm1, m, c, head_nm1, safety):
  """`(T, P(G <= c_0))` of `_sum_over_g_cells`, rounded up: functions of n, m and the grid."""
  xp = _xp.of(nm1, m, c, head_nm1)
  inv_safe = 1.0 / safety
  rest = xp.maximum(nm1 - m + 1.0, 1.0)
  t = xp.betainc_rows(m, rest, xp.ndtr(-c))  # [..., L + 1]
  t = _prob_up(t * inv_safe)
  rest_h = rest if head_nm1 is None else xp.maximum(head_nm1 - m + 1.0, 1.0)
  return t, _prob_up(xp.betainc(rest_h, m, xp.ndtr(c[0])) * inv_safe)


# `_np_g_tails` results kept (every head of a ranking, every cell batch of a scan asks the
# same m at the same n again): about 1000 entries of 32 m at 65 levels.
_TAILS = _memo.Memo(32 << 20)


def _np_g_tails(nm1, m, c, head_nm1, safety):
  """`_g_tails` in NumPy, each `(n, m, grid)` computed once (the same arrays; read-only)."""
  return _TAILS.lookup(
    _memo.key(nm1, m, c, head_nm1, safety),
    lambda: tuple(np.asarray(v) for v in _g_tails(nm1, m, c, head_nm1, safety)),
  )


def _prob_up(p):
  """`min(p, 1)` for a probability rounded up; 1 where `p` is NaN or negative.

  jax's float32 `betainc` returns `-inf`, `inf` or NaN at large `b` (`n = 1e8`, `m =
  200`); any value outside `[0, 1]` says nothing, and 1 is the bound that always holds.
  """
  xp = _xp.of(p)
  return xp.where(p >= 0.0, xp.minimum(p, 1.0), 1.0)


# m values whose bound is checked at one cell per step of the Theorem-1 scan.
_SCAN_CHUNK = 32


def _first_admissible_m(n, cell_fail, drow, witness, count=None):
  """The first `m` in `1, ..., n - 1` whose bound `max_cells cell_fail(m)` is `<= drow`, else `n`.

  Every m is decided as by checking the bounds in order (`fail(m) > drow`
  means "not admissible"), but cheaply: `fail(m) > drow` as soon as one cell
  (the witness, the worst cell of the last rejected m) exceeds `drow`, so the
  witness cell is evaluated at `_SCAN_CHUNK` m at once and all cells only at
  the first m it does not reject (if that m is rejected, its worst cell
  becomes the witness). A bisection would need the bound to be monotone in m,
  which it need not be; the first hit makes k monotone in eps. A NaN bound is
  never admissible (it certifies nothing; `n`, the trivial k, remains). `count` (the
  number of cells, NumPy only) lets the first check of all cells start with a
  few spread ones (`_npsearch.CellOrder`).
  """
  xp = _xp.of(n, drow)
  if xp is _xp.NP:
    return _npsearch.first_admissible_m(n, cell_fail, drow, witness, _SCAN_CHUNK, count)
  steps = xp.arange(_SCAN_CHUNK, dtype=n.dtype)

  def body(state):
    m0, w, _ = state
    ms = m0 + steps
    ok_w = (cell_fail(ms, w[None])[..., 0] <= drow) | (ms >= n)  # NaN: not admissible
    m1 = xp.where(xp.any(ok_w), ms[xp.argmax(ok_w)], m0 + _SCAN_CHUNK)
    full = cell_fail(m1)
    done = (m1 >= n) | (xp.max(full) <= drow)
    return xp.where(done, m1, m1 + 1.0), xp.where(done, w, xp.argmax(full)), done

  init = (xp.ones_like(n), xp.asarray(witness), xp.asarray(False))
  m, _, _ = xp.while_loop(lambda state: ~state[2], body, init)
  return xp.minimum(m, n)
