"""Block-level sparse-gather attention kernels: Triton (GPU) and Mosaic (TPU).

Queries are cut into blocks of `block_q` and keys into blocks of `block_k`;
every (query block, head) has a list of key-block ids, `block_indices`
`[B, ceil(T / block_q), N, nb]`, `-1` = masked. Key positions past `S` in the
last block are masked, and `is_causal` also masks key position > query
position (top-left aligned). The `jax.nn` index ranges (`[B]` sequence
lengths, `[B, T]`/`[B, S]` segment ids, a static local window) are optional
side inputs, evaluated per tile with `range_mask` (never a `[T, S]` array).
Each kernel runs a running (flash-style) softmax over the listed key blocks
with two small matmuls per step. This module holds the Triton kernel; the
Mosaic one (`block_tpu`) takes the block ids through scalar prefetch
(`pltpu.PrefetchScalarGridSpec`) and copies each key block from HBM into VMEM.
Both return the output and the log-sum-exp (float32, `-inf` for a query with
no admissible key). The backward is `gsparse.kernels.block_bwd` (Pallas) or
`gsparse.kernels.backward.gather_backward_xla`.
"""

from __future__ import annotations

import functools
from typing import NamedTuple

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl

from gsparse._layout import pad_axis, round_up
from gsparse.kernels._common import (
  DOT_PRECISION,
  Backward,
  Ranges,
  Variant,
  check_block_sizes,
  check_variant,
  interpret_arg,
  kernel_ranges,
  next_pow2,
  range_mask,
  resolve_backward,
)
from gsparse.kernels.backward import gather_backward_xla, slot_positions
from gsparse.kernels.block_bwd import block_backward_pallas
from gsparse.kernels.block_skip import block_bounds, segment_bounds, skipping_body, tile_live
from gsparse.kernels.block_tpu import block_forward_tpu
from gsparse.kernels.nonfinite import finite_part, inf_sign, nonfinite_indicator, resolve_reads


# Over 60 lines: the optional range refs, then one flash step per live listed block
# whose masks and non-finite reads share its locals (as the Mosaic kernel).
def _block_kernel_gpu(
  bidx_ref, query_ref, key_ref, value_ref, *refs, scale, block_k, num_keys, is_causal, window
):
  """One program: one query block of one head. Refs: bidx `[nb]`, query `[bq, H]`,
  key `[Sp, H]`, value `[Sp, Hv]`, then with index ranges lengths `[2]`, query
  segment ids `[bq]`, key segment ids `[Sp]` and the query and key blocks' id
  ranges (`block_skip.segment_bounds`), then o `[bq, Hv]`, lse `[bq]`.
  """
  *ranges, o_ref, lse_ref = refs
  bq = query_ref.shape[0]
  nb = bidx_ref.shape[0]
  hv = value_ref.shape[-1]
  f32 = jnp.float32
  query = query_ref[...]
  qpos = pl.program_id(0) * bq + lax.broadcasted_iota(jnp.int32, (bq, block_k), 0)
  kcol = lax.broadcasted_iota(jnp.int32, (bq, block_k), 1)
  lens = bounds = None
  if ranges:
    lens_ref, qseg_ref, kvseg_ref, qb_ref, kvb_ref = ranges
    q_len, kv_len, qseg = lens_ref[0], lens_ref[1], qseg_ref[...][:, None]
    lens, bounds = (q_len, kv_len), (block_bounds(qb_ref), block_bounds(kvb_ref))

  def step(blk, state):  # a live tile only (gsparse.kernels.block_skip)
    m, denom, acc, reads, signs = state
    start = jnp.maximum(blk, 0) * block_k
    kb = key_ref[pl.ds(start, block_k), :]
    vb = value_ref[pl.ds(start, block_k), :]
    s = lax.dot_general(
      query, kb, (((1,), (1,)), ((), ())), precision=DOT_PRECISION, preferred_element_type=f32
    )
    s = s * scale
    kpos = start + kcol
    valid = (blk >= 0) & (kpos < num_keys)
    if is_causal:
      valid = valid & (kpos <= qpos)
    if ranges:
      kvseg = kvseg_ref[pl.ds(start, block_k)][None, :]
      valid = valid & range_mask(qpos, kpos, q_len, kv_len, qseg, kvseg, window)
    s = jnp.where(valid, s, -jnp.inf)
    m_new = jnp.maximum(m, jnp.max(s, axis=1))
    m_safe = jnp.where(m_new == -jnp.inf, 0.0, m_new)
    alpha = jnp.exp(m - m_safe)
    p = jnp.exp(s - m_safe[:, None])
    # Causal masking differs per query: p @ v over the finite part, plus the
    # count and the infinite signs of the non-finite entries each query reads
    # with positive weight (gsparse.kernels.nonfinite).
    dot = functools.partial(jnp.dot, precision=DOT_PRECISION, preferred_element_type=f32)
    pv = dot(p.astype(vb.dtype), finite_part(vb))
    live = (s != -jnp.inf).astype(f32)
    reads = reads + dot(live, nonfinite_indicator(vb))
    signs = signs + dot(live, inf_sign(vb))
    return m_new, denom * alpha + jnp.sum(p, axis=1), acc * alpha[:, None] + pv, reads, signs

  zeros = jnp.zeros((bq, hv), f32)
  init = (jnp.full((bq,), -jnp.inf, f32), jnp.zeros((bq,), f32), zeros, zeros, zeros)
  live = functools.partial(
    tile_live, block_q=bq, block_k=block_k, is_causal=is_causal, window=window
  )
  body = skipping_body(
    lambda j: bidx_ref[j], step, live, own=(pl.program_id(0), bq), other_block=block_k,
    lens=lens, bounds=bounds,
  )  # fmt: skip
  m, denom, acc, reads, signs = lax.fori_loop(0, nb, body, init)
  ok = denom != 0  # nothing kept; a NaN (NaN or +inf logit) propagates
  l_safe = jnp.where(ok, denom, 1.0)
  out = resolve_reads(jnp.where(ok[:, None], acc / l_safe[:, None], 0.0), reads, signs)
  o_ref[...] = out.astype(o_ref.dtype)
  lse_ref[...] = jnp.where(ok, m + jnp.log(l_safe), -jnp.inf)


