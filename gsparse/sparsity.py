"""Sparsity measures of attention rows.

Every function takes probability rows `p` of shape `[..., n]` (the last axis
is the key axis, as in the `[batch..., N, T, S]` weights of
`gsparse.attention_weights`) and reduces over it.

Definitions (docs/theory.md, section 1):
  * A row is (eps, k)-sparse when at most k of its entries exceed eps.
  * Its smallest such k is `#{j : p_j > eps}`.
  * The top-k set is the k largest entries (ties broken towards the lower
    index, as `jax.lax.top_k`); the tail mass t is the mass outside it.
  * The effective support is `1 / sum_j p_j^2` (between 1 and n).
"""

from __future__ import annotations

from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
from jax.typing import ArrayLike

from gsparse import _checks
from gsparse._numerics import safe_norm
from gsparse._numerics import top_k as _top_k


def _rows(p: ArrayLike) -> jax.Array:
  p = _checks.check_float_array("p", p, min_ndim=1)
  return p


def _check_eps(eps) -> None:
  _checks.check_float_scalar("eps", eps, open_unit=True)


def min_sparse_k(p: ArrayLike, *, eps: float) -> jax.Array:
  """Smallest k for which each row of `p` is (eps, k)-sparse.

  Args:
    p: `[..., n]` probability rows.
    eps: threshold in (0, 1); may be traced (then unchecked).

  Returns:
    `[...]` int32 count of entries strictly greater than `eps`.

  Example:
    >>> import jax.numpy as jnp
    >>> from gsparse import sparsity
    >>> p = jnp.array([[0.5, 0.3, 0.15, 0.05], [0.25, 0.25, 0.25, 0.25]])
    >>> sparsity.min_sparse_k(p, eps=0.1).tolist()
    [3, 4]
  """
  p = _rows(p)
  _check_eps(eps)
  return jnp.sum(p > eps, axis=-1, dtype=jnp.int32)


def is_sparse(p: ArrayLike, *, eps: float, k: int | ArrayLike) -> jax.Array:
  """Whether each row of `p` is (eps, k)-sparse (at most k entries exceed eps).

  Args:
    p: `[..., n]` probability rows.
    eps: threshold in (0, 1).
    k: int or integer array broadcastable to `p.shape[:-1]`.

  Returns:
    `[...]` boolean.

  Example:
    >>> import jax.numpy as jnp
    >>> from gsparse import sparsity
    >>> sparsity.is_sparse(jnp.array([0.5, 0.3, 0.15, 0.05]), eps=0.1, k=2).item()
    False
  """
  if isinstance(k, (jax.Array, np.ndarray)):
    if not jnp.issubdtype(k.dtype, jnp.integer):
      raise TypeError(f"k must be an int or an integer array, got dtype {k.dtype}")
  else:
    _checks.check_int("k", k, minimum=0)
  return min_sparse_k(p, eps=eps) <= k


def topk_mask(p: ArrayLike, k: int) -> jax.Array:
  """`[..., n]` boolean mask of the top-k entries of each row.

  Example:
    >>> import jax.numpy as jnp
    >>> from gsparse import sparsity
    >>> sparsity.topk_mask(jnp.array([0.1, 0.6, 0.3]), 2).tolist()
    [False, True, True]
  """
  p = _rows(p)
  n = p.shape[-1]
  k = _checks.check_int("k", k, minimum=1)
  kk = min(k, n)
  _, idx = _top_k(p, kk)
  onehot = jax.nn.one_hot(idx, n, dtype=jnp.bool_)  # [..., kk, n]
  return jnp.any(onehot, axis=-2)


def tail_mass(p: ArrayLike, *, k: int) -> jax.Array:
  """Mass outside the top-k entries of each row, `t = sum_{j not in S_k} p_j`.

  Summed directly over the tail (not as `1 - head`), so a tail of 1e-30 is
  reported as such rather than lost to cancellation.

  Args:
    p: `[..., n]` probability rows.
    k: int >= 1; `k >= n` gives 0.

  Returns:
    `[...]` tail mass.

  Example:
    >>> import jax.numpy as jnp
    >>> from gsparse import sparsity
    >>> round(float(sparsity.tail_mass(jnp.array([0.5, 0.3, 0.15, 0.05]), k=2)), 6)
    0.2
  """
  p = _rows(p)
  head = topk_mask(p, k)
  return jnp.sum(jnp.where(head, 0.0, p), axis=-1)


