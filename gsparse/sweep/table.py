"""The sweep result table: columns, CSV input and output."""

from __future__ import annotations

import csv
import dataclasses
from typing import Any

import numpy as np

PARAMS = ("n", "d", "sigma", "weight_scale", "k", "eps")
_INT_PARAMS = ("n", "d", "k")

# Per-row quantities and the statistics kept of each (column `<name>_<stat>`).
_STATS = {
  "tau": ("mean", "max"),
  "min_k": ("mean", "q50", "q99", "max"),
  "support": ("mean", "q50", "min"),
  "tail": ("mean", "max"),
  "error": ("mean", "max"),
  "cert_tail": ("mean", "max"),
  "cert_error": ("mean", "max"),
  "v_norm": ("max",),
}
# Properties of the point's weights (means over trials if weights are redrawn).
_WEIGHT_COLUMNS = ("m_fro", "mmt_fro", "m_op", "m_trace")


def measured_columns() -> tuple[str, ...]:
  """Names of the measured columns of a sweep table, in order."""
  cols = [f"{q}_{s}" for q, stats in _STATS.items() for s in stats]
  return (*cols, *_WEIGHT_COLUMNS, "rows")


# ----------------------------------------------------------------------------
# The tidy table.


@dataclasses.dataclass(frozen=True)
class SweepTable:
  """A tidy table: one row per parameter point, one column per parameter or measure.

  Attributes:
    columns: column name -> 1-D NumPy array, all of the same length.
  """

  columns: dict[str, np.ndarray]

  def __post_init__(self):
    lengths = {k: len(v) for k, v in self.columns.items()}
    if len(set(lengths.values())) > 1:
      raise ValueError(f"columns must have equal lengths, got {lengths}")

  @property
  def names(self) -> tuple[str, ...]:
    return tuple(self.columns)

  def __len__(self) -> int:
    return len(next(iter(self.columns.values()))) if self.columns else 0

  def __getitem__(self, name: str) -> np.ndarray:
    if name not in self.columns:
      raise KeyError(f"no column {name!r}; columns are {self.names}")
    return self.columns[name]

  def rows(self) -> list[dict[str, Any]]:
    """The table as a list of `{column: Python scalar}` dicts."""
    return [{k: v[i].item() for k, v in self.columns.items()} for i in range(len(self))]

  def where(self, mask: np.ndarray) -> SweepTable:
    """The rows where the boolean `mask` is True."""
    mask = np.asarray(mask, bool)
    return SweepTable({k: v[mask] for k, v in self.columns.items()})

  def sort_by(self, *names: str) -> SweepTable:
    """Rows sorted by the given columns (first name is the primary key)."""
    order = np.lexsort([self[n] for n in reversed(names)])
    return SweepTable({k: v[order] for k, v in self.columns.items()})

  def to_csv(self, path) -> None:
    """Writes the table as CSV with a header line (floats at full precision)."""
    with open(path, "w", newline="") as f:
      w = csv.writer(f)
      w.writerow(self.names)
      for row in self.rows():
        w.writerow([repr(v) if isinstance(v, float) else v for v in row.values()])

  @classmethod
  def from_csv(cls, path) -> SweepTable:
    """Reads a table written by `to_csv` (integer columns stay integer, text stays text)."""
    with open(path, newline="") as f:
      reader = csv.reader(f)
      header = next(reader)
      data = list(reader)
    cols = {}
    for j, name in enumerate(header):
      raw = [r[j] for r in data]
      try:
        cols[name] = np.asarray([int(s) for s in raw], np.int64)
      except ValueError:
        try:
          cols[name] = np.asarray([float(s) for s in raw], np.float64)
        except ValueError:
          cols[name] = np.asarray(raw, str)
    return cls(cols)
