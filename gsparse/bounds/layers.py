"""Ranking layers by predicted attention sparsity from their weights (fact 8)."""

from __future__ import annotations

from collections.abc import Sequence
from typing import NamedTuple

import jax
import jax.numpy as jnp
from jax.typing import ArrayLike

from gsparse import _checks
from gsparse.bounds._common import DEFAULT_DELTA, _float_dtype
from gsparse.bounds.norms import interaction_norms_from_weights
from gsparse.bounds.rem import predicted_effective_support
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
  energy model); layers are ordered by the mean log effective support over
  their heads (ties: larger mean tau first, then lower index). Larger
  `||W_Q W_K^T||` means a smaller support, i.e. a layer to sparsify first.
  The certified Theorem-1 k at `eps` is returned alongside.

  Args:
    w_q: `[L, d, heads, h]` stacked query weights, or a sequence of L
      `[d, heads, h]` arrays (as in `gsparse.Weights.w_q`).
    w_k: same layout as `w_q`.
    n: sequence length at which sparsity is predicted.
    eps: threshold of (eps, k)-sparsity for the returned `k`.
    sigma: input standard deviation.
    scale: logit scale, default `1/sqrt(h)`.
    delta: failure probability of Theorem 1.

  Returns:
    `LayerRanking`.
  """
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
  norms = jax.vmap(lambda q, k: interaction_norms_from_weights(q, k, scale=scale))(w_q, w_k)
  sb = sparsity_bound(n, sigma, norms, eps=eps, delta=delta)
  dt = _float_dtype()
  tau = jnp.asarray(sigma, dt) ** 2 * norms.frobenius.astype(dt)
  ess = predicted_effective_support(n, tau)
  layer_log = jnp.mean(jnp.log(ess), axis=-1)
  layer_tau = jnp.mean(tau, axis=-1)
  order = jnp.lexsort((jnp.arange(layer_log.shape[0]), -layer_tau, layer_log)).astype(jnp.int32)
  return LayerRanking(order, tau, ess, layer_log, sb.k)
