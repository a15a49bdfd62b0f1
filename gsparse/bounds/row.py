"""Per-row sparsity given the row's own scale tau_i (docs/theory.md, Theorem 1R and Lemma 6).

`tau_i = sigma ||M^T x_i||` is computable from the query row, so a bound
conditional on it avoids the worst case over the Laurent-Massart interval of
Theorem 1. The core (Lemma 6) replaces Lemma 5's relaxation of the scores above
the m-th largest by one Chernoff bound on `Z_top + Z_rest` given that order
statistic, divided by `e^{tau G}`, with the Laplace transforms of the truncated
lognormal summands bounded by rigorous upper Riemann sums on nodes scaled with
`1/tau` and computed as matrix products (`_laplace`). It holds uniformly over a
tau cell `[a, b]`, which is how Theorem 1 (`sparsity.py`) and Theorem 1C
(`causal.py`) use it; Theorem 1R is the cell `[tau, tau]`.
"""

from __future__ import annotations

import jax
from jax.typing import ArrayLike

from gsparse.bounds import _laplace, _xp
from gsparse.bounds._common import (
  PointFormula,
  _check,
  _check_delta,
  _check_eps,
  _check_n,
  _on_flat,
  _valid,
)
from gsparse.bounds._gcells import _first_admissible_m, _sum_over_g_cells

_NUM_G_CELLS = 256  # cells of the m-th order statistic G on [-3, sqrt(2 ln n) + 2]
_NUM_LAMBDA = 24  # Chernoff parameters tried (any one gives a valid bound)


def _g_grid(nm1, num, dtype):
  """`[num + 1]` equal cells of the order statistic G on `[-3, sqrt(2 ln(n - 1)) + 2]`."""
  xp = _xp.of(nm1)
  u = xp.linspace(0.0, 1.0, num + 1, dtype=dtype)
  return -3.0 + u * (xp.sqrt(2.0 * xp.log(nm1)) + 5.0)


def _chernoff_parts(eps, ta, tb, c, *, ladder=False, num_lambda=_NUM_LAMBDA):
  """`(lam A, top, rest)`, the m-free parts of `_chernoff_fail` for tau cells `[ta, tb]` (`[C]`).

  On `{K >= m}` with `G = c`: `sum_top e^{tau (g - c)} + sum_rest e^{tau (g - c)} <
  (1 - eps) / eps`, and for every `tau` in `[a, b]` each top summand is `>= e^{a (g - c)}`
  and each rest summand `>= e^{b (g - c)}`. For `c` in the G-cell `(c_l, c_{l+1}]` the
  residuals are stochastically bounded by those at `c_{l+1}` (log-concavity of `Phi`,
  `Phi_bar`), so `top` and `rest` (`[C, L, K]`) bound the log Laplace transforms of one
  summand there (clipped at 0: a transform is at most 1), for each Chernoff parameter
  `lam A = lam (1 - eps) / eps = e^theta` (`[K]`, `K = num_lambda` values of theta
  spread over `[-3, 9]`: Markov's inequality holds at each, so any set gives a valid
  bound), by upper Riemann sums (`_laplace`; `ladder`: band scales on `_laplace`'s
  ladder, any offsets being valid).
  """
  xp = _xp.of(eps, ta, tb, c)
  theta = xp.linspace(-3.0, 9.0, num_lambda, dtype=c.dtype)
  log_a = xp.log1p(-eps) - xp.log(eps)
  log_lam = _laplace._lam_down(theta - log_a, theta, log_a)  # float32: fl(lam) A <= fl(e^theta)
  top_w, rest_w = (
    _laplace._top_weights(ta, c[1:], ladder=ladder),
    _laplace._rest_weights(tb, c[1:], ladder=ladder),
  )
  top = _laplace._log_transform(top_w, log_lam, -1, tc=(ta, c[1:]))
  rest = _laplace._log_transform(rest_w, log_lam, -1, tc=(tb, c[1:]))
  return xp.exp(theta), xp.minimum(top, 0.0), xp.minimum(rest, 0.0)


