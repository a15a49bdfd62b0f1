"""Lemma V: a value factor from isotropy, given the row's scores (docs/theory.md, section 4.1).

Replaces the factor `2 max_j ||v_j||` of Theorems 2 and 2R for one row: given
`x_i` and the row's scores, the off-diagonal values split into a part along
`W_V^T u` (`u` parallel to `M^T x_i`), fixed by the scores, and a Gaussian
part independent of them, whose size is controlled by `sum_j w_j^2 =
1/ESS_head + 1/ESS_tail`.
"""

from __future__ import annotations

import functools
from typing import NamedTuple

import jax
import jax.numpy as jnp
from jax.typing import ArrayLike

from gsparse.bounds._common import _check, _check_delta, _float_dtype, _valid
from gsparse.bounds.norms import InteractionNorms, _norm_fields
from gsparse.bounds.tau import _quad_form_range


def value_factor_bound(
  sigma: ArrayLike,
  value_norms: InteractionNorms,
  *,
  inv_ess: ArrayLike,
  mean_gap: ArrayLike,
  diag_term: ArrayLike = 0.0,
  delta: ArrayLike,
) -> jax.Array:
  """Lemma V's `V_i(delta)`: `||mu_tail - mu_head|| <= V_i` w.p. `>= 1 - delta` given the scores.

  `V_i = diag_term + sigma * mean_gap * ||W_V||_op + sqrt(inv_ess) * U(delta)`,
  with `U(delta)^2 = sigma^2 h(log(1/delta))` the upper end of Lemma 2 for
  `A = W_V W_V^T`. The statistics come from the row's weights (see
  `row_value_error_bound`, which computes them).

  Args:
    sigma: input standard deviation (> 0).
    value_norms: `interaction_norms(W_V)` for one head's `W_V` `[d, h_v]`.
    inv_ess: `q = sum_{j != i} w_j^2` (>= 0), at most `1/ESS_head + 1/ESS_tail`.
    mean_gap: `|m| = |sum_{j != i} w_j s_ij| / tau_i` (>= 0).
    diag_term: `|w_i| ||v_i||` (>= 0), the diagonal's share.
    delta: failure probability in (0, 1), conditional on the row's scores.

  Returns:
    The bound, broadcast over the arguments.
  """
  _check("sigma", sigma, lo=0, lo_open=True)
  _check("inv_ess", inv_ess, lo=0)
  _check("mean_gap", mean_gap, lo=0)
  _check("diag_term", diag_term, lo=0)
  _check_delta(delta)
  frob, op, gram = _norm_fields(value_norms)
  dtype = _float_dtype()
  args = (
    jnp.asarray(v, dtype) for v in (sigma, frob, op, gram, inv_ess, mean_gap, diag_term, delta)
  )
  return _value_factor(*args)


@jax.jit
def _value_factor(sigma, frob, op, gram, inv_ess, mean_gap, diag_term, delta):
  _, hi2 = _quad_form_range(sigma * sigma, frob, op, gram, -jnp.log(delta))
  out = diag_term + sigma * mean_gap * op + jnp.sqrt(inv_ess * hi2)
  ok = _valid(sigma > 0, inv_ess >= 0, mean_gap >= 0, diag_term >= 0, delta > 0, delta < 1)
  ok = ok & (frob >= 0) & (op >= 0) & (gram >= 0)
  return jnp.where(ok, out, jnp.nan)


class RowValueBound(NamedTuple):
  """Result of `row_value_error_bound` (leading axes: those of `scores` but the last).

  Attributes:
    error: `t_i * value_factor`, the bound on `||o_i - o_i^{(k)}||_2`.
    tail_mass: the row's top-k tail mass `t_i` (computed, not bounded).
    value_factor: Lemma V's `V_i(delta)`.
    inv_ess: `q = sum_{j != i} w_j^2`.
    mean_gap: `|m|`.
  """

  error: jax.Array
  tail_mass: jax.Array
  value_factor: jax.Array
  inv_ess: jax.Array
  mean_gap: jax.Array


