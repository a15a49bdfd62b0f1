"""Small numerical helpers with safe gradients."""

from __future__ import annotations

import jax
import jax.numpy as jnp

from gsparse import _native, _rowwise


def safe_norm(x: jax.Array, axis: int = -1) -> jax.Array:
  """Euclidean norm over `axis` whose gradient at 0 is 0 rather than NaN.

  A NaN in `x` gives a NaN norm (it is not mapped to 0).
  """
  s = jnp.sum(x * x, axis=axis)
  pos = s > 0
  # Where s is not positive it is 0 (norm 0, gradient 2x = 0) or NaN (propagated).
  return jnp.where(pos, jnp.sqrt(jnp.where(pos, s, 1.0)), s)


def sortable_int32(x: jax.Array) -> jax.Array:
  """Float -> int32 keys ordered as `jax.lax.top_k` orders the floats.

  The bit pattern of a float32 read as int32 is increasing for positive floats
  and decreasing for negative ones; flipping the non-sign bits of negatives
  makes it increasing everywhere (-inf < ... < -0.0 < 0.0 < ... < inf < NaN,
  the total order of XLA's TopK comparator). Narrower floats widen exactly;
  float64 rounds to float32, which keeps the order weakly (ties only). Every
  NaN gets the key of the positive NaN (`positive_nan`): it ranks first.
  """
  i = jax.lax.bitcast_convert_type(positive_nan(x.astype(jnp.float32)), jnp.int32)
  return jnp.where(i < 0, i ^ jnp.int32(0x7FFFFFFF), i)


def float_from_sortable(key: jax.Array) -> jax.Array:
  """The float32 whose `sortable_int32` key is `key` (the map is its own inverse on bits)."""
  i = jnp.where(key < 0, key ^ jnp.int32(0x7FFFFFFF), key)
  return jax.lax.bitcast_convert_type(i, jnp.float32)


def positive_nan(x: jax.Array) -> jax.Array:
  """`x` with every NaN replaced by the positive quiet NaN.

  Arithmetic NaNs (`inf - inf`, `0 * inf`) carry the sign bit on x86, and
  `jax.lax.top_k` ranks a negative NaN below `-inf`: a NaN logit would then be
  dropped as if it were masked. With the sign cleared every NaN ranks first,
  so a NaN logit is always selected and its row comes out NaN.
  """
  if not jnp.issubdtype(x.dtype, jnp.floating):
    return x
  return jnp.where(jnp.isnan(x), jnp.asarray(jnp.nan, x.dtype), x)


def _xla_top_k(x: jax.Array, k: int) -> tuple[jax.Array, jax.Array]:
  # The barrier keeps XLA's TopK op (see `top_k`). It holds the indices only:
  # a barrier on the (values, indices) pair aborts XLA inside a fully manual
  # `shard_map` (it folds the pair back into TopK's own tuple). The values are
  # gathered back from `x`, which also keeps the barrier out of
  # differentiation (older jax has no derivative rule for it).
  # The indices run behind `_rowwise` so that XLA partitions them by rows.
  idx = _rowwise.rowwise(_xla_top_k_indices, jax.lax.stop_gradient(x), k)
  return jnp.take_along_axis(x, idx, axis=-1), idx


def _xla_top_k_indices(x: jax.Array, k: int) -> jax.Array:
  return jax.lax.optimization_barrier(jax.lax.top_k(x, k)[1])


def _native_top_k(x: jax.Array, k: int) -> tuple[jax.Array, jax.Array]:
  x32 = jax.lax.stop_gradient(x).astype(jnp.float32)
  idx = _rowwise.rowwise(_native.topk_indices, x32, k)
  # Values gathered from `x`: same bits as `lax.top_k`'s, and their gradient.
  return jnp.take_along_axis(x, idx, axis=-1), idx


_NATIVE_DTYPES = (jnp.float32, jnp.bfloat16, jnp.float16)


def top_k(x: jax.Array, k: int) -> tuple[jax.Array, jax.Array]:
  """`jax.lax.top_k(x, k)`: same values, indices and tie order; native on CPU.

  Every NaN ranks first, whatever its sign bit (see `positive_nan`).

  On a CPU computation with the native kernel available (`gsparse._native`),
  the indices come from an exact multi-threaded top-k behind XLA's FFI
  (float32, bfloat16 and float16 inputs, which widen to float32 exactly),
  because XLA:CPU's TopK sorts each row on one thread (figures in
  docs/results). Other platforms, dtypes, or a missing kernel use
  `jax.lax.top_k`.

  `jax.lax.top_k` itself runs behind an optimization barrier: XLA lowers it
  as a sort followed by slices and turns it back into its TopK op only when
  the slices have the expected form; when the caller uses a column of the
  values (the (k+1)-th logit, say) it stays a full comparator sort of every
  row instead of a partial sort. The barrier holds the indices; the values are read
  back from `x` at them (the same bits), so they carry `x`'s gradient and
  the barrier is never differentiated.

  Both routes work inside `jax.shard_map` (the rows of each device's block
  are independent) and under `jax.jit` with sharded inputs, where the
  indices run behind `gsparse._rowwise` so that XLA splits the rows over the
  devices like `x`'s leading axes instead of gathering `x` (the last axis is
  never split).
  """
  return top_k_or(x, k, lambda x: _xla_top_k(x, k))


def top_k_or(x: jax.Array, k: int, default) -> tuple[jax.Array, jax.Array]:
  """`top_k(x, k)` where the native CPU kernel serves the call, else `default(x)`.

  For callers with an XLA-only route that avoids `jax.lax.top_k` on the whole
  row (the exact selection's block search): on CPU with the kernel a single
  native top-k of the row replaces it; elsewhere `default` runs. Both must return
  the same values and indices.
  """
  x = positive_nan(jnp.asarray(x))
  n = x.shape[-1] if x.ndim else 0
  if (
    x.dtype in _NATIVE_DTYPES
    and 1 <= k <= n < 2**31
    and jax.default_backend() == "cpu"
    and _native.available()
    and _native.usable_for(x)
  ):
    return jax.lax.platform_dependent(x, cpu=lambda x: _native_top_k(x, k), default=default)
  return default(x)


def finish_top_k(vals: jax.Array, idx: jax.Array, k: int) -> tuple[jax.Array, jax.Array]:
  """`top_k(x, kk)` output `[..., kk]` -> `(indices [..., k] with -1, next logit [...])`.

  Shared by every selection, so that all list the same keys: a slot is a key
  unless its logit is `-inf` (masked, or zero weight); NaN logits are kept
  (they rank first), so a NaN reaches the output. The next logit is the
  (k+1)-th value when `kk > k`, else `-inf`; indices are padded with -1 to k.
  """
  kk = vals.shape[-1]
  ok = vals != -jnp.inf
  idx = jnp.where(ok, idx, -1).astype(jnp.int32)
  if kk > k:
    nxt = jnp.where(ok[..., k], vals[..., k], -jnp.inf)
    return idx[..., :k], nxt
  nxt = jnp.full(vals.shape[:-1], -jnp.inf, vals.dtype)
  pad = [(0, 0)] * (idx.ndim - 1) + [(0, max(k - kk, 0))]
  return jnp.pad(idx, pad, constant_values=-1), nxt
