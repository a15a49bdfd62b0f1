"""Parameter points of a sweep: grids, random points and their checks."""

from __future__ import annotations

import itertools
import math
from collections.abc import Mapping, Sequence

import numpy as np

from gsparse import _checks
from gsparse.sweep.table import _INT_PARAMS, PARAMS

# ----------------------------------------------------------------------------
# Parameter points.


def _as_list(name, v):
  if isinstance(v, (str, bytes)):
    raise TypeError(f"{name} must be a number or a sequence of numbers, got {v!r}")
  if np.ndim(v) == 0:
    return [v]
  return list(np.asarray(v).tolist())


def grid(
  *,
  n: int | Sequence[int],
  d: int | Sequence[int],
  sigma: float | Sequence[float],
  k: int | Sequence[int],
  eps: float | Sequence[float],
  weight_scale: float | Sequence[float] | None = None,
) -> dict[str, np.ndarray]:
  """All combinations of the given values, as parameter columns.

  Args:
    n: sequence length(s), ints >= 1.
    d: input dimension(s) (also the head dimension), ints >= 1.
    sigma: input scale(s), > 0.
    k: number(s) of kept keys, ints in [1, n].
    eps: sparsity threshold(s) in (0, 1).
    weight_scale: weight entry scale(s), > 0; default `1/sqrt(d)` per point.

  Returns:
    Columns `n, d, sigma, weight_scale, k, eps` of equal length.
  """
  axes = {"n": n, "d": d, "sigma": sigma, "k": k, "eps": eps}
  axes = {name: _as_list(name, v) for name, v in axes.items()}
  axes["weight_scale"] = [None] if weight_scale is None else _as_list("weight_scale", weight_scale)
  rows = list(itertools.product(*axes.values()))
  cols = {name: [r[i] for r in rows] for i, name in enumerate(axes)}
  cols["weight_scale"] = [
    1.0 / math.sqrt(dd) if ws is None else ws
    for ws, dd in zip(cols["weight_scale"], cols["d"], strict=True)
  ]
  return check_points(cols)


def random_points(
  seed: int,
  num: int,
  *,
  n: Sequence[int],
  d: Sequence[int],
  sigma: tuple[float, float],
  k: Sequence[int],
  eps: tuple[float, float],
  weight_scale: tuple[float, float] | None = None,
) -> dict[str, np.ndarray]:
  """A random sample of parameter points.

  Integer parameters are drawn uniformly from the given choices; float
  parameters log-uniformly from the given `(low, high)` range.

  Args:
    seed: seed of the (NumPy) generator that draws the parameters.
    num: number of points.
    n, d, k: choices (sequences of ints); `k` values above `n` are clipped to `n`.
    sigma, eps: `(low, high)` ranges.
    weight_scale: `(low, high)` range; default `1/sqrt(d)` per point.

  Returns:
    Parameter columns as `grid`.
  """
  num = _checks.check_int("num", num, minimum=1)
  rng = np.random.default_rng(seed)

  def choice(name, v):
    v = _as_list(name, v)
    return rng.choice(np.asarray(v), size=num)

  def loguniform(name, r):
    if r is None or len(r) != 2 or not 0 < r[0] <= r[1]:
      raise ValueError(f"{name} must be a range (low, high) with 0 < low <= high, got {r!r}")
    return np.exp(rng.uniform(np.log(r[0]), np.log(r[1]), size=num))

  cols = {"n": choice("n", n), "d": choice("d", d)}
  cols["sigma"] = loguniform("sigma", sigma)
  cols["weight_scale"] = (
    1.0 / np.sqrt(cols["d"]) if weight_scale is None else loguniform("weight_scale", weight_scale)
  )
  cols["k"] = np.minimum(choice("k", k), cols["n"])
  cols["eps"] = loguniform("eps", eps)
  return check_points(cols)


def check_points(points: Mapping[str, Sequence]) -> dict[str, np.ndarray]:
  """Validates parameter columns and returns them as NumPy arrays.

  Raises:
    ValueError / TypeError naming the column and the first bad value.
  """
  missing = [p for p in PARAMS if p not in points]
  if missing:
    raise ValueError(f"points is missing the parameter columns {missing}; needs {PARAMS}")
  cols = {}
  for p in PARAMS:
    v = np.asarray(points[p])
    if v.ndim != 1:
      raise ValueError(f"points[{p!r}] must be 1-D, got shape {v.shape}")
    cols[p] = v
  lengths = {p: len(v) for p, v in cols.items()}
  if len(set(lengths.values())) != 1 or lengths["n"] == 0:
    raise ValueError(f"parameter columns must be non-empty and of equal length, got {lengths}")
  for p in _INT_PARAMS:
    if cols[p].dtype.kind not in "iu":
      if cols[p].dtype.kind == "f" and np.all(cols[p] == np.round(cols[p])):
        cols[p] = cols[p].astype(np.int64)
      else:
        raise TypeError(f"points[{p!r}] must be integers, got dtype {cols[p].dtype}")
    cols[p] = cols[p].astype(np.int64)
  for p in ("sigma", "weight_scale", "eps"):
    if cols[p].dtype.kind not in "iuf":
      raise TypeError(f"points[{p!r}] must be real numbers, got dtype {cols[p].dtype}")
    cols[p] = cols[p].astype(np.float64)
    if not np.all(np.isfinite(cols[p])):
      raise ValueError(f"points[{p!r}] must be finite, got {cols[p][~np.isfinite(cols[p])][0]}")

  def first_bad(p, bad):
    i = int(np.argmax(bad))
    return f"points[{p!r}][{i}]={cols[p][i]}"

  for p in ("n", "d"):
    if np.any(cols[p] < 1):
      raise ValueError(f"{first_bad(p, cols[p] < 1)} must be >= 1")
  bad = (cols["k"] < 1) | (cols["k"] > cols["n"])
  if np.any(bad):
    i = int(np.argmax(bad))
    raise ValueError(f"{first_bad('k', bad)} must be in [1, n={cols['n'][i]}]")
  for p in ("sigma", "weight_scale"):
    if np.any(cols[p] <= 0):
      raise ValueError(f"{first_bad(p, cols[p] <= 0)} must be > 0")
  bad = (cols["eps"] <= 0) | (cols["eps"] >= 1)
  if np.any(bad):
    raise ValueError(f"{first_bad('eps', bad)} must be in the open interval (0, 1)")
  return cols
