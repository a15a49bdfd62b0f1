"""NumPy versions of the two searches over tau cells that skip cells whose value cannot matter.

A bound that is the maximum over tau cells is compared with a level: the
Theorem-1 scan rejects an `m` as soon as one cell exceeds it, and the bisection
of the inverse rejects an `eps` likewise. The jax evaluator computes every cell
(fixed shapes); on Python numbers these versions evaluate the cells worst-first
in small batches (the order of the last complete evaluation) and stop at the
first batch that settles the comparison. Each cell's value is the same
elementwise computation either way, so every decision, and every result, is
the one of the complete evaluation (as long as no cell is NaN; valid inputs
give none).

Theorem 1's cell value is the minimum of three bounds (Lemmas 4, 5 and 6),
compared with a level: `min_bounds(...)` evaluates them one after the other,
each only where the ones before leave the value above the level, and
`PerCell` computes a cell's parts (Lemma 5's moments, Lemma 6's transforms)
the first time that cell is asked. A value at or below the level may then be
a larger bound that is still at or below it; every comparison with the level,
and every cell found above it (with its value), is that of the complete
evaluation. `_LAZY = False` evaluates everything (the tests compare the two).
"""

from __future__ import annotations

import numpy as np

# Cells per batch: enough that the worst cells of the last evaluation usually settle a rejection.
_BATCH = 8
# Whether bounds and parts are evaluated only where a comparison needs them (False: everywhere).
_LAZY = True


