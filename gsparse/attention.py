"""Exact (dense) attention in the layout of `jax.nn.dot_product_attention`.

Shapes follow `jax.nn.dot_product_attention`: query `[batch..., T, N, H]`,
key `[batch..., S, K, H]`, value `[batch..., S, K, Hv]` with `N % K == 0`
(grouped-query attention when `K < N`). Logits and attention weights are laid
out `[batch..., N, T, S]`; `mask` (boolean, True = attend) and `bias` broadcast
to that shape. All arithmetic on logits runs in at least float32.

Fully masked rows (no admissible key) are defined to have all-zero weights,
zero output and zero gradient. `jax.nn.dot_product_attention` instead returns
the mean of all values for such rows; gsparse never silently averages keys
the caller excluded.
"""

from __future__ import annotations

from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
from jax.typing import ArrayLike

from gsparse import _admissible, _checks


class Logits(NamedTuple):
  """Scaled (and biased) logits with the admissibility mask.

  Attributes:
    logits: `[batch..., N, T, S]` float32 (or wider) logits; entries where
      `valid` is False hold arbitrary finite values and must be ignored.
    valid: `[batch..., N, T, S]` boolean, True where the key may be attended,
      or None when every key is admissible.
  """

  logits: jax.Array
  valid: jax.Array | None


def compute_dtype(*dtypes) -> jnp.dtype:
  """The dtype in which gsparse does softmax arithmetic: at least float32."""
  return jnp.promote_types(jnp.result_type(*dtypes), jnp.float32)


def causal_mask(q_len: int, kv_len: int) -> jax.Array:
  """`[q_len, kv_len]` boolean mask, True where key index <= query index.

  Aligned at the top-left, as in `jax.nn.dot_product_attention`.
  """
  return jnp.arange(kv_len)[None, :] <= jnp.arange(q_len)[:, None]


def combine_masks(
  mask: jax.Array | None, is_causal: bool, q_len: int, kv_len: int
) -> jax.Array | None:
  """Combines a user mask with the causal mask (either may be absent)."""
  if is_causal:
    causal = causal_mask(q_len, kv_len)
    mask = causal if mask is None else jnp.logical_and(mask, causal)
  return mask


def fold_neg_inf_bias(
  mask: jax.Array | None, bias: jax.Array | None
) -> tuple[jax.Array | None, jax.Array | None]:
  """Moves `-inf` bias entries into the mask: a `-inf` bias is exactly `mask=False`.

  Whatever the logit `q.k` is there (NaN, `+inf`), a key with a `-inf` bias
  is not admissible: it is never listed, carries no weight and gets a zero
  gradient, as a masked key. The returned bias is 0 at those entries (so no
  `-inf` or `inf - inf` reaches any arithmetic); `mask` takes the broadcast
  shape of both. NaN and `+inf` bias entries are left as they are.
  """
  if bias is None:
    return mask, bias
  allowed = bias != -jnp.inf
  mask = allowed if mask is None else jnp.logical_and(mask, allowed)
  return mask, jnp.where(allowed, bias, jnp.zeros((), bias.dtype))


