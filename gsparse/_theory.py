"""The theory curves drawn by the report and the notebooks, from `gsparse.bounds`.

This is the one place where the exploration code calls `gsparse.bounds`
(the theorems of docs/theory.md). Every function takes and returns NumPy
arrays (one value per sweep-table row).
"""

from __future__ import annotations

import numpy as np

from gsparse import bounds as b


def _norms(table_or_cols):
  t = table_or_cols
  return b.InteractionNorms(np.asarray(t["m_fro"]), np.asarray(t["m_op"]), np.asarray(t["mmt_fro"]))


def sparsity_k(table, *, delta: float) -> np.ndarray:
  """Theorem 1's k for each sweep row (its n, sigma, eps and the norms of its M)."""
  out = b.sparsity_bound(
    np.asarray(table["n"], np.float64),
    np.asarray(table["sigma"]),
    _norms(table),
    eps=np.asarray(table["eps"]),
    delta=delta,
  )
  return np.asarray(out.k, np.float64)


def topk_error(table, *, delta: float) -> tuple[np.ndarray, np.ndarray]:
  """Theorem 2's (error, tail mass) bounds for each sweep row.

  The value-norm bound is the row's observed `v_norm_max` (a deterministic
  bound on `max_j ||v_j||` for the draws measured).
  """
  out = b.topk_error_bound(
    np.asarray(table["n"], np.float64),
    np.asarray(table["sigma"]),
    _norms(table),
    k=np.asarray(table["k"], np.float64),
    value_norm=np.asarray(table["v_norm_max"]),
    delta=delta,
  )
  return np.asarray(out.error, np.float64), np.asarray(out.tail_mass, np.float64)


def predicted_support(n, tau) -> np.ndarray:
  """Random-energy-model effective support `1 / sum p^2` for i.i.d. N(0, tau^2) scores."""
  return np.asarray(b.predicted_effective_support(np.asarray(n, np.float64), np.asarray(tau)))


def predicted_tail(n, tau, k) -> np.ndarray:
  """Random-energy-model typical tail mass of top-k."""
  return np.asarray(
    b.predicted_tail_mass(np.asarray(n, np.float64), np.asarray(tau), k=np.asarray(k, np.float64))
  )


def boundaries(n) -> tuple[np.ndarray, np.ndarray]:
  """`(diffuse, collapse)` tau boundaries of the regimes at sequence length n."""
  r = b.rem_boundaries(np.asarray(n, np.float64))
  return np.asarray(r.diffuse), np.asarray(r.collapse)


def power_law_k(n, *, alpha: float, C: float) -> np.ndarray:
  """`k = clip(ceil(alpha n^C), 1, n)` (the revision's adaptive window)."""
  return np.asarray(b.power_law_k(np.asarray(n, np.float64), alpha=alpha, C=C), np.int64)


def trivial_k(eps: float) -> int:
  """Fact 1's trivial k at the report's eps: the largest K with `K eps < 1`, exactly."""
  return int(b.sparsity._trivial_k(np.inf, np.float64(eps)))