def _chernoff_fail(nm1, m, eps, c, parts, cells=None, nm1_hi=None, k_axis=-1):
  """Lemma 6: bound on `P(at least m off-diagonal entries > eps | tau_i in [a, b])`, per tau cell.

  `parts = _chernoff_parts(eps, ta, tb, c)`; `m [...]`; `cells` an optional `[W]`
  index array of tau cells. With `nm1_hi`, the bound holds for every number of
  off-diagonal keys in `[nm1, nm1_hi]` (causal rows): `nm1 - m` summands below `G`
  (dropping summands only lowers `Z`) and the law of `G` at `nm1_hi` (stochastically
  the largest). Returns `[..., C]` (or `[..., W]`). `k_axis=-2`: `top` and `rest` are
  `[C, K, L]` (the NumPy search keeps them so: the minimum over the Chernoff parameters,
  on the middle axis, is a faster reduction; the same values).
  """
  lam_a, top, rest = parts
  if cells is not None:
    top, rest = top[cells], rest[cells]
  xp = _xp.of(nm1, m, lam_a)
  hi = nm1 if nm1_hi is None else nm1_hi
  mk = m[..., None, None, None]  # one m per [C, L, K] grid
  log_b = (mk - 1.0) * top
  into = {"out": log_b} if xp is _xp.NP else {}  # NumPy: no fresh [..., C, L, K] array per sum
  log_b = xp.add(log_b, lam_a if k_axis == -1 else lam_a[:, None], **into)
  log_b = xp.add(log_b, xp.maximum(nm1 - mk, 0.0) * rest, **into)
  b = xp.exp(xp.minimum(xp.min(log_b, axis=k_axis), 0.0))  # [..., C, L]
  mm = xp.clip(m, 1.0, hi)[..., None]
  out = _sum_over_g_cells(hi, mm, c, b, head_nm1=xp.maximum(nm1, mm))
  return xp.where(((eps * m >= 1.0) | (m > hi))[..., None], 0.0, out)


def _row_fail_fn(n, tau, eps, log_drow):
  """`fail(m)`: bound on `P(at least m off-diagonal entries > eps | tau_i = tau)`, per `m [...]`.

  `fail(m, cells)` is the same as `[..., 1]`, one "cell", for `_first_admissible_m`.
  """
  xp = _xp.of(n, tau, eps, log_drow)
  del log_drow  # the grid is fixed; only the comparison uses the level
  nm1 = xp.maximum(n - 1.0, 1.0)
  c = _g_grid(nm1, _NUM_G_CELLS, tau.dtype)
  parts = _chernoff_parts(eps, tau[None], tau[None], c)

  def fail(m, cells=None):
    out = _chernoff_fail(nm1, m, eps, c, parts)
    return out[..., 0] if cells is None else out

  return fail


def _row_scalar(n, tau, eps, delta):
  xp = _xp.of(n, tau, eps, delta)
  fail = _row_fail_fn(n, tau, eps, xp.log(delta))
  # The first m with fail(m) <= delta; as in Theorem 1, no monotonicity assumed.
  m = _first_admissible_m(n, fail, delta, 0)
  k = xp.where(n <= 1.0, n, m)
  ok = _valid(n >= 1, tau >= 0, eps > 0, eps < 1, delta > 0, delta < 1)
  return (xp.where(ok, k, xp.nan),)


_ROW = PointFormula(_row_scalar)


def row_sparsity_bound(
  n: ArrayLike, tau: ArrayLike, *, eps: ArrayLike, delta: ArrayLike
) -> jax.Array:
  """Theorem 1R: a k such that row i is (eps, k)-sparse with probability `>= 1 - delta` given tau_i.

  Conditional on the query row `x_i` (so on `tau_i = sigma ||M^T x_i||`), the
  `n - 1` off-diagonal scores are i.i.d. `N(0, tau_i^2)` (Lemma G); the
  returned k bounds the number of entries above `eps` (the diagonal counted as
  one possible entry, whatever its value) except with conditional probability
  `delta`. For every row of a matrix at once, pass `delta / n` and take a union
  bound.

  Args:
    n: sequence length (integer-valued, >= 1).
    tau: the row's score scale `sigma ||M^T x_i||` (>= 0).
    eps: threshold in (0, 1).
    delta: conditional failure probability in (0, 1).

  Returns:
    Integer-valued k (float), broadcast over the arguments.
  """
  _check_n(n)
  _check("tau", tau, lo=0)
  _check_eps(eps)
  _check_delta(delta)
  (k,) = _on_flat(_ROW, (n, tau, eps, delta))
  return k
