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

Block granularity lives in `gsparse.block_gather`
(`block_sparse_gather_attention`), which resolves `implementation=` here too.

Implementations (`implementation=`): "xla" is the reference and the fallback
(gathers `[..., k, H]` copies, differentiated by autodiff); "pallas" runs the
kernels of `gsparse.kernels` (Triton on GPU, Mosaic on TPU, the
Pallas interpreter elsewhere) with a custom VJP; "masked" (token level only)
computes the dense `[T, S]` logits and masks them to the listed keys, which
costs O(T S) memory but replaces the gather, and the scatter-add of its
gradient, by matmuls, which suits XLA:CPU when the lists are a sizeable share
of the keys (docs/kernels.md). None picks "pallas" on GPU and TPU (unless
the inputs are float64, the scale is traced, or block sizes do not fit the
device tiles: then "xla"); on other backends "masked" when the lists are long
relative to the keys (`16 k >= S`) and the dense logits small (at most 2**24
entries), else "xla".
"""

from __future__ import annotations

import functools
from typing import Literal, NamedTuple, get_args

import jax
import jax.numpy as jnp
from jax.lax import PrecisionLike
from jax.typing import ArrayLike

from gsparse import _checks, kernels
from gsparse._layout import gather_kv
from gsparse.attention import compute_dtype, masked_softmax_lse
from gsparse.kernels import nonfinite

Implementation = Literal["xla", "masked", "pallas"]
# Every value `implementation=` takes, in gsparse.topk_attention, the gathers
# and gsparse.flax alike; `resolve_implementation` is the one check.
IMPLEMENTATIONS = (None, *get_args(Implementation))


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


def resolve_implementation(implementation: Implementation | None) -> Implementation:
  """The one check of `implementation=`: resolves None to "pallas" on GPU/TPU, else "xla".

  Raises:
    ValueError: a value outside `IMPLEMENTATIONS`; the message lists them all.
  """
  if implementation not in IMPLEMENTATIONS:
    raise ValueError(f"implementation={implementation!r} must be one of {IMPLEMENTATIONS}")
  if implementation is None:
    return "pallas" if jax.default_backend() in ("gpu", "tpu") else "xla"
  return implementation


def static_scale(scale) -> float:
  """The scale as a Python float (the Pallas kernels compile it in)."""
  concrete = _checks.concrete_or_none(scale)
  if concrete is None:
    raise TypeError(
      'implementation="pallas" needs scale known at trace time (a Python float), got a tracer'
    )
  return float(concrete)


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


def sparse_gather_attention_xla(
  query: jax.Array,
  key: jax.Array,
  value: jax.Array,
  indices: jax.Array,
  bias: jax.Array | None,
  scale: float,
  precision: PrecisionLike = None,
) -> GatherResult:
  """XLA reference implementation; `indices` already de-duplicated (-1 = masked)."""
  dtype = compute_dtype(query.dtype, key.dtype, value.dtype)
  valid = indices >= 0
  kg = gather_kv(key, indices)  # [..., T, N, k, H], zero rows at -1
  vg = gather_kv(value, indices)  # [..., T, N, k, Hv]
  logits = jnp.einsum(
    "...tnh,...tnkh->...tnk", query, kg, precision=precision, preferred_element_type=dtype
  ).astype(dtype)
  logits = logits * jnp.asarray(scale, dtype)
  if bias is not None:
    logits = logits + bias.astype(dtype)
  w, lse = masked_softmax_lse(logits, valid)
  out = jnp.einsum("...tnk,...tnkv->...tnv", w, vg.astype(dtype), precision=precision)
  return GatherResult(out.astype(query.dtype), lse, w)


def _scatter_rows(values: jax.Array, idx: jax.Array, s: int, fill) -> jax.Array:
  """`[..., k]` values at positions `idx` (-1 = none) of `[..., S]` rows filled with `fill`."""

  def row(v, i):  # vmapped: XLA partitions a batched scatter, not one into flattened rows
    pos = jnp.where(i >= 0, i, s)  # out of range: dropped (a negative index would wrap)
    return jnp.full((s,), fill, v.dtype).at[pos].set(v, mode="drop")

  for _ in idx.shape[:-1]:
    row = jax.vmap(row)
  return row(jnp.broadcast_to(values, idx.shape), idx)


# One program (not op by op) when called eagerly; inlined under an outer jit.
@functools.partial(jax.jit, static_argnames=("precision",))
def sparse_gather_attention_masked(
  query: jax.Array,
  key: jax.Array,
  value: jax.Array,
  indices: jax.Array,
  bias: jax.Array | None,
  scale: float,
  precision: PrecisionLike = None,
) -> GatherResult:
  """Dense logits masked to the listed keys; `indices` already de-duplicated.

  Unlisted keys must not leak into any result, not even through `0 * NaN`:
  keys and values enter the matmuls with non-finite entries zeroed; a listed
  non-finite key then gets its IEEE logit, and an output entry that reads
  non-finite value entries with positive weight is `+-inf` or NaN as in the
  gather (`gsparse.kernels.nonfinite.resolve_reads`).
  """
  dtype = compute_dtype(query.dtype, key.dtype, value.dtype)
  *batch, t, n, h = query.shape
  s, kh = key.shape[-3], key.shape[-2]
  g = n // kh
  m = g * t

  def rows(x):  # [..., T, N, d] -> [..., K, G*T, d]: matmuls batched over leading axes
    x = jnp.moveaxis(x.reshape(*batch, t, kh, g, x.shape[-1]), -4, -2)
    return x.reshape(*batch, kh, m, x.shape[-1])

  def unrows(x):  # the inverse
    x = jnp.moveaxis(x.reshape(*batch, kh, g, t, x.shape[-1]), -2, -4)
    return x.reshape(*batch, t, n, x.shape[-1])

  key_ok = jnp.all(jnp.isfinite(key), axis=-1)  # [..., S, K]
  value_ok = jnp.isfinite(value)  # [..., S, K, Hv]
  kt = jnp.swapaxes(key, -3, -2)  # [..., K, S, H]
  vt = jnp.swapaxes(jnp.where(value_ok, value, 0), -3, -2).astype(dtype)
  qk = lambda kmat: jnp.einsum(
    "...mh,...sh->...ms", rows(query), kmat, precision=precision, preferred_element_type=dtype
  ).astype(dtype)
  # A listed non-finite key gets the IEEE logit (no gradient), as the gather.
  key_bad = jnp.swapaxes(~key_ok, -1, -2)[..., None, :]  # [..., K, 1, S]
  logits = nonfinite.ieee_where_nonfinite(qk(nonfinite.finite_part(kt)), lambda: qk(kt), key_bad)
  logits = logits * jnp.asarray(scale, dtype)
  idx = rows(indices)  # [..., K, G*T, k]
  listed = _scatter_rows(jnp.asarray(True), idx, s, False)  # [..., K, G*T, S]
  if bias is not None:
    logits = logits + _scatter_rows(rows(bias).astype(dtype), idx, s, 0.0)
  logits = jnp.where(listed, logits, -jnp.inf)  # unlisted: masked
  w, lse = masked_softmax_lse(logits, None)
  out = jnp.einsum("...ms,...sv->...mv", w, vt, precision=precision)

  bad_values = jnp.swapaxes(~value_ok, -3, -2)  # [..., K, S, Hv]
  live = listed & (logits != -jnp.inf)  # positive weight
  vraw = jnp.swapaxes(value, -3, -2)
  out = jax.lax.cond(jnp.any(bad_values), _resolve_reads, _keep, out, live, vraw)
  valid = idx >= 0
  slot_w = jnp.where(valid, jnp.take_along_axis(w, jnp.where(valid, idx, 0), axis=-1), 0.0)
  return GatherResult(
    unrows(out).astype(query.dtype), unrows(lse[..., None])[..., 0], unrows(slot_w)
  )


def _resolve_reads(out, live, vraw):
  """`out` corrected for the non-finite value entries each row reads (+-inf or NaN)."""
  f32 = jnp.float32
  pv = lambda x: jnp.einsum("...ms,...sv->...mv", live.astype(f32), x)
  return nonfinite.resolve_reads(
    out, pv(nonfinite.nonfinite_indicator(vraw)), pv(nonfinite.inf_sign(vraw))
  )


def _keep(out, live, vraw):
  del live, vraw
  return out


def kernel_cannot_take(query, key, value, scale) -> str | None:
  """Why the Pallas kernels cannot take these inputs, or None if they can.

  The kernels compile the scale in and compute in float32: float64 inputs
  would silently lose precision there.
  """
  for name, x in (("query", query), ("key", key), ("value", value)):
    if x.dtype == jnp.float64:
      return f"{name} of dtype float64 (the kernels compute in float32)"
  if scale is not None and _checks.concrete_or_none(scale) is None:
    return "a traced scale (the kernels compile it in)"
  return None


def check_kernel_inputs(query, key, value) -> None:
  """Raises for `implementation="pallas"` with float64 inputs."""
  reason = kernel_cannot_take(query, key, value, None)
  if reason is not None:
    raise TypeError(
      f'implementation="pallas" cannot take {reason}; use implementation="xla" or None'
    )


def _auto_token_implementation(query, key, value, k: int, scale=None) -> str:
  """`resolve_implementation(None)`, with "masked" in place of "xla" where it pays.

  "pallas" only where the kernel can take the inputs (`kernel_cannot_take`):
  a traced scale or float64 inputs take the XLA path instead of raising.
  """
  if resolve_implementation(None) != "xla":
    return "pallas" if kernel_cannot_take(query, key, value, scale) is None else "xla"
  s = key.shape[-3]
  dense_entries = query.size // query.shape[-1] * s
  return "masked" if 16 * k >= s and dense_entries <= 2**24 else "xla"


# Over 60 lines through its docstring; the body is checks then one dispatch.
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
  implementation: Implementation | None = None,
  precision: PrecisionLike = None,
  block_sizes=None,
):
  """Attention of each query over its own list of key positions.

  Args:
    query: `[batch..., T, N, H]`.
    key: `[batch..., S, K, H]`, `N % K == 0`.
    value: `[batch..., S, K, Hv]`.
    indices: `[batch..., T, N, k]` integer key positions; outside `[0, S)` means
      masked; duplicates count once (see the module docstring).
    bias: optional `[batch..., T, N, k]` added to the selected logits.
    scale: logit scale; default `1 / sqrt(H)`. Must be a Python float (not a
      tracer) with `implementation="pallas"`.
    assume_unique: skip de-duplication (the caller guarantees unique indices).
    return_residuals: also return the log-sum-exp and the slot weights.
    implementation: None (pallas on GPU/TPU; elsewhere masked for long lists
      and small dense logits, else xla: see the module docstring), "xla"
      (reference, differentiated by autodiff), "pallas" (kernel with a custom
      VJP; the Pallas interpreter on CPU) or "masked" (dense logits masked to
      the listed keys, O(T S) memory).
    precision: einsum precision of the XLA path (the kernels accumulate in
      float32 and ignore it).
    block_sizes: optional `gsparse.kernels.BlockSizes` tiles for
      the Pallas path.

  Returns:
    `[batch..., T, N, Hv]` output in `query.dtype`, or a `GatherResult` when
    `return_residuals=True`.
  """
  query, key, value = _checks.check_attention_inputs(query, key, value)
  indices = check_indices(indices, query.shape)
  _checks.check_scale(scale)
  if bias is not None:
    bias = _checks.check_float_array("bias", bias)
    if bias.shape != indices.shape:
      raise ValueError(f"bias must have the shape of indices {indices.shape}, got {bias.shape}")
  s = key.shape[-3]
  if implementation is None:
    implementation = _auto_token_implementation(query, key, value, indices.shape[-1], scale)
  implementation = resolve_implementation(implementation)
  if implementation == "pallas":
    check_kernel_inputs(query, key, value)
    if query.size == 0:  # an empty grid: nothing to compute, the XLA path gives the shapes
      implementation = "xla"
  scale = 1.0 / float(query.shape[-1]) ** 0.5 if scale is None else scale
  idx = jnp.where((indices >= 0) & (indices < s), indices, -1).astype(jnp.int32)
  if not assume_unique:
    idx = dedup_indices(idx, s)
  if bias is not None:  # a -inf bias is exactly a masked slot (never NaN from inf - inf)
    idx = jnp.where(bias == -jnp.inf, -1, idx)
    bias = jnp.where(bias == -jnp.inf, jnp.zeros((), bias.dtype), bias)
  if implementation == "xla":
    res = sparse_gather_attention_xla(query, key, value, idx, bias, scale, precision)
  elif implementation == "masked":
    res = sparse_gather_attention_masked(query, key, value, idx, bias, scale, precision)
  else:
    res = _sparse_gather_pallas(query, key, value, idx, bias, static_scale(scale), block_sizes)
  return res if return_residuals else res.output


def flatten_batch(x: jax.Array, trailing: int) -> jax.Array:
  return x.reshape((-1,) + x.shape[x.ndim - trailing :])


def nonempty_value(value: jax.Array) -> jax.Array:
  """`value`, or one zero column when Hv = 0 (a kernel block cannot be empty)."""
  if value.shape[-1]:
    return value
  return jnp.zeros((*value.shape[:-1], 1), value.dtype)


def _sparse_gather_pallas(query, key, value, idx, bias, scale, block_sizes) -> GatherResult:
  hv = value.shape[-1]
  value = nonempty_value(value)
  if block_sizes is None:
    block_sizes = kernels.BlockSizes()
  variant, interpret = kernels.default_variant()
  batch = query.shape[:-3]
  out, lse, logits = kernels.token_gather_attention(
    flatten_batch(query, 3),
    flatten_batch(key, 3),
    flatten_batch(value, 3),
    flatten_batch(idx, 3),
    None if bias is None else flatten_batch(bias, 3),
    scale=scale,
    block_sizes=block_sizes,
    variant=variant,
    interpret=interpret,
  )
  # Weights: the softmax of the kernel's slot logits (as the XLA path), not
  # exp(logit - lse): a float32 lse near 1e4 is itself off by up to 1e-3, and
  # that error would reach every weight.
  w = masked_softmax_lse(logits, flatten_batch(idx, 3) >= 0)[0]
  return GatherResult(
    out.reshape(*batch, *out.shape[1:])[..., :hv],
    lse.reshape(*batch, *lse.shape[1:]),
    w.reshape(*batch, *w.shape[1:]),
  )
