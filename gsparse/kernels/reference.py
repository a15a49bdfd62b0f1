"""Pure-jnp references of the sparse-gather kernels.

They share no code with the kernels: each builds the dense `[B, N, T, S]`
mask from the indices and runs dense softmax attention under it, in float32.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp


def _dense_reference(query, key, value, mask, bias, scale):
  """Softmax attention under a dense `[B, N, T, S]` mask and bias (float32)."""
  n, kh = query.shape[-2], key.shape[-2]
  g = n // kh
  kr = jnp.repeat(key, g, axis=-2).astype(jnp.float32)
  vr = jnp.repeat(value, g, axis=-2).astype(jnp.float32)
  s = jnp.einsum("btnh,bsnh->bnts", query.astype(jnp.float32), kr) * scale + bias
  s = jnp.where(mask, s, -jnp.inf)
  m = jnp.max(s, axis=-1, keepdims=True)
  m = jnp.where(jnp.isfinite(m), m, 0.0)
  e = jnp.where(mask, jnp.exp(s - m), 0.0)
  z = jnp.sum(e, axis=-1, keepdims=True)
  w = e / jnp.where(z > 0, z, 1.0)
  out = jnp.einsum("bnts,bsnv->btnv", w, vr)
  lse = jnp.where(
    z[..., 0] > 0, jnp.log(jnp.where(z[..., 0] > 0, z[..., 0], 1.0)) + m[..., 0], -jnp.inf
  )
  return out.astype(query.dtype), jnp.swapaxes(lse, 1, 2)


def sparse_gather_reference(
  query: jax.Array,
  key: jax.Array,
  value: jax.Array,
  indices: jax.Array,
  bias: jax.Array | None = None,
  *,
  scale: float,
) -> tuple[jax.Array, jax.Array]:
  """Dense-mask reference for token-level gather attention.

  Args:
    query: `[B, T, N, H]`.
    key: `[B, S, K, H]`.
    value: `[B, S, K, Hv]`.
    indices: `[B, T, N, k]` int, de-duplicated, `-1` (or out of range) = masked.
    bias: optional `[B, T, N, k]` per-slot bias.
    scale: logit scale.

  Returns:
    `(output [B, T, N, Hv] in query.dtype, logsumexp [B, T, N] float32)`.
  """
  s_len = key.shape[1]
  onehot = jax.nn.one_hot(indices, s_len, dtype=jnp.float32)  # [B, T, N, k, S], -1 -> 0
  mask = jnp.swapaxes(jnp.any(onehot > 0, axis=-2), 1, 2)  # [B, N, T, S]
  dense_bias = 0.0
  if bias is not None:
    dense_bias = jnp.swapaxes(
      jnp.einsum("btnks,btnk->btns", onehot, bias.astype(jnp.float32)), 1, 2
    )
  return _dense_reference(query, key, value, mask, dense_bias, scale)


def block_gather_reference(
  query: jax.Array,
  key: jax.Array,
  value: jax.Array,
  block_indices: jax.Array,
  *,
  block_q: int,
  block_k: int,
  scale: float,
  is_causal: bool = False,
) -> tuple[jax.Array, jax.Array]:
  """Dense-mask reference for block-level gather attention.

  Args:
    query: `[B, T, N, H]`.
    key: `[B, S, K, H]`.
    value: `[B, S, K, Hv]`.
    block_indices: `[B, ceil(T / block_q), N, nb]` int key-block ids,
      de-duplicated, `-1` (or out of range) = masked.
    block_q: queries per query block.
    block_k: keys per key block.
    scale: logit scale.
    is_causal: also mask key position > query position.

  Returns:
    `(output [B, T, N, Hv], logsumexp [B, T, N])`.
  """
  t, s_len = query.shape[1], key.shape[1]
  nkb = -(-s_len // block_k)
  blk_mask = jnp.any(jax.nn.one_hot(block_indices, nkb, dtype=jnp.float32) > 0, axis=-2)
  qb = jnp.arange(t) // block_q
  kb = jnp.arange(s_len) // block_k
  mask = blk_mask[:, qb][..., kb]  # [B, T, N, S]
  mask = jnp.swapaxes(mask, 1, 2)
  if is_causal:
    mask = mask & (jnp.arange(s_len)[None, :] <= jnp.arange(t)[:, None])
  return _dense_reference(query, key, value, mask, 0.0, scale)
