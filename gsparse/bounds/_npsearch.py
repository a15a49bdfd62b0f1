"""NumPy versions of the two searches over tau cells that skip cells whose value cannot matter.

A bound that is the maximum over tau cells is compared with a level: the
Theorem-1 scan rejects an `m` as soon as one cell exceeds it, and the bisection
of the inverse rejects an `eps` likewise. The jax evaluator computes every cell
(fixed shapes); on Python numbers these versions evaluate the cells worst-first
in small batches (the order of the last complete evaluation) and stop at the
first batch that settles the comparison. Each cell's value is the same
elementwise computation either way, so every decision, and every result, is
the one of the complete evaluation (for the scan, as long as no cell is NaN;
valid inputs give none).
"""

from __future__ import annotations

import numpy as np

# Cells per batch: enough that the worst cells of the last evaluation usually settle a rejection.
_BATCH = 8


class CellOrder:
  """The cells sorted worst-first at the last complete evaluation (None before the first)."""

  def __init__(self):
    self.order: np.ndarray | None = None

  def exceeds(self, fail, level, *, nan_exceeds: bool) -> tuple[bool, int]:
    """`(max over cells of fail > level, the worst cell seen)`, trying the worst cells first.

    `fail(None)` evaluates every cell (`[C]`), `fail(idx)` the cells `idx`. A NaN
    maximum counts as `nan_exceeds` (how the caller's `max` comparison reads it).
    """

    def verdict(vals):
      return nan_exceeds if np.isnan(vals).any() else bool(np.max(vals) > level)

    if self.order is None or self.order.size <= _BATCH:
      vals = np.atleast_1d(fail(None))
      self.order = np.argsort(-vals, kind="stable")
      return verdict(vals), int(np.argmax(vals))
    head, rest = self.order[:_BATCH], self.order[_BATCH:]
    vals = fail(head)
    if np.isnan(vals).any() or np.max(vals) > level:
      return verdict(vals), int(head[np.argmax(vals)])
    rest_vals = fail(rest)
    vals, cells = np.concatenate([vals, rest_vals]), np.concatenate([head, rest])
    self.order = cells[np.argsort(-vals, kind="stable")]
    return verdict(rest_vals), int(cells[np.argmax(vals)])


def first_admissible_m(n, cell_fail, drow, witness, chunk):
  """`_first_admissible_m` for NumPy scalars: the same first `m`, fewer cells evaluated.

  The witness cell is checked at `chunk` values of m at once, as in the jax
  scan; at the first m it does not reject, the cells are checked worst-first
  (`CellOrder`) instead of all at once.
  """
  m, w, cells = np.float64(1.0), int(witness), CellOrder()
  steps = np.arange(chunk, dtype=np.float64)
  while True:
    ms = m + steps
    ok = ~(cell_fail(ms, np.asarray([w]))[..., 0] > drow) | (ms >= n)
    if not ok.any():
      m = m + chunk
      continue
    m = ms[np.argmax(ok)]
    if m >= n:
      return np.minimum(m, n)
    fail = lambda idx, m=m: cell_fail(m) if idx is None else cell_fail(m, idx)
    rejected, worst = cells.exceeds(fail, drow, nan_exceeds=False)
    if not rejected:
      return m
    w, m = worst, m + 1.0
