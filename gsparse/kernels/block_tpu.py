"""Mosaic (TPU) forward of the block-level gather (`gsparse.kernels.block`).

The same running softmax as the Triton variant. The block ids arrive by
scalar prefetch (`pltpu.PrefetchScalarGridSpec`), and every listed key block
that is live (`gsparse.kernels.block_skip`) is copied from HBM into VMEM with
`make_async_copy` (not double-buffered). With index ranges the `[B * 2]`
lengths and the id range of every query and key block (`segment_bounds`) are
prefetched too, the query segment
ids come as a `[block_q, 1]` block and the key segment ids as one
`[S / block_k, 1, block_k]` block per batch element, indexed by block id.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl

from gsparse._layout import pad_axis, round_up
from gsparse.kernels._common import interpret_arg, range_mask
from gsparse.kernels.block_skip import prefetched_bounds, segment_bounds, skipping_body, tile_live
from gsparse.kernels.nonfinite import finite_part, inf_sign, nonfinite_indicator, resolve_reads


# Over 60 lines: the optional range refs are unpacked first, then one flash step per
# live listed block whose masks and non-finite reads share its locals (as the GPU kernel).
def _block_kernel_tpu(
  bidx_smem,
  *refs,
  scale,
  block_k,
  num_keys,
  is_causal,
  has_ranges,
  window,
  group,
  num_blocks,
):
  """Grid step `(b, n, query block)`. bidx_smem: flat prefetched block ids;
  with index ranges, lens_smem: flat prefetched `[B * 2]` lengths and the
  flat id ranges of the query and key blocks (`block_skip.segment_bounds`,
  `[B * 2 * Tb]`, `[B * 2 * Sp / block_k]`). Then query
  `[bq, H]`, K/V in HBM `[B, K, Sp, H]`, with index ranges query segment ids
  `[bq, 1]` and key segment ids `[Sp / block_k, 1, block_k]`, then o `[bq, Hv]`,
  lse `[bq, 1]`, kbuf/vbuf VMEM `[block_k, H]`.
  """
  from jax.experimental.pallas import tpu as pltpu

  if has_ranges:
    lens_smem, qb_smem, kvb_smem, query_ref, key_hbm, value_hbm, qseg_ref, kvseg_ref, *refs = refs
  else:
    query_ref, key_hbm, value_hbm, *refs = refs
  o_ref, lse_ref, kbuf, vbuf, sems = refs

  b, n, i = pl.program_id(0), pl.program_id(1), pl.program_id(2)
  nheads, nqb = pl.num_programs(1), pl.num_programs(2)
  kvh = lax.div(n, group)
  bq = query_ref.shape[0]
  f32 = jnp.float32
  base = ((b * nheads + n) * nqb + i) * num_blocks
  query = query_ref[...].astype(f32)
  qpos = i * bq + lax.broadcasted_iota(jnp.int32, (bq, block_k), 0)
  kcol = lax.broadcasted_iota(jnp.int32, (bq, block_k), 1)
  lens = bounds = None
  if has_ranges:
    q_len, kv_len, qseg = lens_smem[2 * b], lens_smem[2 * b + 1], qseg_ref[...]
    lens, bounds = (q_len, kv_len), prefetched_bounds(lens_smem, b, qb_smem, kvb_smem)

  def step(blk, state):  # a live tile only (gsparse.kernels.block_skip)
    m, denom, acc, reads, signs = state
    start = jnp.maximum(blk, 0) * block_k
    ck = pltpu.make_async_copy(key_hbm.at[b, kvh, pl.ds(start, block_k)], kbuf, sems.at[0])
    cv = pltpu.make_async_copy(value_hbm.at[b, kvh, pl.ds(start, block_k)], vbuf, sems.at[1])
    ck.start()
    cv.start()
    ck.wait()
    s = lax.dot_general(query, kbuf[...].astype(f32), (((1,), (1,)), ((), ()))) * scale
    kpos = start + kcol
    valid = (blk >= 0) & (kpos < num_keys)
    if is_causal:
      valid = valid & (kpos <= qpos)
    if has_ranges:
      kvseg = kvseg_ref[jnp.maximum(blk, 0)]  # [1, block_k]
      valid = valid & range_mask(qpos, kpos, q_len, kv_len, qseg, kvseg, window)
    s = jnp.where(valid, s, -jnp.inf)
    m_new = jnp.maximum(m, jnp.max(s, axis=1, keepdims=True))
    m_safe = jnp.where(m_new == -jnp.inf, 0.0, m_new)
    alpha = jnp.exp(m - m_safe)
    p = jnp.exp(s - m_safe)
    cv.wait()
    vb = vbuf[...].astype(f32)  # finite part and non-finite reads: as the GPU kernel
    pv = jnp.dot(p, finite_part(vb))
    live = (s != -jnp.inf).astype(f32)
    reads = reads + jnp.dot(live, nonfinite_indicator(vb))
    signs = signs + jnp.dot(live, inf_sign(vb))
    denom = denom * alpha + jnp.sum(p, axis=1, keepdims=True)
    return m_new, denom, acc * alpha + pv, reads, signs

  zeros = jnp.zeros((bq, o_ref.shape[-1]), f32)
  init = (jnp.full((bq, 1), -jnp.inf, f32), jnp.zeros((bq, 1), f32), zeros, zeros, zeros)
  live = functools.partial(
    tile_live, block_q=bq, block_k=block_k, is_causal=is_causal, window=window
  )
  body = skipping_body(
    lambda j: bidx_smem[base + j], step, live, own=(i, bq), other_block=block_k, lens=lens,
    bounds=bounds,
  )  # fmt: skip
  m, denom, acc, reads, signs = lax.fori_loop(0, num_blocks, body, init)
  ok = denom != 0  # nothing kept; a NaN (NaN or +inf logit) propagates
  l_safe = jnp.where(ok, denom, 1.0)
  out = resolve_reads(jnp.where(ok, acc / l_safe, 0.0), reads, signs)
  o_ref[...] = out.astype(o_ref.dtype)
  lse_ref[...] = jnp.where(ok, m + jnp.log(l_safe), -jnp.inf)


# Over 60 lines: one pallas_call whose specs (one per line) follow the optional ranges.
def block_forward_tpu(
  query, key, value, bidx, ranges, *, block_q, block_k, scale, is_causal, window, interpret
):
  from jax.experimental.pallas import tpu as pltpu

  b, tp, n, h = query.shape
  s_len, kh, hv = key.shape[1], key.shape[2], value.shape[-1]
  g = n // kh
  nb = bidx.shape[-1]
  sp = round_up(s_len, block_k)
  qt = jnp.swapaxes(query, 1, 2)  # [B, N, Tp, H]
  kt = jnp.swapaxes(pad_axis(key, 1, sp), 1, 2)  # [B, K, Sp, H]
  vt = jnp.swapaxes(pad_axis(value, 1, sp), 1, 2)
  flat = jnp.swapaxes(bidx, 1, 2).reshape(-1)  # [B * N * Tb * nb]
  blk = lambda width: pl.BlockSpec(
    (None, None, block_q, width), lambda bb, nn, i, *_: (bb, nn, i, 0)
  )
  any_spec = pl.BlockSpec(memory_space=pl.ANY)
  kernel = functools.partial(
    _block_kernel_tpu,
    scale=scale,
    block_k=block_k,
    num_keys=s_len,
    is_causal=is_causal,
    has_ranges=ranges is not None,
    window=window,
    group=g,
    num_blocks=nb,
  )
  prefetch, range_specs, range_args = [flat], [], []
  if ranges is not None:  # lengths prefetched; query ids per block, key ids per key block
    prefetch += [  # lengths and the id range of every query and key block
      ranges.lengths.reshape(-1),
      segment_bounds(ranges.q_seg, block_q, tp // block_q).reshape(-1),
      segment_bounds(ranges.kv_seg, block_k, sp // block_k).reshape(-1),
    ]
    range_specs = [
      pl.BlockSpec((None, block_q, 1), lambda bb, nn, i, *_: (bb, i, 0)),
      pl.BlockSpec((None, sp // block_k, 1, block_k), lambda bb, nn, i, *_: (bb, 0, 0, 0)),
    ]
    range_args = [
      pad_axis(ranges.q_seg, 1, tp)[..., None],
      pad_axis(ranges.kv_seg, 1, sp).reshape(b, sp // block_k, 1, block_k),
    ]
  out, lse = pl.pallas_call(
    kernel,
    grid_spec=pltpu.PrefetchScalarGridSpec(
      num_scalar_prefetch=len(prefetch),
      grid=(b, n, tp // block_q),
      in_specs=[blk(h), any_spec, any_spec, *range_specs],
      out_specs=[blk(hv), blk(1)],
      scratch_shapes=[
        pltpu.VMEM((block_k, h), key.dtype),
        pltpu.VMEM((block_k, hv), value.dtype),
        pltpu.SemaphoreType.DMA((2,)),
      ],
    ),
    out_shape=[
      jax.ShapeDtypeStruct((b, n, tp, hv), query.dtype),
      jax.ShapeDtypeStruct((b, n, tp, 1), jnp.float32),
    ],
    compiler_params=pltpu.CompilerParams(dimension_semantics=("parallel", "parallel", "arbitrary")),
    interpret=interpret_arg("tpu", interpret),
    name="gsparse_block_gather_tpu",
  )(*prefetch, qt, kt, vt, *range_args)
  return jnp.swapaxes(out, 1, 2), jnp.swapaxes(lse[..., 0], 1, 2)