def effective_support(p: ArrayLike) -> jax.Array:
  """Effective support `1 / sum_j p_j^2` of each row (inverse participation ratio).

  Rows that are all zero (fully masked) give 0.

  Example:
    >>> import jax.numpy as jnp
    >>> from gsparse import sparsity
    >>> sparsity.effective_support(jnp.array([[0.5, 0.5, 0.0], [0.0, 0.0, 0.0]])).tolist()
    [2.0, 0.0]
  """
  p = _rows(p)
  s2 = jnp.sum(p * p, axis=-1)
  return jnp.where(s2 > 0, 1.0 / jnp.where(s2 > 0, s2, 1.0), 0.0)


class ErrorDecomposition(NamedTuple):
  """Parts of the exact top-k error identity `o - o_k = t (mu_tail - mu_head)`.

  Attributes:
    tail_mass: `[...]` t, the mass outside the top-k set.
    head_mean: `[..., d]` mu_head, the renormalised head average = top-k output.
    tail_mean: `[..., d]` mu_tail, the renormalised tail average (0 when t = 0).
    output: `[..., d]` dense output `o = sum_j p_j v_j`.
    error: `[...]` `||o - o_k||_2` computed directly.
    identity_error: `[...]` `t * ||mu_tail - mu_head||_2`, equal to `error`.
  """

  tail_mass: jax.Array
  head_mean: jax.Array
  tail_mean: jax.Array
  output: jax.Array
  error: jax.Array
  identity_error: jax.Array


def topk_error_decomposition(p: ArrayLike, v: ArrayLike, *, k: int) -> ErrorDecomposition:
  """The exact error identity of top-k attention, returned part by part.

  Args:
    p: `[..., n]` probability rows (each sums to one).
    v: `[..., n, d]` value rows (broadcast against `p`'s leading dims).
    k: number of kept entries (int >= 1).

  Returns:
    An `ErrorDecomposition`. With `o = (1 - t) mu_head + t mu_tail`, the top-k
    output is `mu_head` and `||o - mu_head|| = t ||mu_tail - mu_head||`.

  Example:
    Two keys, values 0 and 1, top-1 keeps the first: `t = 0.25`, the dense
    output is 0.25 and the error `0.25 * |1 - 0|`.

    >>> import jax.numpy as jnp
    >>> from gsparse import sparsity
    >>> e = sparsity.topk_error_decomposition(
    ...   jnp.array([0.75, 0.25]), jnp.array([[0.0], [1.0]]), k=1
    ... )
    >>> float(e.tail_mass), e.output.tolist(), float(e.error), float(e.identity_error)
    (0.25, [0.25], 0.25, 0.25)
  """
  p = _rows(p)
  v = _checks.check_float_array("v", v, min_ndim=2)
  if v.shape[-2] != p.shape[-1]:
    raise ValueError(f"v must have shape [..., n, d] with n={p.shape[-1]}, got {v.shape}")
  dtype = jnp.promote_types(jnp.result_type(p, v), jnp.float32)
  p = p.astype(dtype)
  v = v.astype(dtype)
  head = topk_mask(p, k)
  ph = jnp.where(head, p, 0.0)
  pt = jnp.where(head, 0.0, p)
  mh, t = jnp.sum(ph, axis=-1), jnp.sum(pt, axis=-1)
  sh = jnp.einsum("...n,...nd->...d", ph, v)
  st = jnp.einsum("...n,...nd->...d", pt, v)
  mu_head = sh / jnp.where(mh > 0, mh, 1.0)[..., None]
  mu_tail = jnp.where((t > 0)[..., None], st / jnp.where(t > 0, t, 1.0)[..., None], 0.0)
  out = sh + st
  err = safe_norm(out - mu_head)
  ident = t * safe_norm(mu_tail - mu_head)
  return ErrorDecomposition(t, mu_head, mu_tail, out, err, ident)
