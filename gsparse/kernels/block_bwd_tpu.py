"""Mosaic (TPU) kernels of the block-level Pallas backward (`gsparse.kernels.block_bwd`).

The same two kernels as the Triton variant. dq copies each listed K/V block
from HBM into VMEM, as the forward does; dk/dv copies the query, dO, lse and
delta rows of each selecting query block. Block ids, the key-major rows and
offsets, and (with index ranges) the `[B * 2]` lengths and the id range of
every query and key block arrive by scalar prefetch; segment ids come as VMEM
blocks, as in `gsparse.kernels.block_tpu`. Dead tiles are skipped
(`gsparse.kernels.block_skip`).
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl

from gsparse._layout import pad_axis, round_up
from gsparse.kernels._common import interpret_arg
from gsparse.kernels.block_skip import prefetched_bounds, segment_bounds, skipping_body
from gsparse.kernels.block_tile import TN, dot32, tile_grads
from gsparse.kernels.nonfinite import finite_part


# Over 60 lines through its signature (one keyword per line) and the optional range refs.
def _dq_kernel_tpu(
  bidx_smem,
  *refs,
  scale,
  block_k,
  mask,
  live,
  has_ranges,
  group,
  num_blocks,
):
  """Grid step `(b, n, query block)`: as `_dq_kernel_gpu`, with K/V blocks copied
  from HBM `[B, K, Sp, H]` into VMEM (as the forward TPU kernel), lse/delta `[bq, 1]`.
  With index ranges: prefetched lengths `[B * 2]` and block id ranges (as the
  forward), query ids `[bq, 1]`, key ids
  `[Sp / block_k, 1, block_k]`, as the forward."""
  from jax.experimental.pallas import tpu as pltpu

  if has_ranges:
    lens_smem, qb_smem, kvb_smem, *refs = refs
  q_ref, do_ref, lse_ref, delta_ref, k_hbm, v_hbm, *refs = refs
  if has_ranges:
    qseg_ref, kvseg_ref, *refs = refs
  dq_ref, kbuf, vbuf, sems = refs

  b, n, i = pl.program_id(0), pl.program_id(1), pl.program_id(2)
  base = ((b * pl.num_programs(1) + n) * pl.num_programs(2) + i) * num_blocks
  kvh = lax.div(n, group)
  f32 = jnp.float32
  q, do = q_ref[...].astype(f32), do_ref[...].astype(f32)
  bq = q.shape[0]
  qpos = i * bq + lax.broadcasted_iota(jnp.int32, (bq, block_k), 0)
  kcol = lax.broadcasted_iota(jnp.int32, (bq, block_k), 1)

  lens = bounds = None
  if has_ranges:
    lens = (lens_smem[2 * b], lens_smem[2 * b + 1])
    bounds = prefetched_bounds(lens_smem, b, qb_smem, kvb_smem)

  def step(blk, dq):  # a live tile only (gsparse.kernels.block_skip)
    start = jnp.maximum(blk, 0) * block_k
    ck = pltpu.make_async_copy(k_hbm.at[b, kvh, pl.ds(start, block_k)], kbuf, sems.at[0])
    cv = pltpu.make_async_copy(v_hbm.at[b, kvh, pl.ds(start, block_k)], vbuf, sems.at[1])
    ck.start()
    cv.start()
    ck.wait()
    cv.wait()
    kb = kbuf[...].astype(f32)
    rng = None
    if has_ranges:
      rng = (*lens, qseg_ref[...], kvseg_ref[jnp.maximum(blk, 0)])
    valid = (blk >= 0) & mask(qpos, start + kcol, rng)
    _, ds = tile_grads(q, kb, vbuf[...].astype(f32), do, lse_ref[...], delta_ref[...], valid, scale)
    return dq + dot32(ds, finite_part(kb))

  body = skipping_body(
    lambda j: bidx_smem[base + j], step, live, own=(i, bq), other_block=block_k, lens=lens,
    bounds=bounds,
  )  # fmt: skip
  dq = lax.fori_loop(0, num_blocks, body, jnp.zeros(dq_ref.shape, f32))
  dq_ref[...] = dq * scale


# Over 60 lines through its signature and the optional range refs; the body is the
# skipping walk (gsparse.kernels.block_skip) and one tile step.
def _dkdv_kernel_tpu(
  rows_smem,
  offs_smem,
  *refs,
  scale,
  block_q,
  mask,
  live,
  has_ranges,
  num_rows,
):
  """Grid step `(b, n, key block)`: as `_dkdv_kernel_gpu`; its query blocks are
  copied from HBM `[B, N, Tp, .]` into VMEM; rows/offsets are prefetched scalars.
  With index ranges: prefetched lengths `[B * 2]` and block id ranges, key ids `[1, bk]` of this
  block and query ids `[Tp / block_q, block_q, 1]`."""
  from jax.experimental.pallas import tpu as pltpu

  if has_ranges:
    lens_smem, qb_smem, kvb_smem, *refs = refs
  k_ref, v_ref, q_hbm, do_hbm, lse_hbm, delta_hbm, *refs = refs
  if has_ranges:
    kvseg_ref, qseg_ref, *refs = refs
  dk_ref, dv_ref, qbuf, dobuf, lbuf, dbuf, sems = refs

  b, n, j = pl.program_id(0), pl.program_id(1), pl.program_id(2)
  head = b * pl.num_programs(1) + n
  nseg = pl.num_programs(2) + 1
  f32 = jnp.float32
  kb, vb = k_ref[...].astype(f32), v_ref[...].astype(f32)
  bk = kb.shape[0]
  kpos = j * bk + lax.broadcasted_iota(jnp.int32, (block_q, bk), 1)
  qrow = lax.broadcasted_iota(jnp.int32, (block_q, bk), 0)
  srcs = (q_hbm, do_hbm, lse_hbm, delta_hbm)
  bufs = (qbuf, dobuf, lbuf, dbuf)

  lens = bounds = None
  if has_ranges:  # as the dq kernel's
    lens = (lens_smem[2 * b], lens_smem[2 * b + 1])
    bounds = prefetched_bounds(lens_smem, b, qb_smem, kvb_smem)

  def step(row, carry):  # a live tile only (gsparse.kernels.block_skip)
    dk, dv = carry
    start = row * block_q
    copies = [
      pltpu.make_async_copy(src.at[b, n, pl.ds(start, block_q)], buf, sems.at[c])
      for c, (src, buf) in enumerate(zip(srcs, bufs, strict=True))
    ]
    for c in copies:
      c.start()
    for c in copies:
      c.wait()
    q, do = qbuf[...].astype(f32), dobuf[...].astype(f32)
    rng = None
    if has_ranges:
      rng = (*lens, qseg_ref[row], kvseg_ref[...])
    p, ds = tile_grads(q, kb, vb, do, lbuf[...], dbuf[...], mask(start + qrow, kpos, rng), scale)
    return dk + dot32(ds, finite_part(q), TN), dv + dot32(p, do, TN)

  body = skipping_body(
    lambda e: rows_smem[head * num_rows + e], step, live, own=(j, bk), other_block=block_q,
    lens=lens, bounds=bounds, keys=False,
  )  # fmt: skip
  lo, hi = offs_smem[head * nseg + j], offs_smem[head * nseg + j + 1]
  init = (jnp.zeros(dk_ref.shape, f32), jnp.zeros(dv_ref.shape, f32))
  dk, dv = lax.fori_loop(lo, hi, body, init)
  dk_ref[...] = dk * scale
  dv_ref[...] = dv


# Over 60 lines: two pallas_calls over the same head-major operands, one spec per line.
def block_backward_tpu(
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
  """Both TPU kernels; dk and dv per query head `[B, S, N, H]` float32."""
  from jax.experimental.pallas import tpu as pltpu

  b, tp, n, h = query.shape
  s_len, kh, hv = key.shape[1], key.shape[2], value.shape[-1]
  g, nb = n // kh, bidx.shape[-1]
  sp = round_up(s_len, block_k)
  head_major = lambda x: jnp.swapaxes(x, 1, 2)
  qt, dot_ = head_major(query), head_major(do)  # [B, N, Tp, .]
  lse_t, delta_t = head_major(lse)[..., None], head_major(delta)[..., None]
  kt, vt = head_major(pad_axis(key, 1, sp)), head_major(pad_axis(value, 1, sp))  # [B, K, Sp, .]
  any_spec = pl.BlockSpec(memory_space=pl.ANY)
  params = pltpu.CompilerParams(dimension_semantics=("parallel", "parallel", "arbitrary"))
  call = functools.partial(
    pl.pallas_call, interpret=interpret_arg("tpu", interpret), compiler_params=params
  )
  blk = lambda w: pl.BlockSpec((None, None, block_q, w), lambda bb, nn, i, *_: (bb, nn, i, 0))
  # Index ranges (as the forward): lengths prefetched, query ids `[Tb, bq, 1]`
  # and key ids `[nkb, 1, bk]` per batch element, one block or all of them.
  kw["has_ranges"] = ranges is not None
  lens, specs, args = [], ([], []), ([], [])
  if ranges is not None:  # lengths and the id range of every query and key block
    lens = [
      ranges.lengths.reshape(-1),
      segment_bounds(ranges.q_seg, block_q, tp // block_q).reshape(-1),
      segment_bounds(ranges.kv_seg, block_k, sp // block_k).reshape(-1),
    ]
    qseg = pad_axis(ranges.q_seg, 1, tp).reshape(b, tp // block_q, block_q, 1)
    kvseg = pad_axis(ranges.kv_seg, 1, sp).reshape(b, sp // block_k, 1, block_k)
    whole = lambda x: pl.BlockSpec((None, *x.shape[1:]), lambda bb, *_: (bb, 0, 0, 0))
    one = lambda x: pl.BlockSpec((None, None, *x.shape[2:]), lambda bb, nn, i, *_: (bb, i, 0, 0))
    specs = ([one(qseg), whole(kvseg)], [one(kvseg), whole(qseg)])
    args = ([qseg, kvseg], [kvseg, qseg])
  dq = call(
    functools.partial(_dq_kernel_tpu, block_k=block_k, group=g, num_blocks=nb, **kw),
    grid_spec=pltpu.PrefetchScalarGridSpec(
      num_scalar_prefetch=1 + len(lens),
      grid=(b, n, tp // block_q),
      in_specs=[blk(h), blk(hv), blk(1), blk(1), any_spec, any_spec, *specs[0]],
      out_specs=blk(h),
      scratch_shapes=[
        pltpu.VMEM((block_k, h), key.dtype),
        pltpu.VMEM((block_k, hv), value.dtype),
        pltpu.SemaphoreType.DMA((2,)),
      ],
    ),
    out_shape=jax.ShapeDtypeStruct((b, n, tp, h), jnp.float32),
    name="gsparse_block_bwd_dq_tpu",
  )(head_major(bidx).reshape(-1), *lens, qt, dot_, lse_t, delta_t, kt, vt, *args[0])
  kblk = lambda w: pl.BlockSpec(
    (None, None, block_k, w), lambda bb, nn, j, *_: (bb, lax.div(nn, g), j, 0)
  )
  oblk = lambda w: pl.BlockSpec((None, None, block_k, w), lambda bb, nn, j, *_: (bb, nn, j, 0))
  dk, dv = call(
    functools.partial(_dkdv_kernel_tpu, block_q=block_q, num_rows=rows.shape[-1], **kw),
    grid_spec=pltpu.PrefetchScalarGridSpec(
      num_scalar_prefetch=2 + len(lens),
      grid=(b, n, sp // block_k),
      in_specs=[kblk(h), kblk(hv), any_spec, any_spec, any_spec, any_spec, *specs[1]],
      out_specs=[oblk(h), oblk(hv)],
      scratch_shapes=[
        pltpu.VMEM((block_q, h), query.dtype),
        pltpu.VMEM((block_q, hv), do.dtype),
        pltpu.VMEM((block_q, 1), jnp.float32),
        pltpu.VMEM((block_q, 1), jnp.float32),
        pltpu.SemaphoreType.DMA((4,)),
      ],
    ),
    out_shape=[
      jax.ShapeDtypeStruct((b, n, sp, h), jnp.float32),
      jax.ShapeDtypeStruct((b, n, sp, hv), jnp.float32),
    ],
    name="gsparse_block_bwd_dkdv_tpu",
  )(rows.reshape(-1), offsets.reshape(-1), *lens, kt, vt, qt, dot_, lse_t, delta_t, *args[1])
  return head_major(dq), head_major(dk)[:, :s_len], head_major(dv)[:, :s_len]