def row_value_error_bound(
  scores: ArrayLike,
  tau: ArrayLike,
  diag_value_norm: ArrayLike,
  sigma: ArrayLike,
  value_norms: InteractionNorms,
  *,
  k: int,
  diag_index: ArrayLike,
  delta: ArrayLike,
) -> RowValueBound:
  """Lemma V for one row: `||o_i - o_i^{(k)}|| <= t_i V_i(delta)` w.p. `>= 1 - delta`, given scores.

  The values are not read: the bound uses the row's scores `s_ij = x_i^T M x_j`
  (all `n`, the diagonal included), its scale `tau_i = sigma ||M^T x_i||`,
  `||v_i||` of the diagonal's own value, and the norms of `W_V`. The kept set is
  the top-k of `scores` (`lax.top_k`). For every row of a matrix at once, pass
  `delta / n` (union bound). Vmap over rows for a matrix.

  Args:
    scores: `[n]` the row's scores.
    tau: the row's scale `sigma ||M^T x_i||` (>= 0); the off-diagonal scores are
      `tau * g_j` with `g_j ~ N(0, 1)` given `x_i`.
    diag_value_norm: `||W_V^T x_i||` (>= 0).
    sigma: input standard deviation (> 0).
    value_norms: `interaction_norms(W_V)`.
    k: number of kept keys, a static integer in `[1, n]`.
    diag_index: position `i` of the diagonal in `scores`.
    delta: failure probability in (0, 1).

  Returns:
    `RowValueBound(error, tail_mass, value_factor, inv_ess, mean_gap)`.
  """
  scores = jnp.asarray(scores)
  if scores.ndim != 1:
    raise ValueError(f"scores must be one row of shape [n], got shape {scores.shape}")
  n = scores.shape[0]
  if isinstance(k, bool) or not isinstance(k, int) or not 1 <= k <= n:
    raise ValueError(f"k={k!r} must be a Python integer in [1, n={n}]")
  _check("tau", tau, lo=0)
  _check("diag_value_norm", diag_value_norm, lo=0)
  _check("diag_index", diag_index, lo=0, hi=n - 1, integer=True)
  _check("sigma", sigma, lo=0, lo_open=True)
  _check_delta(delta)
  frob, op, gram = _norm_fields(value_norms)
  dtype = _float_dtype()
  rest = (jnp.asarray(v, dtype) for v in (tau, diag_value_norm, sigma, frob, op, gram, delta))
  return RowValueBound(*_row_value(scores.astype(dtype), jnp.asarray(diag_index), *rest, k=k))


@functools.partial(jax.jit, static_argnames=("k",))
def _row_value(scores, diag_index, tau, vi, sigma, frob, op, gram, delta, *, k):
  n = scores.shape[0]
  idx = jnp.arange(n)
  _, top = jax.lax.top_k(scores, k)
  head = jnp.zeros((n,), bool).at[top].set(True)
  p = jax.nn.softmax(scores)
  t = jnp.sum(jnp.where(head, 0.0, p))
  h = jnp.sum(jnp.where(head, p, 0.0))  # 1 - t without cancellation
  safe_t = jnp.where(t > 0, t, 1.0)
  w = jnp.where(head, -p / h, jnp.where(t > 0, p / safe_t, 0.0))
  off = idx != diag_index
  q = jnp.sum(jnp.where(off, w * w, 0.0))
  safe_tau = jnp.where(tau > 0, tau, 1.0)
  gap = jnp.where(tau > 0, jnp.abs(jnp.sum(jnp.where(off, w * scores, 0.0))) / safe_tau, 0.0)
  diag = jnp.abs(jnp.sum(jnp.where(off, 0.0, w))) * vi
  vf = _value_factor(sigma, frob, op, gram, q, gap, diag, delta)
  return t * vf, t, vf, q, gap
