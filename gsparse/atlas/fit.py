"""The n^C law on measured attention: fit `needed k ~ alpha n^C` with a confidence interval.

At each context length `n` the rows of one head give needed k values; their
geometric mean `y(n)` is the summary, and `log y = log alpha + C log n` is
fitted by least squares. The confidence interval of `C` is a percentile
bootstrap over query rows (rows resampled with replacement within each `n`,
from a fixed seed), so it reflects how much the exponent depends on which
queries were measured; it does not cover the choice of text.

Phases (docs/theory.md section 6): a head is *collapsed* when its needed k
does not grow (`C_high < collapse_c`), *diffuse* when it grows like `n`
(`C_low > diffuse_c`), and *n^C* when the whole interval lies in
`(collapse_c, 1)`: sparsity that grows slower than the context.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import NamedTuple

import numpy as np

PHASES = ("collapsed", "n^C", "diffuse", "undetermined")


class PowerLawFit(NamedTuple):
  """`needed k ~ alpha n^C` for one head.

  Attributes:
    alpha: fitted prefactor.
    c: fitted exponent.
    c_low: lower end of the bootstrap interval of `c`.
    c_high: upper end.
    lengths: `[P]` context lengths used.
    k: `[P]` geometric mean of the needed k at each length.
  """

  alpha: float
  c: float
  c_low: float
  c_high: float
  lengths: np.ndarray
  k: np.ndarray


def _slope(log_n: np.ndarray, log_y: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
  """Least-squares `(slope, intercept)` along the last axis of `log_y`."""
  xc = log_n - log_n.mean()
  slope = (log_y - log_y.mean(-1, keepdims=True)) @ xc / np.sum(xc * xc)
  return slope, log_y.mean(-1) - slope * log_n.mean()


def fit_power_law(
  lengths: Sequence[int],
  rows: Sequence[np.ndarray],
  *,
  num_bootstrap: int = 200,
  level: float = 0.9,
  seed: int = 0,
) -> PowerLawFit:
  """Fits `k ~ alpha n^C` to per-row needed k at several context lengths.

  Args:
    lengths: `[P]` distinct context lengths (at least 2).
    rows: `P` arrays of needed k (each >= 1) of the rows measured at each length.
    num_bootstrap: bootstrap resamples of the rows.
    level: two-sided confidence level of the interval, in (0, 1).
    seed: seed of the resampling.

  Returns:
    A `PowerLawFit`.
  """
  n = np.asarray(lengths, np.float64)
  if n.ndim != 1 or n.size < 2 or len(set(n.tolist())) != n.size:
    raise ValueError(f"lengths={list(lengths)} must hold at least 2 distinct lengths")
  if len(rows) != n.size:
    raise ValueError(f"rows has {len(rows)} entries, expected one per length ({n.size})")
  if not 0.0 < level < 1.0:
    raise ValueError(f"level={level!r} must be in (0, 1)")
  logs = [np.log(np.maximum(np.asarray(r, np.float64).ravel(), 1.0)) for r in rows]
  if any(lr.size == 0 for lr in logs):
    raise ValueError("every length needs at least one row")
  log_n = np.log(n)
  log_y = np.array([lr.mean() for lr in logs])
  c, intercept = _slope(log_n, log_y)
  rng = np.random.default_rng(seed)
  boot = np.stack(
    [lr[rng.integers(0, lr.size, (num_bootstrap, lr.size))].mean(-1) for lr in logs], -1
  )  # [num_bootstrap, P]
  cs, _ = _slope(log_n, boot)
  lo, hi = np.quantile(cs, [(1 - level) / 2, (1 + level) / 2])
  return PowerLawFit(float(np.exp(intercept)), float(c), float(lo), float(hi), n, np.exp(log_y))


def classify_phase(fit: PowerLawFit, *, collapse_c: float = 0.1, diffuse_c: float = 0.9) -> str:
  """ "collapsed", "n^C", "diffuse" or "undetermined" from the exponent's interval."""
  if fit.c_high < collapse_c:
    return "collapsed"
  if fit.c_low > diffuse_c:
    return "diffuse"
  if fit.c_low >= collapse_c and fit.c_high < 1.0:
    return "n^C"
  return "undetermined"