# Over 60 lines: one pallas_call whose specs (one per line) follow the optional ranges.
def _block_forward_gpu(
  query, key, value, bidx, ranges, *, block_q, block_k, scale, is_causal, window, interpret
):
  b, tp, n, h = query.shape
  s_len, kh, hv = key.shape[1], key.shape[2], value.shape[-1]
  g = n // kh
  nb = bidx.shape[-1]
  nbp = next_pow2(nb)
  # Triton's dot wants every dimension a power of two >= 16.
  hp, hvp = max(16, next_pow2(h)), max(16, next_pow2(hv))
  sp = round_up(s_len, block_k)
  query = pad_axis(query, 3, hp)
  key = pad_axis(pad_axis(key, 3, hp), 1, sp)
  value = pad_axis(pad_axis(value, 3, hvp), 1, sp)
  bidx = pad_axis(bidx, 3, nbp, -1)
  kernel = functools.partial(
    _block_kernel_gpu,
    scale=scale,
    block_k=block_k,
    num_keys=s_len,
    is_causal=is_causal,
    window=window,
  )
  row = lambda width: pl.BlockSpec((None, block_q, None, width), lambda i, bb, nn: (bb, i, nn, 0))
  kv_spec = lambda width: pl.BlockSpec(
    (None, sp, None, width), lambda i, bb, nn: (bb, 0, nn // g, 0)
  )
  range_specs, range_args = [], []
  if ranges is not None:  # lengths, query ids of the block, all key ids (read per key block)
    bounds = (  # the id range of every query and key block, for block skipping
      segment_bounds(ranges.q_seg, block_q, next_pow2(tp // block_q)),
      segment_bounds(ranges.kv_seg, block_k, next_pow2(sp // block_k)),
    )
    range_specs = [
      pl.BlockSpec((None, 2), lambda i, bb, nn: (bb, 0)),
      pl.BlockSpec((None, block_q), lambda i, bb, nn: (bb, i)),
      pl.BlockSpec((None, sp), lambda i, bb, nn: (bb, 0)),
      *(pl.BlockSpec((None, x.shape[1]), lambda i, bb, nn: (bb, 0)) for x in bounds),
    ]
    range_args = [
      ranges.lengths,
      pad_axis(ranges.q_seg, 1, tp),
      pad_axis(ranges.kv_seg, 1, sp),
      *bounds,
    ]
  compiler_params = None
  if not interpret:
    from jax.experimental.pallas import triton as plgpu

    compiler_params = plgpu.CompilerParams(num_warps=4, num_stages=2)
  out, lse = pl.pallas_call(
    kernel,
    grid=(tp // block_q, b, n),
    in_specs=[
      pl.BlockSpec((None, None, None, nbp), lambda i, bb, nn: (bb, i, nn, 0)),
      row(hp),
      kv_spec(hp),
      kv_spec(hvp),
      *range_specs,
    ],
    out_specs=[row(hvp), pl.BlockSpec((None, block_q, None), lambda i, bb, nn: (bb, i, nn))],
    out_shape=[
      jax.ShapeDtypeStruct((b, tp, n, hvp), query.dtype),
      jax.ShapeDtypeStruct((b, tp, n), jnp.float32),
    ],
    compiler_params=compiler_params,
    interpret=interpret_arg("gpu", interpret),
    name="gsparse_block_gather_gpu",
  )(bidx, query, key, value, *range_args)
  return out[..., :hv], lse


class _Static(NamedTuple):
  """The static arguments of `_block_core` (one hashable, non-differentiable argument)."""

  block_q: int
  block_k: int
  scale: float
  is_causal: bool
  window: tuple[int, int] | None
  variant: str
  interpret: bool
  num_queries: int  # the real T: the query is padded to whole blocks
  backward: str


def _block_forward(query, key, value, bidx, ranges, st: _Static):
  fwd = _block_forward_gpu if st.variant == "gpu" else block_forward_tpu
  return fwd(
    query,
    key,
    value,
    bidx,
    ranges,
    block_q=st.block_q,
    block_k=st.block_k,
    scale=st.scale,
    is_causal=st.is_causal,
    window=st.window,
    interpret=st.interpret,
  )


@functools.partial(jax.custom_vjp, nondiff_argnums=(5,))
def _block_core(query, key, value, bidx, ranges, st):
  return _block_forward(query, key, value, bidx, ranges, st)


def _block_core_fwd(query, key, value, bidx, ranges, st):
  out, lse = _block_forward(query, key, value, bidx, ranges, st)
  return (out, lse), (query, key, value, bidx, ranges, out, lse)


def _xla_range_mask(ranges: Ranges, pos, tb: int, st: _Static) -> jax.Array:
  """`[B, Tb, bq, N, m]` admissibility of the gathered slots `pos` `[B, Tb, N, m]`."""
  b, bq = pos.shape[0], st.block_q
  qpos = jnp.arange(tb * bq).reshape(1, tb, bq, 1, 1)
  qseg = pad_axis(ranges.q_seg, 1, tb * bq).reshape(b, tb, bq, 1, 1)
  kvseg = jax.vmap(lambda ids, p: ids[p])(ranges.kv_seg, pos)[:, :, None]
  q_len, kv_len = (ranges.lengths[:, c].reshape(b, 1, 1, 1, 1) for c in (0, 1))
  return range_mask(qpos, pos[:, :, None], q_len, kv_len, qseg, kvseg, st.window)


def _block_core_bwd(st: _Static, res, cts):
  query, key, value, bidx, ranges, out, lse = res
  do, dlse = cts
  if st.backward == "pallas":
    dq, dk, dv = block_backward_pallas(
      query,
      key,
      value,
      bidx,
      out,
      lse,
      do,
      dlse,
      ranges,
      block_q=st.block_q,
      block_k=st.block_k,
      scale=st.scale,
      is_causal=st.is_causal,
      window=st.window,
      num_queries=st.num_queries,
      variant=st.variant,
      interpret=st.interpret,
    )
    return dq, dk, dv, None, None
  pos, valid = slot_positions(bidx, st.block_k, key.shape[1])
  extra = None if ranges is None else _xla_range_mask(ranges, pos, bidx.shape[1], st)
  dq, dk, dv, _ = gather_backward_xla(
    query,
    key,
    value,
    pos,
    valid,
    None,
    lse,
    do,
    dlse,
    None,
    block_q=st.block_q,
    scale=st.scale,
    is_causal=st.is_causal,
    num_queries=st.num_queries,
    extra_valid=extra,
  )
  return dq, dk, dv, None, None


_block_core.defvjp(_block_core_fwd, _block_core_bwd)


# Over 60 lines through its signature and docstring; the body is checks then one call.
@functools.partial(
  jax.jit,
  static_argnames=(
    "block_q",
    "block_k",
    "scale",
    "is_causal",
    "local_window_size",
    "variant",
    "interpret",
    "backward",
  ),
)
def block_gather_attention(
  query: jax.Array,
  key: jax.Array,
  value: jax.Array,
  block_indices: jax.Array,
  *,
  block_q: int,
  block_k: int,
  scale: float,
  is_causal: bool = False,
  variant: Variant = "gpu",
  interpret: bool = False,
  backward: Backward = "auto",
  query_seq_lengths: jax.Array | None = None,
  key_value_seq_lengths: jax.Array | None = None,
  segment_ids: tuple[jax.Array, jax.Array] | None = None,
  local_window_size: tuple[int, int] | None = None,
) -> tuple[jax.Array, jax.Array]:
  """Block-level sparse-gather attention kernel (differentiable).

  Args:
    query: `[B, T, N, H]`.
    key: `[B, S, K, H]`, `N % K == 0`.
    value: `[B, S, K, Hv]`.
    block_indices: `[B, ceil(T / block_q), N, nb]` int key-block ids, already
      de-duplicated; `-1` (or outside `[0, ceil(S / block_k))`) = masked.
    block_q: queries per block (on GPU a power of two >= 16 for the Triton dot).
    block_k: keys per block (same constraint on GPU).
    scale: logit scale (a Python float).
    is_causal: mask key position > query position.
    variant: "gpu" or "tpu".
    interpret: run in the Pallas (or TPU) interpreter.
    backward: "pallas" (`gsparse.kernels.block_bwd`), "xla"
      (`gather_backward_xla`, the reference) or "auto" (Pallas unless
      `interpret`).
    query_seq_lengths: None or `[B]` int query lengths in [0, T]; later
      queries attend nothing.
    key_value_seq_lengths: None or `[B]` int key lengths in [0, S].
    segment_ids: None or a pair `(q [B, T], kv [B, S])` of int ids: a query
      attends keys of its own segment only.
    local_window_size: None or a static `(left, right)`: query `t` attends
      keys `[t - left, t + right]`.

  The four index-range arguments are the rule of `gsparse._admissible.admits`
  (`range_mask`), evaluated per tile inside the kernels from `[B]` and
  `[B, T]`/`[B, S]` side inputs, never as a `[T, S]` array. Their values are
  not checked here; `gsparse.block_sparse_gather_attention` checks them.

  Returns:
    `(output [B, T, N, Hv] in query.dtype, logsumexp [B, T, N] float32)`; a
    query with no admissible key gets zeros and a `-inf` log-sum-exp.
  """
  check_variant(variant)
  backward = resolve_backward(backward, interpret=interpret)
  check_block_sizes(block_q, block_k, variant=variant, interpret=interpret)
  t = query.shape[1]
  ranges, window = kernel_ranges(
    query_seq_lengths,
    key_value_seq_lengths,
    segment_ids,
    local_window_size,
    batch=query.shape[0],
    t=t,
    s=key.shape[1],
  )
  nkb = -(-key.shape[1] // block_k)
  tb = -(-t // block_q)
  if block_indices.shape[1] != tb:
    raise ValueError(
      f"block_indices.shape={block_indices.shape} must have ceil(T / block_q) = {tb} query blocks"
    )
  bidx = block_indices.astype(jnp.int32)
  bidx = jnp.where((bidx >= 0) & (bidx < nkb), bidx, -1)
  qp = pad_axis(query, 1, tb * block_q)
  st = _Static(block_q, block_k, float(scale), is_causal, window, variant, interpret, t, backward)
  out, lse = _block_core(qp, key, value, bidx, ranges, st)
  return out[:, :t], lse[:, :t]
