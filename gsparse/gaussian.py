"""The paper's setting: attention on Gaussian input.

Input rows are i.i.d. `x_i ~ N(0, sigma^2 I_d)`; per head, `W_Q, W_K` are
`d x h` and `W_V` is `d x h_v`. The scores are `s_ij = x_i^T M x_j` with the
interaction matrix `M = scale * W_Q W_K^T` (`scale` defaults to `1/sqrt(h)`).

Everything takes an explicit PRNG key and is a pure function, so a sweep is a
`jax.vmap` over keys and parameters. `sigma` and `weight_scale` may be traced
(vmapped); they are range-checked only when their value is known at trace time.
"""

from __future__ import annotations

from typing import NamedTuple

import jax
import jax.numpy as jnp
from jax.typing import ArrayLike

from gsparse import _checks
from gsparse.attention import attention_weights, dot_product_attention


class Weights(NamedTuple):
  """Projection weights of one attention layer.

  Attributes:
    w_q: `[d, heads, h]`.
    w_k: `[d, heads, h]`.
    w_v: `[d, heads, h_v]`.
  """

  w_q: jax.Array
  w_k: jax.Array
  w_v: jax.Array


def _check_shape_tuple(name: str, shape) -> tuple[int, ...]:
  if isinstance(shape, int):
    shape = (shape,)
  shape = tuple(shape)
  for s in shape:
    _checks.check_int(f"{name} entry", s, minimum=1)
  return shape


def sample_inputs(
  key: jax.Array,
  *,
  n: int,
  d: int,
  sigma: float | ArrayLike = 1.0,
  batch_shape: tuple[int, ...] = (),
  dtype=jnp.float32,
) -> jax.Array:
  """Draws `X` with i.i.d. rows `N(0, sigma^2 I_d)`.

  Args:
    key: PRNG key.
    n: number of rows (sequence length), int >= 1.
    d: input dimension, int >= 1.
    sigma: standard deviation, > 0 (may be traced, then unchecked).
    batch_shape: leading batch dimensions.
    dtype: floating dtype of the result.

  Returns:
    `[*batch_shape, n, d]`.
  """
  n = _checks.check_int("n", n, minimum=1)
  d = _checks.check_int("d", d, minimum=1)
  _checks.check_float_scalar("sigma", sigma, positive=True)
  batch_shape = _check_shape_tuple("batch_shape", batch_shape)
  if not jnp.issubdtype(dtype, jnp.floating):
    raise TypeError(f"dtype must be floating, got {dtype}")
  z = jax.random.normal(key, (*batch_shape, n, d), jnp.float32)
  return (jnp.asarray(sigma, jnp.float32) * z).astype(dtype)


def sample_weights(
  key: jax.Array,
  *,
  d: int,
  head_dim: int,
  heads: int = 1,
  value_dim: int | None = None,
  weight_scale: float | ArrayLike | None = None,
  dtype=jnp.float32,
) -> Weights:
  """Draws `W_Q, W_K, W_V` with i.i.d. `N(0, weight_scale^2)` entries.

  Args:
    key: PRNG key.
    d: input dimension.
    head_dim: `h`, the query/key dimension per head.
    heads: number of heads.
    value_dim: `h_v`; defaults to `head_dim`.
    weight_scale: entry standard deviation, > 0; default `1/sqrt(d)`, which
      makes each projected coordinate have variance `sigma^2`.
    dtype: floating dtype.

  Returns:
    `Weights` with `[d, heads, h]` (and `[d, heads, h_v]`) arrays.
  """
  d = _checks.check_int("d", d, minimum=1)
  head_dim = _checks.check_int("head_dim", head_dim, minimum=1)
  heads = _checks.check_int("heads", heads, minimum=1)
  value_dim = (
    head_dim if value_dim is None else _checks.check_int("value_dim", value_dim, minimum=1)
  )
  if weight_scale is None:
    weight_scale = 1.0 / float(d) ** 0.5
  _checks.check_float_scalar("weight_scale", weight_scale, positive=True)
  kq, kk, kv = jax.random.split(key, 3)
  ws = jnp.asarray(weight_scale, jnp.float32)
  draw = lambda k, h: (ws * jax.random.normal(k, (d, heads, h), jnp.float32)).astype(dtype)
  return Weights(draw(kq, head_dim), draw(kk, head_dim), draw(kv, value_dim))


