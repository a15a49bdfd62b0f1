"""The norms of the interaction and value matrices that the bounds use."""

from __future__ import annotations

from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
from jax.typing import ArrayLike

from gsparse import _checks
from gsparse.bounds import _xp
from gsparse.bounds._common import _check


class InteractionNorms(NamedTuple):
  """The norms of a matrix `M` that the bounds use (all `>= 0`).

  Attributes:
    frobenius: `||M||_F`; `sigma^4 ||M||_F^2 = E tau^2`.
    operator: `||M||_op`, the largest singular value.
    gram_frobenius: `||M M^T||_F = sqrt(sum of singular values^4)`.
  """

  frobenius: jax.Array
  operator: jax.Array
  gram_frobenius: jax.Array


def interaction_norms(m: ArrayLike) -> InteractionNorms:
  """Frobenius, operator and Gram-Frobenius norms of `m` over its last two axes.

  Use it on the interaction matrix `M = scale W_Q W_K^T` (`[..., d, d]`) for the
  sparsity bound, and on `W_V` (`[..., d, h_v]`, one head) for the value-norm
  bound: both need the same three norms.

  Args:
    m: `[..., a, b]` floating array.

  A concrete `m` is reduced in float64 NumPy (nothing compiles), a traced one
  through jax; the outputs have `m`'s floating dtype (at least float32).

  Returns:
    `InteractionNorms` with fields of shape `[...]`.
  """
  m = _checks.check_float_array("m", m, min_ndim=2)
  dtype = jnp.promote_types(m.dtype, jnp.float32)
  conc = _checks.concrete_or_none(m)
  if conc is not None:
    sv = np.linalg.svd(conc.astype(np.float64), compute_uv=False)
    out = [np.asarray(x, dtype) for x in _norms_from_singular_values(sv)]
    return InteractionNorms(*jax.device_put(out))  # cast on the host: nothing to compile
  sv = jnp.linalg.svd(m.astype(dtype), compute_uv=False)
  return InteractionNorms(*_norms_from_singular_values(sv))


def _norms_from_singular_values(sv):
  """`(||M||_F, ||M||_op, ||M M^T||_F)` from the `[..., r]` singular values of `M` (any `_xp`)."""
  xp = _xp.of(sv)
  op = xp.max(sv, axis=-1)
  # Powers of the singular values relative to the largest: sv^4 itself underflows in float32
  # for ||M|| < ~1e-10 (giving gram_frobenius = 0 and an invalid tau_range) and overflows for
  # ||M|| > ~1e9 (giving inf).
  rel = sv / xp.where(op > 0, op, 1.0)[..., None]
  rel2 = rel * rel
  frob = op * xp.sqrt(xp.sum(rel2, axis=-1))
  return frob, op, op * op * xp.sqrt(xp.sum(rel2 * rel2, axis=-1))


def interaction_singular_values(w_q, w_k, *, scale: float | None = None) -> np.ndarray:
  """Singular values of `M_n = scale W_Q[..., n, :] W_K[..., kv(n), :]^T` per query head (NumPy).

  Computed from the triangular factors of a QR of each kernel (`M_n` and
  `R_Q R_K^T` have the same singular values), so the cost per head is
  `O(d h^2)`, never `O(d^3)`, and nothing is compiled.

  Args:
    w_q: `[..., d, N, h]` query kernels (concrete arrays).
    w_k: `[..., d, K, h]` key kernels, `N % K == 0` (grouped-query heads share
      key head `n // (N // K)`).
    scale: logit scale; default `1 / sqrt(h)`.

  Returns:
    `[..., N, min(d, h)]` float64 singular values in decreasing order.
  """
  w_q, w_k = np.asarray(w_q, np.float64), np.asarray(w_k, np.float64)
  n, kh, h = w_q.shape[-2], w_k.shape[-2], w_q.shape[-1]
  if kh == 0 or n % kh:
    raise ValueError(f"query heads {n} must be a multiple of key heads {kh}")
  scale = 1.0 / np.sqrt(h) if scale is None else float(scale)
  w_k = np.repeat(w_k, n // kh, axis=-2)  # the key head of each query head
  r_q = np.linalg.qr(np.swapaxes(w_q, -3, -2), mode="r")  # [..., N, min(d, h), h]
  r_k = np.linalg.qr(np.swapaxes(w_k, -3, -2), mode="r")
  return np.linalg.svd(scale * r_q @ np.swapaxes(r_k, -1, -2), compute_uv=False)


def interaction_norms_from_weights(
  w_q: ArrayLike, w_k: ArrayLike, *, scale: float | None = None
) -> InteractionNorms:
  """`interaction_norms` of `M = scale W_Q W_K^T` per head.

  Args:
    w_q: `[d, heads, h]` (as in `gsparse.gaussian.Weights`) or `[d, h]`.
    w_k: same shape as `w_q`.
    scale: default `1/sqrt(h)`.

  Returns:
    `InteractionNorms` with fields `[heads]` (or scalars for 2-D inputs).
  """
  from gsparse.gaussian import interaction_matrix

  return interaction_norms(interaction_matrix(w_q, w_k, scale=scale))


def _norm_fields(norms) -> tuple[Any, Any, Any]:
  if not isinstance(norms, InteractionNorms):
    if isinstance(norms, (tuple, list)) and len(norms) == 3:
      norms = InteractionNorms(*norms)
    else:
      raise TypeError(f"norms must be an InteractionNorms (or 3-tuple), got {type(norms).__name__}")
  _check("norms.frobenius", norms.frobenius, lo=0)
  _check("norms.operator", norms.operator, lo=0)
  _check("norms.gram_frobenius", norms.gram_frobenius, lo=0)
  return norms.frobenius, norms.operator, norms.gram_frobenius