def _group_query(query: jax.Array, num_kv_heads: int) -> jax.Array:
  """`[..., T, N, H]` -> `[..., T, K, G, H]` with N = K * G."""
  *lead, t, n, h = query.shape
  return query.reshape(*lead, t, num_kv_heads, n // num_kv_heads, h)


def compute_logits(
  query: ArrayLike,
  key: ArrayLike,
  bias: ArrayLike | None = None,
  mask: ArrayLike | None = None,
  *,
  scale: float | None = None,
  is_causal: bool = False,
  precision=None,
) -> Logits:
  """Scaled logits `scale * q.k + bias` and the admissibility mask.

  Args:
    query: `[batch..., T, N, H]`.
    key: `[batch..., S, K, H]`, `N % K == 0`.
    bias: optional, broadcastable to `[batch..., N, T, S]`.
    mask: optional boolean, broadcastable to `[batch..., N, T, S]`; True keeps.
    scale: logit scale; default `1 / sqrt(H)`.
    is_causal: apply a top-left aligned causal mask.
    precision: passed to the einsum.

  Returns:
    A `Logits` tuple.
  """
  query, key, _ = _checks.check_attention_inputs(query, key, key)
  _checks.check_scale(scale)
  if not isinstance(is_causal, bool):
    raise TypeError(f"is_causal must be a bool, got {is_causal!r}")
  *batch, t, n, h = query.shape
  s, kh = key.shape[-3], key.shape[-2]
  logits_shape = (*batch, n, t, s)
  mask, bias = fold_neg_inf_bias(*_checks.check_mask_and_bias(mask, bias, logits_shape))
  dtype = compute_dtype(query.dtype, key.dtype)
  if scale is None:
    scale = 1.0 / float(h) ** 0.5
  qg = _group_query(query, kh)
  # [..., K, G, T, S]
  logits = jnp.einsum(
    "...tkgh,...skh->...kgts", qg, key, precision=precision, preferred_element_type=dtype
  )
  logits = logits.reshape(logits_shape).astype(dtype) * jnp.asarray(scale, dtype)
  if bias is not None:
    logits = logits + bias.astype(dtype)
  mask = combine_masks(mask, is_causal, t, s)
  valid = None if mask is None else jnp.broadcast_to(mask, logits_shape)
  if valid is not None:
    logits = jnp.where(valid, logits, 0.0)
  return Logits(logits, valid)


def masked_softmax_lse(
  logits: jax.Array, valid: jax.Array | None, axis: int = -1
) -> tuple[jax.Array, jax.Array]:
  """Softmax over `axis` ignoring entries where `valid` is False, and its log-normaliser.

  Rows with no valid entry get all-zero weights (and zero gradients) and a
  log-sum-exp of `-inf`. A logit of `-inf` (e.g. from a `-inf` bias) counts as
  masked, so a row whose logits are all `-inf` is fully masked too; NaN logits
  propagate to both outputs. The maximum is subtracted first, so logits up to
  the dtype's range are safe.

  Returns:
    `(weights, logsumexp)`, the latter with `axis` removed.
  """
  neg = jnp.asarray(-jnp.inf, logits.dtype)
  m = jnp.max(logits if valid is None else jnp.where(valid, logits, neg), axis=axis, keepdims=True)
  m = jax.lax.stop_gradient(jnp.where(jnp.isfinite(m), m, 0.0))
  if valid is None:
    e = jnp.exp(logits - m)
  else:
    e = jnp.where(valid, jnp.exp(jnp.where(valid, logits - m, 0.0)), 0.0)
  z = jnp.sum(e, axis=axis, keepdims=True)
  w = e / jnp.where(z > 0, z, 1.0)
  z0, m0 = jnp.squeeze(z, axis), jnp.squeeze(m, axis)
  # z == 0: nothing has weight (-inf); z NaN (NaN data) stays NaN.
  lse = jnp.where(z0 == 0, -jnp.inf, jnp.log(jnp.where(z0 == 0, 1.0, z0)) + m0)
  return w, lse


def masked_softmax(logits: jax.Array, valid: jax.Array | None, axis: int = -1) -> jax.Array:
  """The weights of `masked_softmax_lse`: rows of zeros where nothing is valid."""
  return masked_softmax_lse(logits, valid, axis)[0]


def attention_weights(
  query: ArrayLike,
  key: ArrayLike,
  bias: ArrayLike | None = None,
  mask: ArrayLike | None = None,
  *,
  scale: float | None = None,
  is_causal: bool = False,
  precision=None,
) -> jax.Array:
  """Row-stochastic attention matrix `softmax(scale * q k^T + bias)`.

  Args: as `compute_logits`.

  Returns:
    `[batch..., N, T, S]` weights in the compute dtype (>= float32); each row
    sums to one, or is all zero when the row is fully masked.

  Example:
    Equal keys give uniform rows; with `is_causal` query i sees keys 0..i.

    >>> import jax.numpy as jnp
    >>> import gsparse
    >>> q = k = jnp.ones((3, 1, 4))  # [T, N, H]
    >>> gsparse.attention_weights(q, k, is_causal=True)[0].tolist()  # doctest: +ELLIPSIS
    [[1.0, 0.0, 0.0], [0.5, 0.5, 0.0], [0.333..., 0.333..., 0.333...]]
  """
  lg = compute_logits(query, key, bias, mask, scale=scale, is_causal=is_causal, precision=precision)
  return masked_softmax(lg.logits, lg.valid)


def apply_weights(weights: jax.Array, value: jax.Array, *, precision=None) -> jax.Array:
  """`out[..., t, n, :] = sum_s weights[..., n, t, s] value[..., s, k(n), :]`.

  Args:
    weights: `[batch..., N, T, S]`.
    value: `[batch..., S, K, Hv]`.

  Returns:
    `[batch..., T, N, Hv]` in the weights' dtype.
  """
  *batch, n, t, s = weights.shape
  kh = value.shape[-2]
  wg = weights.reshape(*batch, kh, n // kh, t, s)
  out = jnp.einsum("...kgts,...skv->...tkgv", wg, value.astype(weights.dtype), precision=precision)
  return out.reshape(*batch, t, n, value.shape[-1])


def dot_product_attention(
  query: ArrayLike,
  key: ArrayLike,
  value: ArrayLike,
  bias: ArrayLike | None = None,
  mask: ArrayLike | None = None,
  *,
  scale: float | None = None,
  is_causal: bool = False,
  precision=None,
  query_seq_lengths: ArrayLike | None = None,
  key_value_seq_lengths: ArrayLike | None = None,
  local_window_size: int | tuple[int, int] | None = None,
  segment_ids: Any = None,
) -> jax.Array:
  """Exact attention `D^{-1} A V`, a drop-in for `jax.nn.dot_product_attention`.

  Args:
    query: `[batch..., T, N, H]` floating array.
    key: `[batch..., S, K, H]`, `N % K == 0`.
    value: `[batch..., S, K, Hv]`.
    bias: optional, broadcastable to `[batch..., N, T, S]`, added to the logits.
    mask: optional boolean, broadcastable to `[batch..., N, T, S]`; True keeps.
    scale: logit scale; default `1 / sqrt(H)`.
    is_causal: top-left aligned causal mask.
    precision: einsum precision.
    query_seq_lengths, key_value_seq_lengths, local_window_size, segment_ids:
      as in `gsparse.topk_attention` (docs/masks.md); this dense reference
      folds them into a `[batch..., 1, T, S]` mask.

  Returns:
    `[batch..., T, N, Hv]` in `query.dtype`. Fully masked rows give zeros
    (`jax.nn` averages the values there, except past `query_seq_lengths`).

  Example:
    >>> import jax, jax.numpy as jnp
    >>> import gsparse
    >>> q = k = v = jnp.ones((4, 2, 8))
    >>> gsparse.dot_product_attention(q, k, v).shape
    (4, 2, 8)
  """
  query, key, value = _checks.check_attention_inputs(query, key, value)
  *batch, t, n, _ = query.shape
  s = key.shape[-3]
  adm = _admissible.build(
    tuple(batch),
    t,
    s,
    query_seq_lengths=query_seq_lengths,
    key_value_seq_lengths=key_value_seq_lengths,
    local_window_size=local_window_size,
    segment_ids=segment_ids,
  )
  if adm is not None:
    mask, bias = _admissible.fold_into_mask(adm, mask, bias, tuple(batch), n, t, s)
  weights = attention_weights(
    query, key, bias, mask, scale=scale, is_causal=is_causal, precision=precision
  )
  return apply_weights(weights, value, precision=precision).astype(query.dtype)
