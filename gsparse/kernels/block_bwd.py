"""Pallas backward of the block-level gather: Triton (GPU) and Mosaic (TPU).

Two kernels, flash-attention style, both recomputing the tile probabilities
`p = exp(q k^T * scale - lse)` from the saved log-sum-exp:

* dq: one program per (query block, head) walks the key blocks it selected, as
  the forward does, and accumulates `dq += ds @ K` in registers / VMEM.
* dk, dv: one program per (key block, query head) walks the query blocks that
  selected it, in the fixed key-major order of `gsparse.kernels.key_major`
  (an XLA stable sort of the block table), and accumulates
  `dk += ds^T @ Q`, `dv += p^T @ dO`. Heads that share a K/V head (GQA) get
  one float32 row each, summed afterwards in XLA.

Nothing is scattered and nothing is atomic: every sum runs in one program in a
fixed order, so the gradients are bitwise reproducible. `ds = p * (dO v^T -
delta)` with `delta = rowsum(dO * O) - dlse` computed once in XLA. Masking is
the forward's (causal, key positions past S, padded query rows, the index
ranges; `gsparse.kernels.block_tile`), and a masked
entry never reaches a gradient: `p = 0` there, `dO v^T` is dropped there, and
the products with K and Q take their finite parts (`gsparse.kernels.nonfinite`)
so that a NaN row masked for this query (causal masking inside a key block)
stays out. A row with `lse = -inf` (nothing kept) has zero gradients. This
module holds the Triton kernels; the Mosaic ones are in `block_bwd_tpu`.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl

from gsparse._layout import pad_axis, round_up
from gsparse.kernels._common import Ranges, interpret_arg, next_pow2
from gsparse.kernels.block_bwd_tpu import block_backward_tpu
from gsparse.kernels.block_skip import block_bounds, segment_bounds, skipping_body, tile_live
from gsparse.kernels.block_tile import TN, dot32, tile_grads, tile_valid
from gsparse.kernels.key_major import group_sum, key_major
from gsparse.kernels.nonfinite import finite_part


def _dq_kernel_gpu(
  bidx_ref, q_ref, k_ref, v_ref, do_ref, lse_ref, delta_ref, *refs, scale, block_k, mask, live
):
  """Program `(query block, b, n)`. Refs: bidx `[nb]`, q `[bq, H]`, K `[Sp, H]`,
  V `[Sp, Hv]`, dO `[bq, Hv]`, lse/delta `[bq]`, with index ranges lengths `[2]`,
  query ids `[bq]`, key ids `[Sp]` and the blocks' id ranges (as the forward),
  then dq `[bq, H]` float32."""
  *ranges, dq_ref = refs
  bq = q_ref.shape[0]
  q, do = q_ref[...], do_ref[...]
  lse, delta = lse_ref[...][:, None], delta_ref[...][:, None]
  qpos = pl.program_id(0) * bq + lax.broadcasted_iota(jnp.int32, (bq, block_k), 0)
  kcol = lax.broadcasted_iota(jnp.int32, (bq, block_k), 1)

  lens = bounds = None
  if ranges:
    lens_ref, qseg, kvseg, qb, kvb = ranges
    lens, bounds = (lens_ref[0], lens_ref[1]), (block_bounds(qb), block_bounds(kvb))

  def step(blk, dq):  # a live tile only (gsparse.kernels.block_skip)
    start = jnp.maximum(blk, 0) * block_k
    kb = k_ref[pl.ds(start, block_k), :]
    vb = v_ref[pl.ds(start, block_k), :]
    rng = None
    if ranges:
      rng = (*lens, qseg[...][:, None], kvseg[pl.ds(start, block_k)][None, :])
    valid = (blk >= 0) & mask(qpos, start + kcol, rng)
    _, ds = tile_grads(q, kb, vb, do, lse, delta, valid, scale)
    return dq + dot32(ds.astype(kb.dtype), finite_part(kb))

  body = skipping_body(
    lambda j: bidx_ref[j], step, live, own=(pl.program_id(0), bq), other_block=block_k,
    lens=lens, bounds=bounds,
  )  # fmt: skip
  dq = lax.fori_loop(0, bidx_ref.shape[0], body, jnp.zeros(dq_ref.shape, jnp.float32))
  dq_ref[...] = dq * scale


def _dkdv_kernel_gpu(
  bounds_ref,
  rows_ref,
  k_ref,
  v_ref,
  q_ref,
  do_ref,
  lse_ref,
  delta_ref,
  *refs,
  scale,
  block_q,
  mask,
  live,
):
  """Program `(key block, b, n)`. Refs: bounds `[2]` (its entries of the sorted
  list), rows `[M]` query-block ids in key-major order, K `[bk, H]`, V `[bk, Hv]`,
  Q `[Tp, H]`, dO `[Tp, Hv]`, lse/delta `[Tp]`, with index ranges lengths `[2]`,
  key ids `[bk]`, query ids `[Tp]` and the query and key blocks' id ranges
  (`block_skip.segment_bounds`), then dk `[bk, H]`, dv `[bk, Hv]`."""
  *ranges, dk_ref, dv_ref = refs
  bk = k_ref.shape[0]
  kb, vb = k_ref[...], v_ref[...]
  kpos = pl.program_id(0) * bk + lax.broadcasted_iota(jnp.int32, (block_q, bk), 1)
  qrow = lax.broadcasted_iota(jnp.int32, (block_q, bk), 0)

  lens = bounds = None
  if ranges:  # as the dq kernel's, with the key and query ids swapped
    lens_ref, kvseg, qseg, qb, kvb = ranges
    lens, bounds = (lens_ref[0], lens_ref[1]), (block_bounds(qb), block_bounds(kvb))

  def step(row, carry):  # a live tile only (gsparse.kernels.block_skip)
    dk, dv = carry
    start = row * block_q
    sl = pl.ds(start, block_q)
    q, do = q_ref[sl, :], do_ref[sl, :]
    lse, delta = lse_ref[sl][:, None], delta_ref[sl][:, None]
    rng = None
    if ranges:
      rng = (*lens, qseg[sl][:, None], kvseg[...][None, :])
    p, ds = tile_grads(q, kb, vb, do, lse, delta, mask(start + qrow, kpos, rng), scale)
    dv = dv + dot32(p.astype(do.dtype), do, TN)
    return dk + dot32(ds.astype(q.dtype), finite_part(q), TN), dv

  body = skipping_body(
    lambda e: rows_ref[e], step, live, own=(pl.program_id(0), bk), other_block=block_q,
    lens=lens, bounds=bounds, keys=False,
  )  # fmt: skip
  init = (jnp.zeros(dk_ref.shape, jnp.float32), jnp.zeros(dv_ref.shape, jnp.float32))
  dk, dv = lax.fori_loop(bounds_ref[0], bounds_ref[1], body, init)
  dk_ref[...] = dk * scale
  dv_ref[...] = dv


# Over 60 lines: two pallas_calls over the same padded operands, one BlockSpec per line.
def _backward_gpu(
  query,
  key,
  value,
  bidx,
  do,
  lse,
  delta,
  rows,
  offsets,
  ranges,
  *,
  block_q,
  block_k,
  interpret,
  **kw,
):
  """Both GPU kernels; dk and dv per query head `[B, S, N, H]` float32."""
  b, tp, n, h = query.shape
  s_len, kh, hv = key.shape[1], key.shape[2], value.shape[-1]
  g = n // kh
  # Triton tiles: powers of two >= 16 (as the forward pads them).
  hp, hvp = max(16, next_pow2(h)), max(16, next_pow2(hv))
  sp = round_up(s_len, block_k)
  query, do = pad_axis(query, 3, hp), pad_axis(do, 3, hvp)
  key = pad_axis(pad_axis(key, 3, hp), 1, sp)
  value = pad_axis(pad_axis(value, 3, hvp), 1, sp)
  bidx = pad_axis(bidx, 3, next_pow2(bidx.shape[-1]), -1)
  rows = pad_axis(rows, 2, next_pow2(rows.shape[-1]))
  bounds = jnp.stack([offsets[..., :-1], offsets[..., 1:]], axis=-1)  # [B, N, nkb, 2]
  params = None
  if not interpret:
    from jax.experimental.pallas import triton as plgpu

    params = plgpu.CompilerParams(num_warps=4, num_stages=2)
  call = functools.partial(
    pl.pallas_call, interpret=interpret_arg("gpu", interpret), compiler_params=params
  )
  row = lambda w: pl.BlockSpec((None, block_q, None, w), lambda i, bb, nn: (bb, i, nn, 0))
  vec = pl.BlockSpec((None, block_q, None), lambda i, bb, nn: (bb, i, nn))
  whole_kv = lambda w: pl.BlockSpec((None, sp, None, w), lambda i, bb, nn: (bb, 0, nn // g, 0))
  # Index ranges (as the forward): lengths, then the ids of the program's own
  # block and all ids of the other side, read per block in the loop.
  specs, args, lens_spec = ([], []), ([], []), pl.BlockSpec((None, 2), lambda i, bb, nn: (bb, 0))
  if ranges is not None:
    qseg, kvseg = pad_axis(ranges.q_seg, 1, tp), pad_axis(ranges.kv_seg, 1, sp)
    seg_bounds = [  # the id range of every query and key block, for block skipping
      segment_bounds(ranges.q_seg, block_q, next_pow2(tp // block_q)),
      segment_bounds(ranges.kv_seg, block_k, next_pow2(sp // block_k)),
    ]
    bounds_specs = [pl.BlockSpec((None, x.shape[1]), lambda i, bb, nn: (bb, 0)) for x in seg_bounds]
    specs = (
      [
        lens_spec,
        pl.BlockSpec((None, block_q), lambda i, bb, nn: (bb, i)),
        pl.BlockSpec((None, sp), lambda i, bb, nn: (bb, 0)),
        *bounds_specs,
      ],
      [
        lens_spec,
        pl.BlockSpec((None, block_k), lambda j, bb, nn: (bb, j)),
        pl.BlockSpec((None, tp), lambda j, bb, nn: (bb, 0)),
        *bounds_specs,
      ],
    )
    args = (
      [ranges.lengths, qseg, kvseg, *seg_bounds],
      [ranges.lengths, kvseg, qseg, *seg_bounds],
    )
  dq = call(
    functools.partial(_dq_kernel_gpu, block_k=block_k, **kw),
    grid=(tp // block_q, b, n),
    in_specs=[
      pl.BlockSpec((None, None, None, bidx.shape[-1]), lambda i, bb, nn: (bb, i, nn, 0)),
      row(hp),
      whole_kv(hp),
      whole_kv(hvp),
      row(hvp),
      vec,
      vec,
      *specs[0],
    ],
    out_specs=row(hp),
    out_shape=jax.ShapeDtypeStruct((b, tp, n, hp), jnp.float32),
    name="gsparse_block_bwd_dq_gpu",
  )(bidx, query, key, value, do, lse, delta, *args[0])
  kblk = lambda w: pl.BlockSpec((None, block_k, None, w), lambda j, bb, nn: (bb, j, nn // g, 0))
  oblk = lambda w: pl.BlockSpec((None, block_k, None, w), lambda j, bb, nn: (bb, j, nn, 0))
  whole_q = lambda w: pl.BlockSpec((None, tp, None, w), lambda j, bb, nn: (bb, 0, nn, 0))
  whole_vec = pl.BlockSpec((None, tp, None), lambda j, bb, nn: (bb, 0, nn))
  dk, dv = call(
    functools.partial(_dkdv_kernel_gpu, block_q=block_q, **kw),
    grid=(sp // block_k, b, n),
    in_specs=[
      pl.BlockSpec((None, None, None, 2), lambda j, bb, nn: (bb, nn, j, 0)),
      pl.BlockSpec((None, None, rows.shape[-1]), lambda j, bb, nn: (bb, nn, 0)),
      kblk(hp),
      kblk(hvp),
      whole_q(hp),
      whole_q(hvp),
      whole_vec,
      whole_vec,
      *specs[1],
    ],
    out_specs=[oblk(hp), oblk(hvp)],
    out_shape=[
      jax.ShapeDtypeStruct((b, sp, n, hp), jnp.float32),
      jax.ShapeDtypeStruct((b, sp, n, hvp), jnp.float32),
    ],
    name="gsparse_block_bwd_dkdv_gpu",
  )(bounds, rows, key, value, query, do, lse, delta, *args[1])
  return dq[..., :h], dk[:, :s_len, :, :h], dv[:, :s_len, :, :hv]


# Over 60 lines only through its signature and Args list: the body is ~25 lines.
def block_backward_pallas(
  query: jax.Array,
  key: jax.Array,
  value: jax.Array,
  bidx: jax.Array,
  out: jax.Array,
  lse: jax.Array,
  do: jax.Array,
  dlse: jax.Array | None,
  ranges: Ranges | None = None,
  *,
  block_q: int,
  block_k: int,
  scale: float,
  is_causal: bool,
  window: tuple[int, int] | None = None,
  num_queries: int,
  variant: str,
  interpret: bool,
) -> tuple[jax.Array, jax.Array, jax.Array]:
  """`(dquery, dkey, dvalue)` of block gather attention, with the Pallas kernels.

  Args:
    query: `[B, Tb * block_q, N, H]` (padded to whole query blocks).
    key: `[B, S, K, H]`.
    value: `[B, S, K, Hv]`.
    bidx: `[B, Tb, N, nb]` int32 key-block ids, de-duplicated, `-1` = masked.
    out: the forward output `[B, Tb * block_q, N, Hv]`.
    lse: the saved log-sum-exp `[B, Tb * block_q, N]` float32.
    do: cotangent of `out`.
    dlse: None or cotangent of `lse`.
    ranges: None or the forward's index ranges (`gsparse.kernels._common.Ranges`).
    block_q: queries per block.
    block_k: keys per block.
    scale: logit scale.
    is_causal: key position > query position is masked.
    window: the forward's static local window `(left, right)`, or None.
    num_queries: the real T; padded query rows take no part.
    variant: "gpu" (Triton) or "tpu" (Mosaic).
    interpret: run the kernels in the Pallas (or TPU) interpreter.

  Returns:
    Gradients in the dtypes of `query`, `key` and `value`.
  """
  f32 = jnp.float32
  s_len, kh = key.shape[1], key.shape[2]
  delta = jnp.sum(do.astype(f32) * out.astype(f32), axis=-1)
  if dlse is not None:
    delta = delta - dlse.astype(f32)
  _, order, offsets = key_major(bidx, num_ids=-(-s_len // block_k), segment=1)
  rows = order // bidx.shape[-1]  # the query block of each (query block, slot) pair
  mask = functools.partial(
    tile_valid, num_keys=s_len, num_queries=num_queries, is_causal=is_causal, window=window
  )
  live = functools.partial(
    tile_live, block_q=block_q, block_k=block_k, is_causal=is_causal, window=window
  )
  run = _backward_gpu if variant == "gpu" else block_backward_tpu
  dq, dk, dv = run(
    query,
    key,
    value,
    bidx,
    do.astype(out.dtype),
    lse.astype(f32),
    delta,
    rows,
    offsets,
    ranges,
    block_q=block_q,
    block_k=block_k,
    scale=scale,
    mask=mask,
    live=live,
    interpret=interpret,
  )
  return (
    dq.astype(query.dtype),
    group_sum(dk, kh).astype(key.dtype),
    group_sum(dv, kh).astype(value.dtype),
  )
