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

Block granularity (`block_sparse_gather_attention`): queries are cut into
blocks of `block_q` consecutive positions and keys into blocks of `block_k`;
`block_indices` `[batch..., ceil(T / block_q), N, nb]` lists, for every query
block and head, the key blocks its queries attend to (block `j` covers key
positions `[j * block_k, (j + 1) * block_k)`, cut at `S`). Ids outside
`[0, ceil(S / block_k))` are masked, duplicates count once, and `is_causal`
additionally masks key position > query position (top-left aligned).

Implementations (`implementation=`): "xla" is the reference and the fallback
(gathers `[..., k, H]` copies, differentiated by autodiff); "pallas" runs the
kernels of `gsparse.kernels.sparse_gather` (Triton on GPU, Mosaic on TPU, the
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
from jax.typing import ArrayLike

from gsparse import _checks
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


class BlockGatherResult(NamedTuple):
  """Output of `block_sparse_gather_attention(..., return_residuals=True)`.

  Attributes:
    output: `[batch..., T, N, Hv]` attention output in `query.dtype`.
    logsumexp: `[batch..., T, N]` float32 log-sum-exp (`-inf` for a query with
      no admissible key).
  """

  output: jax.Array
  logsumexp: jax.Array


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


def _static_scale(scale) -> float:
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


def gather_kv(x: jax.Array, indices: jax.Array) -> jax.Array:
  """Gathers `x[..., indices, head(n), :]` for every query head.

  Args:
    x: `[batch..., S, K, D]` keys or values.
    indices: `[batch..., T, N, k]` in `[0, S)`, or negative for "no key": that
      slot gets a zero row, never another key's row (a NaN there would reach
      the output as `0 * NaN`, and every gradient through it); N a multiple of K.

  Returns:
    `[batch..., T, N, k, D]`.
  """
  *batch, s, kh, dd = x.shape
  t, n, k = indices.shape[-3:]
  g = n // kh
  listed = (indices >= 0)[..., None]
  xt = jnp.swapaxes(x, -3, -2)  # [..., K, S, D]
  idx = jnp.moveaxis(jnp.maximum(indices, 0), -3, -2)  # [..., N, T, k]
  idx = idx.reshape(*batch, kh, g * t * k)
  out = jnp.take_along_axis(xt, idx[..., None], axis=-2, mode="clip")  # [..., K, G*T*k, D]
  out = out.reshape(*batch, kh, g, t, k, dd).reshape(*batch, n, t, k, dd)
  return jnp.where(listed, jnp.moveaxis(out, -4, -3), jnp.zeros((), x.dtype))  # [..., T, N, k, D]


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
  lead = idx.shape[:-1]
  rows = idx.reshape(-1, idx.shape[-1])
  vals = jnp.broadcast_to(values, idx.shape).reshape(rows.shape)
  out = jnp.full((rows.shape[0], s), fill, vals.dtype)
  pos = jnp.where(rows >= 0, rows, s)  # out of range: dropped (a negative index would wrap)
  out = out.at[jnp.arange(rows.shape[0])[:, None], pos].set(vals, mode="drop")
  return out.reshape(*lead, s)


# One program (not op by op) when called eagerly; inlined under an outer jit.
@functools.partial(jax.jit, static_argnames=("precision",))
def sparse_gather_attention_masked(
  query: jax.Array,
  key: jax.Array,
  value: jax.Array,
  indices: jax.Array,
  bias: jax.Array | None,
  scale: float,
  precision=None,
) -> GatherResult:
  """Dense logits masked to the listed keys; `indices` already de-duplicated.

  Unlisted keys must not leak into any result, not even through `0 * NaN`:
  keys and values enter the matmuls with non-finite rows/entries zeroed, and
  a listed non-finite key (value entry) then makes that row's logits (that
  output entry) NaN, as in the gather, where the gather may give +-inf.
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
  kt = jnp.swapaxes(jnp.where(key_ok[..., None], key, 0), -3, -2)  # [..., K, S, H]
  vt = jnp.swapaxes(jnp.where(value_ok, value, 0), -3, -2).astype(dtype)
  logits = jnp.einsum(
    "...mh,...sh->...ms", rows(query), kt, precision=precision, preferred_element_type=dtype
  ).astype(dtype) * jnp.asarray(scale, dtype)
  idx = rows(indices)  # [..., K, G*T, k]
  listed = _scatter_rows(jnp.asarray(True), idx, s, False)  # [..., K, G*T, S]
  if bias is not None:
    logits = logits + _scatter_rows(rows(bias).astype(dtype), idx, s, 0.0)
  # Unlisted logits are -inf (masked); a listed non-finite key gives NaN.
  key_bad = jnp.swapaxes(~key_ok, -1, -2)[..., None, :]  # [..., K, 1, S]
  logits = jnp.where(listed, jnp.where(key_bad, jnp.nan, logits), -jnp.inf)
  w, lse = masked_softmax_lse(logits, None)
  out = jnp.einsum("...ms,...sv->...mv", w, vt, precision=precision)

  bad_values = jnp.swapaxes(~value_ok, -3, -2)  # [..., K, S, Hv]
  out = jax.lax.cond(jnp.any(bad_values), _nan_where_read, _keep, out, listed, bad_values)
  valid = idx >= 0
  slot_w = jnp.where(valid, jnp.take_along_axis(w, jnp.where(valid, idx, 0), axis=-1), 0.0)
  return GatherResult(
    unrows(out).astype(query.dtype), unrows(lse[..., None])[..., 0], unrows(slot_w)
  )


def _nan_where_read(out, listed, bad_values):
  """NaN in the outputs whose weighted sum reads a non-finite value entry."""
  f32 = jnp.float32
  reads = jnp.einsum("...ms,...sv->...mv", listed.astype(f32), bad_values.astype(f32))
  return jnp.where(reads > 0, jnp.nan, out)


def _keep(out, listed, bad_values):
  del listed, bad_values
  return out


def _kernel_cannot_take(query, key, value, scale) -> str | None:
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


def _check_kernel_inputs(query, key, value) -> None:
  """Raises for `implementation="pallas"` with float64 inputs."""
  reason = _kernel_cannot_take(query, key, value, None)
  if reason is not None:
    raise TypeError(
      f'implementation="pallas" cannot take {reason}; use implementation="xla" or None'
    )


def _auto_token_implementation(query, key, value, k: int, scale=None) -> str:
  """`resolve_implementation(None)`, with "masked" in place of "xla" where it pays.

  "pallas" only where the kernel can take the inputs (`_kernel_cannot_take`):
  a traced scale or float64 inputs take the XLA path instead of raising.
  """
  if resolve_implementation(None) != "xla":
    return "pallas" if _kernel_cannot_take(query, key, value, scale) is None else "xla"
  s = key.shape[-3]
  dense_entries = query.size // query.shape[-1] * s
  return "masked" if 16 * k >= s and dense_entries <= 2**24 else "xla"


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
  precision=None,
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
    block_sizes: optional `gsparse.kernels.sparse_gather.BlockSizes` tiles for
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
    _check_kernel_inputs(query, key, value)
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
    res = _sparse_gather_pallas(query, key, value, idx, bias, _static_scale(scale), block_sizes)
  return res if return_residuals else res.output


def _flatten_batch(x: jax.Array, trailing: int) -> jax.Array:
  return x.reshape((-1,) + x.shape[x.ndim - trailing :])


def _nonempty_value(value: jax.Array) -> jax.Array:
  """`value`, or one zero column when Hv = 0 (a kernel block cannot be empty)."""
  if value.shape[-1]:
    return value
  return jnp.zeros((*value.shape[:-1], 1), value.dtype)


def _sparse_gather_pallas(query, key, value, idx, bias, scale, block_sizes) -> GatherResult:
  from gsparse.kernels import sparse_gather as kernels

  hv = value.shape[-1]
  value = _nonempty_value(value)
  if block_sizes is None:
    block_sizes = kernels.BlockSizes()
  variant, interpret = kernels.default_variant()
  batch = query.shape[:-3]
  out, lse, logits = kernels.token_gather_attention(
    _flatten_batch(query, 3),
    _flatten_batch(key, 3),
    _flatten_batch(value, 3),
    _flatten_batch(idx, 3),
    None if bias is None else _flatten_batch(bias, 3),
    scale=scale,
    block_sizes=block_sizes,
    variant=variant,
    interpret=interpret,
  )
  # Weights: the softmax of the kernel's slot logits (as the XLA path), not
  # exp(logit - lse): a float32 lse near 1e4 is itself off by up to 1e-3, and
  # that error would reach every weight.
  w = masked_softmax_lse(logits, _flatten_batch(idx, 3) >= 0)[0]
  return GatherResult(
    out.reshape(*batch, *out.shape[1:])[..., :hv],
    lse.reshape(*batch, *lse.shape[1:]),
    w.reshape(*batch, *w.shape[1:]),
  )


def check_block_indices(
  block_indices: ArrayLike, query_shape: tuple[int, ...], block_q: int
) -> jax.Array:
  """Checks `[batch..., ceil(T / block_q), N, nb]` integer block ids."""
  block_indices = jnp.asarray(block_indices)
  if not jnp.issubdtype(block_indices.dtype, jnp.integer):
    raise TypeError(f"block_indices must have an integer dtype, got {block_indices.dtype}")
  *batch, t, n, _ = query_shape
  want = (*batch, -(-t // block_q), n)
  if block_indices.ndim != len(query_shape) or block_indices.shape[:-1] != want:
    raise ValueError(
      f"block_indices must have shape [batch..., ceil(T / block_q), N, nb] = {want + ('nb',)} "
      f"for query {tuple(query_shape)} and block_q={block_q}, got {block_indices.shape}"
    )
  if block_indices.shape[-1] < 1:
    raise ValueError(f"block_indices must select at least one key block, got {block_indices.shape}")
  return block_indices


def block_sparse_gather_attention_xla(
  query: jax.Array,
  key: jax.Array,
  value: jax.Array,
  block_indices: jax.Array,
  *,
  block_q: int,
  block_k: int,
  scale: float,
  is_causal: bool = False,
  precision=None,
) -> BlockGatherResult:
  """XLA block-level implementation; `block_indices` de-duplicated (-1 = masked).

  Gathers one `[nb * block_k, H]` slab of keys per query block and head (a
  factor `block_q` less than token-level gathering) and differentiates by
  autodiff.
  """
  *batch, t, n, h = query.shape
  s = key.shape[-3]
  dtype = compute_dtype(query.dtype, key.dtype, value.dtype)
  tb, nb = block_indices.shape[-3], block_indices.shape[-1]
  tp = tb * block_q
  q = query
  if tp != t:
    q = jnp.pad(q, [(0, 0)] * len(batch) + [(0, tp - t), (0, 0), (0, 0)])
  pos = block_indices[..., None] * block_k + jnp.arange(block_k, dtype=jnp.int32)
  slot_valid = (block_indices >= 0)[..., None] & (pos < s)
  pos = pos.reshape(*pos.shape[:-2], nb * block_k)  # [..., Tb, N, m]
  slot_valid = slot_valid.reshape(pos.shape)
  safe = jnp.where(slot_valid, pos, -1)  # -1: a zero row
  kg = gather_kv(key, safe)  # [..., Tb, N, m, H]
  vg = gather_kv(value, safe)
  qb = q.reshape(*batch, tb, block_q, n, h)
  # Causal masking differs between the queries of a block, so a masked
  # non-finite entry cannot be zeroed per row: the products take the finite
  # parts (gradients included) and mark the non-finite reads (gsparse.kernels.nonfinite).
  logits = jnp.einsum(
    "...tqnh,...tnmh->...tqnm",
    nonfinite.finite_part(qb),
    nonfinite.finite_part(kg),
    precision=precision,
    preferred_element_type=dtype,
  ).astype(dtype)
  logits = logits * jnp.asarray(scale, dtype)
  q_bad = jnp.any(~jnp.isfinite(qb), axis=-1)[..., None]  # [..., Tb, bq, N, 1]
  k_bad = jnp.any(~jnp.isfinite(kg), axis=-1)[..., None, :, :]  # [..., Tb, 1, N, m]
  logits = jnp.where(q_bad | k_bad, jnp.asarray(jnp.nan, dtype), logits)
  valid = jnp.broadcast_to(slot_valid[..., :, None, :, :], logits.shape)
  qpos = jnp.arange(tp).reshape(tb, block_q)[:, :, None, None]
  if is_causal:
    valid = valid & (pos[..., :, None, :, :] <= qpos)
  if tp != t:  # padded rows take no part (a NaN key they read would reach the gradients)
    valid = valid & (qpos < t)
  w, lse = masked_softmax_lse(logits, valid)
  pv = functools.partial(jnp.einsum, "...tqnm,...tnmv->...tqnv", precision=precision)
  out = pv(w, nonfinite.finite_part(vg).astype(dtype))
  out = jax.lax.cond(
    jnp.any(~jnp.isfinite(vg)),
    lambda o: nonfinite.poison(o, pv(valid.astype(dtype), nonfinite.nonfinite_indicator(vg))),
    lambda o: o,
    out,
  )
  out = out.reshape(*batch, tp, n, value.shape[-1])[..., :t, :, :]
  lse = lse.reshape(*batch, tp, n)[..., :t, :]
  return BlockGatherResult(out.astype(query.dtype), lse)


def _auto_block_implementation(query, key, value, block_q: int, block_k: int, scale) -> str:
  """`resolve_implementation(None)` for block lists, "xla" where the kernel cannot run.

  The device kernels tile whole blocks: Triton dots want powers of two >= 16,
  Mosaic wants multiples of 8; both compile the scale in and compute in float32.
  """
  choice = resolve_implementation(None)
  if choice == "xla" or _kernel_cannot_take(query, key, value, scale) is not None:
    return "xla"
  from gsparse.kernels import sparse_gather as kernels

  variant, interpret = kernels.default_variant()
  return "pallas" if kernels.block_sizes_supported(block_q, block_k, variant, interpret) else "xla"


def block_sparse_gather_attention(
  query: ArrayLike,
  key: ArrayLike,
  value: ArrayLike,
  block_indices: ArrayLike,
  *,
  block_q: int,
  block_k: int,
  scale: float | None = None,
  is_causal: bool = False,
  assume_unique: bool = False,
  return_residuals: bool = False,
  implementation: Implementation | None = None,
  precision=None,
):
  """Attention in which every query block attends to its own list of key blocks.

  Args:
    query: `[batch..., T, N, H]`.
    key: `[batch..., S, K, H]`, `N % K == 0`.
    value: `[batch..., S, K, Hv]`.
    block_indices: `[batch..., ceil(T / block_q), N, nb]` integer key-block ids
      (block `j` = key positions `[j * block_k, (j + 1) * block_k)`); ids
      outside `[0, ceil(S / block_k))` are masked, duplicates count once.
    block_q: queries per query block, a Python int >= 1. On GPU the Pallas
      kernel needs a power of two >= 16, on TPU a multiple of 8.
    block_k: keys per key block, a Python int >= 1 (same GPU constraint; on
      TPU a multiple of 8).
    scale: logit scale; default `1 / sqrt(H)` (a Python float for "pallas").
    is_causal: also mask key position > query position (top-left aligned).
    assume_unique: skip de-duplication of the block ids.
    return_residuals: also return the log-sum-exp.
    implementation: None, "xla" or "pallas", as in `sparse_gather_attention`;
      None takes "xla" where the device kernel cannot tile the block sizes,
      the inputs are float64 or the scale is traced.
    precision: einsum precision of the XLA path.

  Returns:
    `[batch..., T, N, Hv]` output in `query.dtype`, or a `BlockGatherResult`
    when `return_residuals=True`. A query with no admissible key gets zeros.
  """
  query, key, value = _checks.check_attention_inputs(query, key, value)
  block_q = _checks.check_int("block_q", block_q, minimum=1)
  block_k = _checks.check_int("block_k", block_k, minimum=1)
  block_indices = check_block_indices(block_indices, query.shape, block_q)
  if not isinstance(is_causal, bool):
    raise TypeError(f"is_causal must be a bool, got {is_causal!r}")
  _checks.check_scale(scale)
  if implementation is None:
    implementation = _auto_block_implementation(query, key, value, block_q, block_k, scale)
  implementation = resolve_implementation(implementation)
  if implementation == "masked":
    raise ValueError(
      'implementation="masked" is token level only; block_sparse_gather_attention takes '
      'None, "xla" or "pallas"'
    )
  if implementation == "pallas":
    _check_kernel_inputs(query, key, value)
    if query.size == 0:  # an empty grid: nothing to compute, the XLA path gives the shapes
      implementation = "xla"
  scale = 1.0 / float(query.shape[-1]) ** 0.5 if scale is None else scale
  nkb = -(-key.shape[-3] // block_k)
  bidx = block_indices.astype(jnp.int32)
  bidx = jnp.where((bidx >= 0) & (bidx < nkb), bidx, -1)
  if not assume_unique:
    bidx = dedup_indices(bidx, nkb)
  if implementation == "xla":
    res = block_sparse_gather_attention_xla(
      query,
      key,
      value,
      bidx,
      block_q=block_q,
      block_k=block_k,
      scale=scale,
      is_causal=is_causal,
      precision=precision,
    )
  else:
    from gsparse.kernels import sparse_gather as kernels

    variant, interpret = kernels.default_variant()
    batch = query.shape[:-3]
    out, lse = kernels.block_gather_attention(
      _flatten_batch(query, 3),
      _flatten_batch(key, 3),
      _flatten_batch(_nonempty_value(value), 3),
      _flatten_batch(bidx, 3),
      block_q=block_q,
      block_k=block_k,
      scale=_static_scale(scale),
      is_causal=is_causal,
      variant=variant,
      interpret=interpret,
    )
    res = BlockGatherResult(
      out.reshape(*batch, *out.shape[1:])[..., : value.shape[-1]],
      lse.reshape(*batch, *lse.shape[1:]),
    )
  return res if return_residuals else res.output