def _check_weights(x: jax.Array, weights: Weights) -> None:
  w_q, w_k, w_v = (jnp.asarray(w) for w in weights)
  for name, w in (("w_q", w_q), ("w_k", w_k), ("w_v", w_v)):
    if w.ndim != 3:
      raise ValueError(f"weights.{name} must have shape [d, heads, h], got {w.shape}")
    if w.shape[0] != x.shape[-1]:
      raise ValueError(f"weights.{name}.shape[0]={w.shape[0]} must equal d={x.shape[-1]}")
  if w_q.shape != w_k.shape:
    raise ValueError(f"weights.w_q {w_q.shape} and weights.w_k {w_k.shape} must match")
  if w_v.shape[1] != w_q.shape[1]:
    raise ValueError(f"weights.w_v has {w_v.shape[1]} heads, w_q has {w_q.shape[1]}")


def project(x: ArrayLike, weights: Weights) -> tuple[jax.Array, jax.Array, jax.Array]:
  """Queries, keys and values `x W` in the `[batch..., n, heads, h]` layout."""
  x = _checks.check_float_array("x", x, min_ndim=2)
  _check_weights(x, weights)
  proj = lambda w: jnp.einsum("...nd,dhe->...nhe", x, jnp.asarray(w).astype(x.dtype))
  return proj(weights.w_q), proj(weights.w_k), proj(weights.w_v)


def interaction_matrix(w_q: ArrayLike, w_k: ArrayLike, *, scale: float | None = None) -> jax.Array:
  """`M = scale * W_Q W_K^T` per head.

  Args:
    w_q: `[d, heads, h]` (or `[d, h]` for one head).
    w_k: same shape as `w_q`.
    scale: default `1/sqrt(h)`.

  Returns:
    `[heads, d, d]` (or `[d, d]` for 2-D inputs).
  """
  w_q = _checks.check_float_array("w_q", w_q, min_ndim=2)
  w_k = _checks.check_float_array("w_k", w_k, min_ndim=2)
  if w_q.shape != w_k.shape or w_q.ndim > 3:
    raise ValueError(f"w_q {w_q.shape} and w_k {w_k.shape} must both be [d, heads, h] or [d, h]")
  if scale is None:
    scale = 1.0 / float(w_q.shape[-1]) ** 0.5
  _checks.check_float_scalar("scale", scale)
  if w_q.ndim == 2:
    return scale * w_q @ w_k.T
  return scale * jnp.einsum("dhe,fhe->hdf", w_q, w_k)


def gaussian_attention_weights(
  x: ArrayLike,
  weights: Weights,
  *,
  scale: float | None = None,
  mask: ArrayLike | None = None,
  is_causal: bool = False,
) -> jax.Array:
  """Row-stochastic attention matrix of `x` under `weights`: `[batch..., heads, n, n]`."""
  q, k, _ = project(x, weights)
  return attention_weights(q, k, mask=mask, scale=scale, is_causal=is_causal)


def gaussian_attention(
  x: ArrayLike,
  weights: Weights,
  *,
  scale: float | None = None,
  mask: ArrayLike | None = None,
  is_causal: bool = False,
) -> jax.Array:
  """Exact attention output `D^{-1} A V` of `x`: `[batch..., n, heads, h_v]`."""
  q, k, v = project(x, weights)
  return dot_product_attention(q, k, v, mask=mask, scale=scale, is_causal=is_causal)
