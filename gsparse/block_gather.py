"""Attention in which every query block attends to its own list of key blocks.

`block_sparse_gather_attention` is the block-granular sibling of
`gsparse.gather.sparse_gather_attention`: queries are cut into blocks of
`block_q` consecutive positions and keys into blocks of `block_k`;
`block_indices` `[batch..., ceil(T / block_q), N, nb]` lists, for every query
block and head, the key blocks its queries attend to (block `j` covers key
positions `[j * block_k, (j + 1) * block_k)`, cut at `S`). Ids outside
`[0, ceil(S / block_k))` are masked, duplicates count once, and `is_causal`
additionally masks key position > query position (top-left aligned).

`implementation=` is resolved by `gsparse.gather.resolve_implementation`:
"xla" gathers one `[nb * block_k, H]` slab of keys per query block and head;
"pallas" runs `gsparse.kernels.block_gather_attention`; "masked" is token
level only. Both take the `jax.nn` index ranges (sequence lengths, a local
window, segment ids) and evaluate them inside the listed blocks only.
"""

from __future__ import annotations

import functools
import math
from typing import NamedTuple

import jax
import jax.numpy as jnp
from jax.lax import PrecisionLike
from jax.typing import ArrayLike

from gsparse import _admissible, _checks, kernels
from gsparse._admissible import Admissible, SegmentIds, admits
from gsparse._layout import gather_kv, pad_axis
from gsparse.attention import compute_dtype, masked_softmax_lse
from gsparse.gather import (
  Implementation,
  check_kernel_inputs,
  dedup_indices,
  flatten_batch,
  kernel_cannot_take,
  nonempty_value,
  resolve_implementation,
  static_scale,
)
from gsparse.kernels import nonfinite
from gsparse.kernels.backward import slot_positions


class BlockGatherResult(NamedTuple):
  """Output of `block_sparse_gather_attention(..., return_residuals=True)`.

  Attributes:
    output: `[batch..., T, N, Hv]` attention output in `query.dtype`.
    logsumexp: `[batch..., T, N]` float32 log-sum-exp (`-inf` for a query with
      no admissible key).
  """

  output: jax.Array
  logsumexp: jax.Array


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


