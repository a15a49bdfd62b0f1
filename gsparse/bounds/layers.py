"""Ranking layers by predicted attention sparsity from their weights (fact 8): the one ranking.

`gsparse.flax.rank_attention_layers` (a Flax params tree) and
`gsparse.train.rank.rank_layers` (the training experiment's norms) are thin
adapters over `rank_by_expected_tau`; `rank_layers_by_sparsity` adds the
certified Theorem-1 k.

The prediction is the random-energy-model effective support of docs/theory.md
section 6 (`predicted_effective_support`) at each head's typical row scale
`sqrt(E tau^2) = sigma^2 ||M||_F`, `M = scale W_Q W_K^T`: the formula the
theory states and `verify_bounds.py` checks by simulation, in all three
regimes (diffuse, n^C-like, collapsed). A layer's key is the mean over its
heads of the log support (the geometric mean of the heads' supports).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
from jax.typing import ArrayLike

from gsparse import _checks
from gsparse.bounds import _xp
from gsparse.bounds._common import DEFAULT_DELTA, _check, _check_n, _float_dtype
from gsparse.bounds.norms import (
  InteractionNorms,
  _norms_from_singular_values,
  interaction_norms_from_weights,
  interaction_singular_values,
)
from gsparse.bounds.rem import _log_effective_support
from gsparse.bounds.sparsity import sparsity_bound


class LayerRanking(NamedTuple):
  """Result of `rank_layers_by_sparsity` for L layers with H heads each.

  Attributes:
    order: `[L]` int32 layer indices, sparsest first.
    expected_tau: `[L, H]` `sqrt(E tau^2) = sigma^2 ||M||_F` per head.
    effective_support: `[L, H]` `predicted_effective_support(n, expected_tau)`.
    layer_log_support: `[L]` mean over heads of the log effective support (the
      ranking key, smaller = sparser).
    k: `[L, H]` Theorem-1 k per head at the given eps (certified; note that a
      diffuse row also has few entries above eps, so k alone does not rank).
  """

  order: jax.Array
  expected_tau: jax.Array
  effective_support: jax.Array
  layer_log_support: jax.Array
  k: jax.Array


def rank_by_expected_tau(expected_tau, *, n):
  """The one layer ranking: `(order, effective_support, layer_log_support)` from per-head taus.

  Each head's predicted effective support is `predicted_effective_support(n,
  tau)`; a layer's key is the mean of its heads' log supports; layers are
  ordered by the key (smallest, i.e. sparsest, first), ties by the larger
  mean tau, then by the lower index. Runs in the namespace of `expected_tau`
  (NumPy for concrete arrays, jax for traced ones).

  Args:
    expected_tau: `[L, H]` per-head `sigma^2 ||M||_F` (NumPy or jax), or a
      sequence of L NumPy `[H_l]` arrays when layers differ in head count.
    n: sequence length (>= 1).

  Returns:
    `order [L]` (int), the per-head supports (`[L, H]`, or a list of `[H_l]`)
    and `layer_log_support [L]`.
  """
  _check_n(n)
  if isinstance(expected_tau, (list, tuple)):
    taus = [np.asarray(t, np.float64) for t in expected_tau]
    logs = [_log_effective_support(np.float64(n), t) for t in taus]
    support = [np.exp(x) for x in logs]
    layer_log = np.asarray([np.mean(x) for x in logs])
    layer_tau = np.asarray([np.mean(t) for t in taus])
  else:
    xp = _xp.of(expected_tau)
    log_support = _log_effective_support(xp.asarray(n, expected_tau.dtype), expected_tau)
    support = xp.exp(log_support)
    layer_log = xp.mean(log_support, axis=-1)
    layer_tau = xp.mean(expected_tau, axis=-1)
  xp = _xp.of(layer_log)
  order = xp.lexsort((xp.arange(layer_log.shape[0]), -layer_tau, layer_log))
  return order, support, layer_log


def _stacked_weights(w_q, w_k) -> tuple[jax.Array, jax.Array]:
  """`[L, d, heads, h]` query and key weights from stacked arrays or sequences of layers."""
  if isinstance(w_q, (list, tuple)):
    w_q = jnp.stack([jnp.asarray(w) for w in w_q])
  if isinstance(w_k, (list, tuple)):
    w_k = jnp.stack([jnp.asarray(w) for w in w_k])
  w_q = _checks.check_float_array("w_q", w_q)
  w_k = _checks.check_float_array("w_k", w_k)
  if w_q.ndim != 4 or w_q.shape != w_k.shape:
    raise ValueError(
      f"w_q and w_k must both be [layers, d, heads, h], got {w_q.shape} and {w_k.shape}"
    )
  if w_q.shape[0] < 1:
    raise ValueError(f"need at least one layer, got w_q.shape={w_q.shape}")
  return w_q, w_k


def rank_layers_by_sparsity(
  w_q: ArrayLike | Sequence[ArrayLike],
  w_k: ArrayLike | Sequence[ArrayLike],
  *,
  n: int | ArrayLike,
  eps: float | ArrayLike = 0.01,
  sigma: float | ArrayLike = 1.0,
  scale: float | None = None,
  delta: float | ArrayLike = DEFAULT_DELTA,
) -> LayerRanking:
  """Ranks layers by predicted attention sparsity, sparsest first (fact 8).

  Sparsity here means concentration of the softmax mass: each head's typical
  row scale `sqrt(E tau^2) = sigma^2 ||M||_F` gives the predicted effective
  support `1 / sum_j p_j^2` at length n (`predicted_effective_support`, random
  energy model); layers are ordered by `rank_by_expected_tau` (mean log
  effective support over their heads; ties: larger mean tau first, then lower
  index). Larger `||W_Q W_K^T||` means a smaller support, i.e. a layer to
  sparsify first. The certified Theorem-1 k at `eps` is returned alongside.
  Concrete weights are reduced in NumPy (nothing compiles); traced ones
  through jax.

  Args:
    w_q: `[L, d, heads, h]` stacked query weights, or a sequence of L
      `[d, heads, h]` arrays (as in `gsparse.gaussian.Weights.w_q`).
    w_k: same layout as `w_q`.
    n: sequence length at which sparsity is predicted.
    eps: threshold of (eps, k)-sparsity for the returned `k`.
    sigma: input standard deviation.
    scale: logit scale, default `1/sqrt(h)`.
    delta: failure probability of Theorem 1.

  Returns:
    `LayerRanking`.
  """
  w_q, w_k = _stacked_weights(w_q, w_k)
  _check("sigma", sigma, lo=0, lo_open=True)
  dt = _float_dtype()
  concrete = [_checks.concrete_or_none(v) for v in (w_q, w_k, n, sigma)]
  if all(c is not None for c in concrete):
    # In float64 from the weights rounded to the default dtype (as a traced call sees them).
    q, k, n_, s = (c.astype(dt).astype(np.float64) for c in concrete)
    sv = interaction_singular_values(q, k, scale=scale)
    norms = InteractionNorms(*_norms_from_singular_values(sv))
    tau = s**2 * norms.frobenius
    order, ess, layer_log = rank_by_expected_tau(tau, n=n_)
  else:
    norms = jax.vmap(lambda q, k: interaction_norms_from_weights(q, k, scale=scale))(w_q, w_k)
    tau = jnp.asarray(sigma, dt) ** 2 * norms.frobenius.astype(dt)
    order, ess, layer_log = rank_by_expected_tau(tau, n=jnp.asarray(n, dt))
  sb = sparsity_bound(n, sigma, norms, eps=eps, delta=delta)
  if isinstance(order, np.ndarray):  # cast on the host: no conversion to compile
    out = [order.astype(np.int32)] + [np.asarray(x, dt) for x in (tau, ess, layer_log)]
    return LayerRanking(*jax.device_put(out), sb.k)
  out = (order.astype(jnp.int32),) + tuple(jnp.asarray(x, dt) for x in (tau, ess, layer_log))
  return LayerRanking(*out, sb.k)