class PerCell:
  """Per-cell parts of a bound, computed for a cell the first time it is asked, kept for the call.

  `compute(idx)` returns a tuple of arrays whose leading axis runs over the
  cells `idx`, each cell's rows the same whatever else is in `idx`. Cells are
  computed in aligned groups of `group` (the shared-offset bands of Lemma 6's
  transforms, so that a cell's parts are those of the complete evaluation).
  """

  def __init__(self, count: int, compute, group: int = 1):
    self._count, self._compute = count, compute
    self._group = group if count % group == 0 else count
    self._done = np.zeros(count, bool)
    self._store: list[np.ndarray] | None = None

  def put(self, idx, vals) -> None:
    """Keeps `vals` (what `compute(idx)` gives, computed elsewhere) as the cells' parts."""
    idx = np.asarray(idx)
    if self._store is None and idx.size == self._count:  # all at once: kept as copies
      self._store = [np.array(v, copy=True) for v in vals]
    else:
      if self._store is None:
        self._store = [np.empty((self._count, *v.shape[1:]), v.dtype) for v in vals]
      for store, v in zip(self._store, vals, strict=True):
        store[idx] = v
    self._done[idx] = True

  def get(self, idx=None) -> tuple[np.ndarray, ...]:
    """The parts of the cells `idx` (`[W]` integer array; None: every cell)."""
    want = np.arange(self._count) if idx is None or not _LAZY else np.asarray(idx)
    missing = want[~self._done[want]]
    if missing.size:
      groups = np.unique(missing // self._group)
      missing = (groups[:, None] * self._group + np.arange(self._group)).reshape(-1)
      self.put(missing, self._compute(missing))
    if idx is None:
      return tuple(self._store)
    idx = np.asarray(idx)
    if idx.size and idx[-1] - idx[0] + 1 == idx.size and np.all(np.diff(idx) == 1):
      return tuple(store[idx[0] : idx[-1] + 1] for store in self._store)  # a run: views, no copies
    return tuple(store[idx] for store in self._store)


def min_bounds(first, bounds, level):
  """`min(first, *(b(cols) for b in bounds))` where it matters for a comparison with `level`.

  `first` is a `[..., W]` array of values; each `bound(cols)` gives `[..., len(cols)]`
  values for the columns `cols` (cells). A later bound is evaluated only on
  the columns where some entry is still above `level` (or NaN); with `level`
  None or `_LAZY` off, on every column. Entries `<= level` stay `<= level`, the
  others get the exact minimum, except that for `[W]` values (one comparison
  of their maximum) the last bound goes to the `_BATCH` worst open columns
  first and to the others only if those all end `<= level`; otherwise the
  maximum is then above `level` as in the complete evaluation, and the columns
  not reached keep values above `level` (upper bounds of the exact ones).
  """
  out = np.array(first, dtype=np.float64)
  for i, bound in enumerate(bounds):
    if level is None or not _LAZY:
      out[..., :] = np.minimum(out, bound(np.arange(out.shape[-1])))
      continue
    open_ = ~(out <= level)
    cols = np.nonzero(open_.reshape(-1, out.shape[-1]).any(axis=0))[0]
    if cols.size == 0:
      break
    if out.ndim != 1 or i < len(bounds) - 1:
      out[..., cols] = np.minimum(out[..., cols], bound(cols))
      continue
    cols = cols[np.argsort(-out[cols], kind="stable")]  # NaN last: still reached
    for batch in (cols[:_BATCH], cols[_BATCH:]):  # the worst first, then all the others
      if batch.size:
        out[batch] = np.minimum(out[batch], bound(batch))
      if not (out[batch] <= level).all():
        break
  return out


class CellOrder:
  """The cells sorted worst-first at the last complete evaluation (None before the first).

  With `count`, before the first complete evaluation the cells are tried
  `_BATCH` evenly spread ones first (a first rejection then needs no complete
  evaluation).
  """

  def __init__(self, count: int | None = None):
    self.order: np.ndarray | None = None
    self.complete = False  # whether `order` comes from a complete evaluation
    if count is not None and count > _BATCH:
      head = np.unique(np.round(np.linspace(0, count - 1, _BATCH)).astype(np.int64))
      self.order = np.concatenate([head, np.setdiff1d(np.arange(count), head)])

  def exceeds(self, fail, level, *, nan_exceeds: bool) -> tuple[bool, int]:
    """`(max over cells of fail > level, the worst cell seen)`, trying the worst cells first.

    `fail(None)` evaluates every cell (`[C]`), `fail(idx)` the cells `idx`. A NaN
    maximum counts as `nan_exceeds` (how the caller's `max` comparison reads it).
    """

    def verdict(vals):
      return nan_exceeds if np.isnan(vals).any() else bool(np.max(vals) > level)

    if self.order is None or self.order.size <= _BATCH:
      vals = np.atleast_1d(fail(None))
      self.order, self.complete = np.argsort(-vals, kind="stable"), True
      return verdict(vals), int(np.argmax(vals))
    head, rest = self.order[:_BATCH], self.order[_BATCH:]
    vals = fail(head)
    if np.isnan(vals).any() or np.max(vals) > level:
      return verdict(vals), int(head[np.argmax(vals)])
    rest_vals = fail(rest)
    vals, cells = np.concatenate([vals, rest_vals]), np.concatenate([head, rest])
    self.order, self.complete = cells[np.argsort(-vals, kind="stable")], True
    return verdict(rest_vals), int(cells[np.argmax(vals)])

  def promote(self, cells) -> None:
    """Puts `cells` first (a guess at the worst ones, before any complete evaluation)."""
    if self.order is not None and not self.complete:
      cells = np.asarray(cells)
      self.order = np.concatenate([cells, self.order[~np.isin(self.order, cells)]])


def first_admissible_m(n, cell_fail, drow, witness, chunk, count=None):
  """`_first_admissible_m` for NumPy scalars: the same first `m`, fewer cells evaluated.

  The witness cell is checked at `chunk` values of m at once, as in the jax
  scan (a quarter of that after the first rejected check of all cells); at the
  first m it does not reject, the cells are checked worst-first
  (`CellOrder`, spread over the `count` cells before the first complete
  evaluation) instead of all at once.
  """
  m, w, cells = np.float64(1.0), int(witness), CellOrder(count)
  steps = np.arange(chunk, dtype=np.float64)
  while True:
    ms = m + steps
    ok = (cell_fail(ms, np.asarray([w]))[..., 0] <= drow) | (ms >= n)  # NaN: not admissible
    if not ok.any():
      m = m + steps.size
      continue
    m = ms[np.argmax(ok)]
    if m >= n:
      return np.minimum(m, n)
    fail = lambda idx, m=m: cell_fail(m) if idx is None else cell_fail(m, idx)
    rejected, worst = cells.exceeds(fail, drow, nan_exceeds=True)  # a NaN certifies nothing
    if not rejected:
      return m
    # The next admissible m tends to be near: a quarter chunk per witness check from now on.
    w, m, steps = worst, m + 1.0, steps[: max(chunk // 4, 1)]
    if count is not None:  # the worst cell's neighbours are the likeliest to reject next
      cells.promote(np.arange(max(w - _BATCH // 2, 0), min(w + _BATCH // 2, count)))
