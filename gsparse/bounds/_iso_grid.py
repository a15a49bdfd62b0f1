"""Theorem 2V's worst grid cell (docs/theory.md 4.2): the maximum of the isotropic sum.

`_grid_error` bounds the error on the grid of `value_apriori` at given levels of the
Gaussian events (v), (vi): under jax every (tau cell, theta cell, `g_(1)` cell) is
evaluated (`_worst`); NumPy evaluates only the (tau cell, theta cell) rows whose upper
bound (`_cell_upper`) can reach the largest sum seen (`_np_rows`), with the same result.
"""

from __future__ import annotations

from gsparse.bounds import _xp
from gsparse.bounds._common import _norm_isf
from gsparse.bounds._iso_cases import _cell_parts, _combine, _head_sum, _t_part
from gsparse.bounds._iso_events import quad_form_hi

_NP_ROWS = 256  # (tau cell, theta cell) rows per NumPy step (a [256, 1, G] temporary is 100 KB)


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
  full = total_h.shape  # [C, L, G]: each head part broadcast to it, read at the maximum
  split = [
    xp.where(in_head, xp.broadcast_to(ph, full)[c, row, g], pt[c, 0, g_t])
    for ph, pt in zip(head, tail, strict=True)
  ]
  return cell, (c, None), split
