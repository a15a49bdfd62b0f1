"""The theory curves drawn by the report and the notebooks, from `gsparse.bounds`.

This is the one place where the exploration code calls `gsparse.bounds`
(the theorems of docs/theory.md). Every function takes and returns NumPy
arrays (one value per sweep-table row) and raises `BoundsUnavailable`, an
`ImportError` with a clear message, when `gsparse.bounds` is not installed;
callers then draw the empirical curves only and say so.
"""

from __future__ import annotations

import importlib

import numpy as np


class BoundsUnavailable(ImportError):
  """Raised when `gsparse.bounds` cannot be imported."""


def bounds_module():
  """`gsparse.bounds`, or raises `BoundsUnavailable` saying what is missing."""
  try:
    return importlib.import_module("gsparse.bounds")
  except ImportError as e:
    raise BoundsUnavailable(
      "gsparse.bounds is not available in this installation "
      f"({type(e).__name__}: {e}); the theory curves (Theorem 1 and 2 bounds, "
      "random-energy-model predictions) are left out and only Monte Carlo is shown"
    ) from e


def available() -> bool:
  """Whether `gsparse.bounds` can be imported."""
  try:
    bounds_module()
  except BoundsUnavailable:
    return False
  return True


def _norms(b, table_or_cols):
  t = table_or_cols
  return b.InteractionNorms(np.asarray(t["m_fro"]), np.asarray(t["m_op"]), np.asarray(t["mmt_fro"]))


def sparsity_k(table, *, delta: float) -> np.ndarray:
  """Theorem 1's k for each sweep row (its n, sigma, eps and the norms of its M)."""
  b = bounds_module()
  out = b.sparsity_bound(
    np.asarray(table["n"], np.float64),
    np.asarray(table["sigma"]),
    _norms(b, table),
    eps=np.asarray(table["eps"]),
    delta=delta,
  )
  return np.asarray(out.k, np.float64)


def topk_error(table, *, delta: float) -> tuple[np.ndarray, np.ndarray]:
  """Theorem 2's (error, tail mass) bounds for each sweep row.

  The value-norm bound is the row's observed `v_norm_max` (a deterministic
  bound on `max_j ||v_j||` for the draws measured).
  """
  b = bounds_module()
  out = b.topk_error_bound(
    np.asarray(table["n"], np.float64),
    np.asarray(table["sigma"]),
    _norms(b, table),
    k=np.asarray(table["k"], np.float64),
    value_norm=np.asarray(table["v_norm_max"]),
    delta=delta,
  )
  return np.asarray(out.error, np.float64), np.asarray(out.tail_mass, np.float64)


def predicted_support(n, tau) -> np.ndarray:
  """Random-energy-model effective support `1 / sum p^2` for i.i.d. N(0, tau^2) scores."""
  b = bounds_module()
  return np.asarray(b.predicted_effective_support(np.asarray(n, np.float64), np.asarray(tau)))


def predicted_tail(n, tau, k) -> np.ndarray:
  """Random-energy-model typical tail mass of top-k."""
  b = bounds_module()
  return np.asarray(
    b.predicted_tail_mass(np.asarray(n, np.float64), np.asarray(tau), k=np.asarray(k, np.float64))
  )


def boundaries(n) -> tuple[np.ndarray, np.ndarray]:
  """`(diffuse, collapse)` tau boundaries of the regimes at sequence length n."""
  b = bounds_module()
  r = b.rem_boundaries(np.asarray(n, np.float64))
  return np.asarray(r.diffuse), np.asarray(r.collapse)


def power_law_k(n, *, alpha: float, C: float) -> np.ndarray:
  """`k = clip(ceil(alpha n^C), 1, n)` (the revision's adaptive window).

  A definition rather than a bound, so it is computed here when
  `gsparse.bounds` is missing.
  """
  try:
    b = bounds_module()
  except BoundsUnavailable:
    n = np.asarray(n, np.float64)
    return np.clip(np.ceil(alpha * n**C - 1e-9), 1, n).astype(np.int64)
  return np.asarray(b.power_law_k(np.asarray(n, np.float64), alpha=alpha, C=C), np.int64)


def with_bound_columns(table, *, delta: float):
  """The sweep table plus `bound_k`, `bound_error`, `bound_tail` columns (one call each).

  Returns the table unchanged when `gsparse.bounds` is missing. One call per
  theorem over the whole table: the bounds are jitted per input length, so
  calling them on many small sub-tables would compile many times.
  """
  try:
    k = sparsity_k(table, delta=delta)
    err, tail = topk_error(table, delta=delta)
  except BoundsUnavailable:
    return table
  return type(table)({**table.columns, "bound_k": k, "bound_error": err, "bound_tail": tail})