# Over 60 lines: one masked flash-style pass over the listed blocks whose
# masking (causal, padding, index ranges, non-finite reads) must share its locals.
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
  precision: PrecisionLike = None,
  adm: Admissible | None = None,
) -> BlockGatherResult:
  """XLA block-level implementation; `block_indices` de-duplicated (-1 = masked).

  Gathers one `[nb * block_k, H]` slab of keys per query block and head (a
  factor `block_q` less than token-level gathering) and differentiates by
  autodiff. `adm` (index-range masks, `gsparse._admissible`) is evaluated on
  the gathered slab only.
  """
  *batch, t, n, h = query.shape
  dtype = compute_dtype(query.dtype, key.dtype, value.dtype)
  tb = block_indices.shape[-3]
  tp = tb * block_q
  q = pad_axis(query, -3, tp)
  pos, slot_valid = slot_positions(block_indices, block_k, key.shape[-3])  # [..., Tb, N, m]
  safe = jnp.where(slot_valid, pos, -1)  # -1: a zero row
  kg = gather_kv(key, safe)  # [..., Tb, N, m, H]
  vg = gather_kv(value, safe)
  qb = q.reshape(*batch, tb, block_q, n, h)
  # Causal masking differs between the queries of a block, so a masked
  # non-finite entry cannot be zeroed per row: the products take the finite
  # parts (gradients included), a non-finite query or key gets the IEEE logit
  # (no gradient), and the non-finite value reads are counted
  # (gsparse.kernels.nonfinite).
  qk = functools.partial(
    jnp.einsum, "...tqnh,...tnmh->...tqnm", precision=precision, preferred_element_type=dtype
  )
  logits = qk(nonfinite.finite_part(qb), nonfinite.finite_part(kg)).astype(dtype)
  q_bad = jnp.any(~jnp.isfinite(qb), axis=-1)[..., None]  # [..., Tb, bq, N, 1]
  k_bad = jnp.any(~jnp.isfinite(kg), axis=-1)[..., None, :, :]  # [..., Tb, 1, N, m]
  logits = nonfinite.ieee_where_nonfinite(logits, lambda: qk(qb, kg).astype(dtype), q_bad | k_bad)
  logits = logits * jnp.asarray(scale, dtype)
  valid = jnp.broadcast_to(slot_valid[..., :, None, :, :], logits.shape)
  qpos = jnp.arange(tp).reshape(tb, block_q)[:, :, None, None]
  if is_causal:
    valid = valid & (pos[..., :, None, :, :] <= qpos)
  if adm is not None:  # per batch element, on the [Tb, bq, N, m] slab positions
    nb_ = math.prod(batch)
    ok = jax.vmap(lambda a, p: admits(a, qpos, p))(adm, pos.reshape(nb_, tb, 1, n, -1))
    valid = valid & ok.reshape(valid.shape)
  if tp != t:  # padded rows take no part (a NaN key they read would reach the gradients)
    valid = valid & (qpos < t)
  w, lse = masked_softmax_lse(logits, valid)
  pv = functools.partial(jnp.einsum, "...tqnm,...tnmv->...tqnv", precision=precision)
  out = pv(w, nonfinite.finite_part(vg).astype(dtype))
  live = (valid & (logits != -jnp.inf)).astype(jnp.float32)
  out = jax.lax.cond(
    jnp.any(~jnp.isfinite(vg)),
    lambda o: nonfinite.resolve_reads(
      o, pv(live, nonfinite.nonfinite_indicator(vg)), pv(live, nonfinite.inf_sign(vg))
    ),
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
  if choice == "xla" or kernel_cannot_take(query, key, value, scale) is not None:
    return "xla"
  variant, interpret = kernels.default_variant()
  fits = kernels.block_sizes_supported(block_q, block_k, variant=variant, interpret=interpret)
  return "pallas" if fits else "xla"


def _block_implementation(query, key, value, block_q, block_k, scale, implementation) -> str:
  """The resolved `implementation=` of the block route ("xla" or "pallas")."""
  if implementation is None:
    implementation = _auto_block_implementation(query, key, value, block_q, block_k, scale)
  implementation = resolve_implementation(implementation)
  if implementation == "masked":
    raise ValueError(
      'implementation="masked" is token level only; block_sparse_gather_attention takes '
      'None, "xla" or "pallas"'
    )
  if implementation == "pallas":
    check_kernel_inputs(query, key, value)
    if query.size == 0:  # an empty grid: nothing to compute, the XLA path gives the shapes
      implementation = "xla"
  return implementation


def _block_gather_pallas(
  query, key, value, bidx, *, block_q, block_k, scale, is_causal, adm: Admissible | None
) -> BlockGatherResult:
  """The block kernel on `[B, ...]`-flattened inputs, reshaped back to `batch...`.

  `adm` (already batch-flattened) goes in as the kernels' side inputs: `[B]`
  lengths, `[B, T]`/`[B, S]` segment ids and the static window.
  """
  variant, interpret = kernels.default_variant()
  batch = query.shape[:-3]
  if adm is None:
    adm = Admissible(None, None, None, None)
  segments = None if adm.q_seg is None else (adm.q_seg, adm.kv_seg)
  out, lse = kernels.block_gather_attention(
    flatten_batch(query, 3),
    flatten_batch(key, 3),
    flatten_batch(nonempty_value(value), 3),
    flatten_batch(bidx, 3),
    block_q=block_q,
    block_k=block_k,
    scale=static_scale(scale),
    is_causal=is_causal,
    variant=variant,
    interpret=interpret,
    query_seq_lengths=adm.q_len,
    key_value_seq_lengths=adm.kv_len,
    segment_ids=segments,
    local_window_size=adm.window,
  )
  return BlockGatherResult(
    out.reshape(*batch, *out.shape[1:])[..., : value.shape[-1]],
    lse.reshape(*batch, *lse.shape[1:]),
  )


# Over 60 lines through its docstring; the body is checks then one dispatch.
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
  precision: PrecisionLike = None,
  query_seq_lengths: ArrayLike | None = None,
  key_value_seq_lengths: ArrayLike | None = None,
  local_window_size: int | tuple[int, int] | None = None,
  segment_ids: ArrayLike | SegmentIds | None = None,
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
    query_seq_lengths, key_value_seq_lengths, local_window_size, segment_ids:
      index-range masks inside the listed blocks, as in
      `gsparse.topk_attention`. Both implementations evaluate them per tile
      from `[batch...]` lengths, `[batch..., T]`/`[batch..., S]` ids and the
      static window, never as a `[T, S]` array; the Pallas kernels take them as
      side inputs (scalar prefetch of the lengths on TPU).

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
  implementation = _block_implementation(query, key, value, block_q, block_k, scale, implementation)
  *batch, t, _, _ = query.shape
  adm = _admissible.build(
    tuple(batch),
    t,
    key.shape[-3],
    query_seq_lengths=query_seq_lengths,
    key_value_seq_lengths=key_value_seq_lengths,
    local_window_size=local_window_size,
    segment_ids=segment_ids,
  )
  scale = 1.0 / float(query.shape[-1]) ** 0.5 if scale is None else scale
  nkb = -(-key.shape[-3] // block_k)
  bidx = block_indices.astype(jnp.int32)
  bidx = jnp.where((bidx >= 0) & (bidx < nkb), bidx, -1)
  if not assume_unique:
    bidx = dedup_indices(bidx, nkb)
  common = dict(block_q=block_q, block_k=block_k, scale=scale, is_causal=is_causal, adm=adm)
  if implementation == "xla":
    res = block_sparse_gather_attention_xla(query, key, value, bidx, precision=precision, **common)
  else:
    res = _block_gather_pallas(query, key, value, bidx, **common)
  return res if return_residuals else res.output
