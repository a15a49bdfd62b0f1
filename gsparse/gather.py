"""Attention over a given set of keys per query: the sparse gather.

`sparse_gather_attention` takes, for every query and head, a list of `k` key
positions and attends to those only. It is what top-k attention reduces to
once the keys are selected, whatever selected them.

Index semantics (shared by every implementation):
  * `indices` is `[batch..., T, N, k]` integer, N the number of query heads.
  * An index outside `[0, S)` (in particular any negative index) means "no key":
    that slot is masked.
  * Duplicate indices within one query's list are counted once: the first
    occurrence is kept and later ones are masked (set semantics), so a key that
    two LSH buckets both select is not given double weight. Pass
    `assume_unique=True` to skip the O(k log k) de-duplication when the caller
    guarantees uniqueness (as `jax.lax.top_k` does).
  * A query whose slots are all masked gets a zero output and zero gradient,
    and a log-sum-exp of `-inf`.
"""

from __future__ import annotations

from typing import NamedTuple

import jax
import jax.numpy as jnp
from jax.typing import ArrayLike

from gsparse import _checks
from gsparse.attention import compute_dtype


class GatherResult(NamedTuple):
  """Output of `sparse_gather_attention(..., return_residuals=True)`.

  Attributes:
    output: `[batch..., T, N, Hv]` attention output in `query.dtype`.
    logsumexp: `[batch..., T, N]` float32 log of the softmax normaliser over the
      kept slots (`-inf` for a query with none), so results over disjoint key
      sets can be merged as flash attention does.
    weights: `[batch..., T, N, k]` float32 softmax weights of the slots (zero for
      masked slots).
  """

  output: jax.Array
  logsumexp: jax.Array
  weights: jax.Array


def check_indices(indices: ArrayLike, query_shape: tuple[int, ...]) -> jax.Array:
  """Checks `[batch..., T, N, k]` integer indices against the query shape."""
  indices = jnp.asarray(indices)
  if not jnp.issubdtype(indices.dtype, jnp.integer):
    raise TypeError(f"indices must have an integer dtype, got {indices.dtype}")
  if indices.ndim != len(query_shape) or indices.shape[:-1] != tuple(query_shape[:-1]):
    raise ValueError(
      f"indices must have shape [batch..., T, N, k] matching query {tuple(query_shape)}, "
      f"got indices.shape={indices.shape}"
    )
  if indices.shape[-1] < 1:
    raise ValueError(f"indices must select at least one key per query, got {indices.shape}")
  return indices


def dedup_indices(indices: jax.Array, num_keys: int) -> jax.Array:
  """Replaces out-of-range and repeated indices (after the first) with -1.

  The relative order of the kept indices is preserved.
  """
  indices = indices.astype(jnp.int32)
  in_range = (indices >= 0) & (indices < num_keys)
  idx = jnp.where(in_range, indices, -1)
  order = jnp.argsort(idx, axis=-1, stable=True)
  sorted_idx = jnp.take_along_axis(idx, order, axis=-1)
  repeat_sorted = jnp.concatenate(
    [jnp.zeros_like(sorted_idx[..., :1], dtype=bool), sorted_idx[..., 1:] == sorted_idx[..., :-1]],
    axis=-1,
  )
  # Scatter the "is a repeat" flags back to the original slots.
  inverse = jnp.argsort(order, axis=-1)
  repeat = jnp.take_along_axis(repeat_sorted, inverse, axis=-1)
  return jnp.where(repeat, -1, idx)


def gather_kv(x: jax.Array, indices: jax.Array) -> jax.Array:
  """Gathers `x[..., indices, head(n), :]` for every query head.

  Args:
    x: `[batch..., S, K, D]` keys or values.
    indices: `[batch..., T, N, k]` in `[0, S)`; N a multiple of K.

  Returns:
    `[batch..., T, N, k, D]`.
  """
  *batch, s, kh, dd = x.shape
  t, n, k = indices.shape[-3:]
  g = n // kh
  xt = jnp.swapaxes(x, -3, -2)  # [..., K, S, D]
  idx = jnp.moveaxis(indices, -3, -2)  # [..., N, T, k]
  idx = idx.reshape(*batch, kh, g * t * k)
  out = jnp.take_along_axis(xt, idx[..., None], axis=-2, mode="clip")  # [..., K, G*T*k, D]
  out = out.reshape(*batch, kh, g, t, k, dd).reshape(*batch, n, t, k, dd)
  return jnp.moveaxis(out, -4, -3)  # [..., T, N, k, D]


def sparse_gather_attention_xla(
  query: jax.Array,
  key: jax.Array,
  value: jax.Array,
  indices: jax.Array,
  bias: jax.Array | None,
  scale: float,
  precision=None,
) -> GatherResult:
  """XLA reference implementation; `indices` already de-duplicated (-1 = masked)."""
  dtype = compute_dtype(query.dtype, key.dtype, value.dtype)
  valid = indices >= 0
  safe = jnp.where(valid, indices, 0)
  kg = gather_kv(key, safe)  # [..., T, N, k, H]
  vg = gather_kv(value, safe)  # [..., T, N, k, Hv]
  logits = jnp.einsum(
    "...tnh,...tnkh->...tnk", query, kg, precision=precision, preferred_element_type=dtype
  ).astype(dtype)
  logits = logits * jnp.asarray(scale, dtype)
  if bias is not None:
    logits = logits + bias.astype(dtype)
  neg = jnp.asarray(-jnp.inf, dtype)
  m = jnp.max(jnp.where(valid, logits, neg), axis=-1, keepdims=True)
  m = jax.lax.stop_gradient(jnp.where(jnp.isfinite(m), m, 0.0))
  e = jnp.where(valid, jnp.exp(jnp.where(valid, logits - m, 0.0)), 0.0)
  z = jnp.sum(e, axis=-1, keepdims=True)
  w = e / jnp.where(z > 0, z, 1.0)
  out = jnp.einsum("...tnk,...tnkv->...tnv", w, vg.astype(dtype), precision=precision)
  # z == 0: no kept slot has weight (-inf); z NaN (NaN data) stays NaN.
  z0 = z[..., 0]
  lse = jnp.where(z0 == 0, -jnp.inf, jnp.log(jnp.where(z0 == 0, 1.0, z0)) + m[..., 0])
  return GatherResult(out.astype(query.dtype), lse, w)


def sparse_gather_attention(
  query: ArrayLike,
  key: ArrayLike,
  value: ArrayLike,
  indices: ArrayLike,
  *,
  bias: ArrayLike | None = None,
  scale: float | None = None,
  assume_unique: bool = False,
  return_residuals: bool = False,
  implementation: str | None = None,
  precision=None,
):
  """Attention of each query over its own list of key positions.

  Args:
    query: `[batch..., T, N, H]`.
    key: `[batch..., S, K, H]`, `N % K == 0`.
    value: `[batch..., S, K, Hv]`.
    indices: `[batch..., T, N, k]` integer key positions; outside `[0, S)` means
      masked; duplicates count once (see the module docstring).
    bias: optional `[batch..., T, N, k]` added to the selected logits.
    scale: logit scale; default `1 / sqrt(H)`.
    assume_unique: skip de-duplication (the caller guarantees unique indices).
    return_residuals: also return the log-sum-exp and the slot weights.
    implementation: None or "xla" (reference, differentiable).
    precision: einsum precision.

  Returns:
    `[batch..., T, N, Hv]` output in `query.dtype`, or a `GatherResult` when
    `return_residuals=True`.
  """
  query, key, value = _checks.check_attention_inputs(query, key, value)
  indices = check_indices(indices, query.shape)
  if scale is not None:
    _checks.check_float_scalar("scale", scale)
  if bias is not None:
    bias = _checks.check_float_array("bias", bias)
    if bias.shape != indices.shape:
      raise ValueError(f"bias must have the shape of indices {indices.shape}, got {bias.shape}")
  if implementation not in (None, "xla"):
    raise ValueError(f"implementation={implementation!r} must be None or 'xla'")
  s = key.shape[-3]
  scale = 1.0 / float(query.shape[-1]) ** 0.5 if scale is None else scale
  idx = jnp.where((indices >= 0) & (indices < s), indices, -1).astype(jnp.int32)
  if not assume_unique:
    idx = dedup_indices(idx, s)
  res = sparse_gather_attention_xla(query, key, value, idx, bias, scale, precision)
  return res if return_residuals else res.output
