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
the forward's (causal, key positions past S, padded query rows), and a masked
entry never reaches a gradient: `p = 0` there, `dO v^T` is dropped there, and
the products with K and Q take their finite parts (`gsparse.kernels.nonfinite`)
so that a NaN row masked for this query (causal masking inside a key block)
stays out. A row with `lse = -inf` (nothing kept) has zero gradients.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl

from gsparse._layout import pad_axis, round_up
from gsparse.kernels._common import DOT_PRECISION, Ranges, interpret_arg, next_pow2, range_mask
from gsparse.kernels.key_major import group_sum, key_major
from gsparse.kernels.nonfinite import finite_part

_NT = (((1,), (1,)), ((), ()))  # a @ b^T
_TN = (((0,), (0,)), ((), ()))  # a^T @ b


def _dot(a, b, dims=(((1,), (0,)), ((), ()))):
  return lax.dot_general(a, b, dims, precision=DOT_PRECISION, preferred_element_type=jnp.float32)


def _tile(q, kb, vb, do, lse, delta, valid, scale):
  """`(p, ds)` `[bq, bk]` float32 of one tile; lse and delta are `[bq, 1]` columns."""
  ok = valid & (lse != -jnp.inf)
  s = _dot(q, kb, _NT) * scale
  p = jnp.where(ok, jnp.exp(jnp.where(ok, s - lse, 0.0)), 0.0)
  dp = _dot(do, vb, _NT)
  # Not p * (dp - delta) alone: a masked entry has p = 0, but delta is NaN on
  # a row whose output is NaN (or a padded row that read a NaN row forward).
  return p, jnp.where(ok, p * (dp - delta), 0.0)


def _valid(qpos, kpos, rng, *, num_keys, num_queries, is_causal, window):
  """The forward's mask of one tile; `rng`: None or `(q_len, kv_len, q_seg, kv_seg)`."""
  valid = (kpos < num_keys) & (qpos < num_queries)
  if rng is not None:
    valid = valid & range_mask(qpos, kpos, *rng, window)
  return valid & (kpos <= qpos) if is_causal else valid


def _dq_kernel_gpu(
  bidx_ref, q_ref, k_ref, v_ref, do_ref, lse_ref, delta_ref, *refs, scale, block_k, mask
):
  """Program `(query block, b, n)`. Refs: bidx `[nb]`, q `[bq, H]`, K `[Sp, H]`,
  V `[Sp, Hv]`, dO `[bq, Hv]`, lse/delta `[bq]`, with index ranges lengths `[2]`,
  query ids `[bq]` and key ids `[Sp]` (as the forward), then dq `[bq, H]` float32."""
  *ranges, dq_ref = refs
  bq = q_ref.shape[0]
  q, do = q_ref[...], do_ref[...]
  lse, delta = lse_ref[...][:, None], delta_ref[...][:, None]
  qpos = pl.program_id(0) * bq + lax.broadcasted_iota(jnp.int32, (bq, block_k), 0)
  kcol = lax.broadcasted_iota(jnp.int32, (bq, block_k), 1)

  def body(j, dq):
    blk = bidx_ref[j]
    start = jnp.maximum(blk, 0) * block_k
    kb = k_ref[pl.ds(start, block_k), :]
    vb = v_ref[pl.ds(start, block_k), :]
    rng = None
    if ranges:
      lens, qseg, kvseg = ranges
      rng = (lens[0], lens[1], qseg[...][:, None], kvseg[pl.ds(start, block_k)][None, :])
    valid = (blk >= 0) & mask(qpos, start + kcol, rng)
    _, ds = _tile(q, kb, vb, do, lse, delta, valid, scale)
    return dq + _dot(ds.astype(kb.dtype), finite_part(kb))

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
):
  """Program `(key block, b, n)`. Refs: bounds `[2]` (its entries of the sorted
  list), rows `[M]` query-block ids in key-major order, K `[bk, H]`, V `[bk, Hv]`,
  Q `[Tp, H]`, dO `[Tp, Hv]`, lse/delta `[Tp]`, with index ranges lengths `[2]`,
  key ids `[bk]` and query ids `[Tp]`, then dk `[bk, H]`, dv `[bk, Hv]`."""
  *ranges, dk_ref, dv_ref = refs
  bk = k_ref.shape[0]
  kb, vb = k_ref[...], v_ref[...]
  kpos = pl.program_id(0) * bk + lax.broadcasted_iota(jnp.int32, (block_q, bk), 1)
  qrow = lax.broadcasted_iota(jnp.int32, (block_q, bk), 0)

  def body(e, carry):
    dk, dv = carry
    start = rows_ref[e] * block_q
    sl = pl.ds(start, block_q)
    q, do = q_ref[sl, :], do_ref[sl, :]
    lse, delta = lse_ref[sl][:, None], delta_ref[sl][:, None]
    rng = None
    if ranges:
      lens, kvseg, qseg = ranges
      rng = (lens[0], lens[1], qseg[sl][:, None], kvseg[...][None, :])
    p, ds = _tile(q, kb, vb, do, lse, delta, mask(start + qrow, kpos, rng), scale)
    dv = dv + _dot(p.astype(do.dtype), do, _TN)
    return dk + _dot(ds.astype(q.dtype), finite_part(q), _TN), dv

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
    specs = (
      [
        lens_spec,
        pl.BlockSpec((None, block_q), lambda i, bb, nn: (bb, i)),
        pl.BlockSpec((None, sp), lambda i, bb, nn: (bb, 0)),
      ],
      [
        lens_spec,
        pl.BlockSpec((None, block_k), lambda j, bb, nn: (bb, j)),
        pl.BlockSpec((None, tp), lambda j, bb, nn: (bb, 0)),
      ],
    )
    args = ([ranges.lengths, qseg, kvseg], [ranges.lengths, kvseg, qseg])
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


def _dq_kernel_tpu(
  bidx_smem,
  *refs,
  scale,
  block_k,
  mask,
  has_ranges,
  group,
  num_blocks,
):
  """Grid step `(b, n, query block)`: as `_dq_kernel_gpu`, with K/V blocks copied
  from HBM `[B, K, Sp, H]` into VMEM (as the forward TPU kernel), lse/delta `[bq, 1]`.
  With index ranges: prefetched lengths `[B * 2]`, query ids `[bq, 1]`, key ids
  `[Sp / block_k, 1, block_k]`, as the forward."""
  from jax.experimental.pallas import tpu as pltpu

  lens_smem = None
  if has_ranges:
    lens_smem, *refs = refs
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

  def body(j, dq):
    blk = bidx_smem[base + j]
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
      rng = (lens_smem[2 * b], lens_smem[2 * b + 1], qseg_ref[...], kvseg_ref[jnp.maximum(blk, 0)])
    valid = (blk >= 0) & mask(qpos, start + kcol, rng)
    _, ds = _tile(q, kb, vbuf[...].astype(f32), do, lse_ref[...], delta_ref[...], valid, scale)
    return dq + _dot(ds, finite_part(kb))

  dq = lax.fori_loop(0, num_blocks, body, jnp.zeros(dq_ref.shape, f32))
  dq_ref[...] = dq * scale


def _dkdv_kernel_tpu(
  rows_smem,
  offs_smem,
  *refs,
  scale,
  block_q,
  mask,
  has_ranges,
  num_rows,
):
  """Grid step `(b, n, key block)`: as `_dkdv_kernel_gpu`; its query blocks are
  copied from HBM `[B, N, Tp, .]` into VMEM; rows/offsets are prefetched scalars.
  With index ranges: prefetched lengths `[B * 2]`, key ids `[1, bk]` of this
  block and query ids `[Tp / block_q, block_q, 1]`."""
  from jax.experimental.pallas import tpu as pltpu

  lens_smem = None
  if has_ranges:
    lens_smem, *refs = refs
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

  def body(e, carry):
    dk, dv = carry
    row = rows_smem[head * num_rows + e]
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
      rng = (lens_smem[2 * b], lens_smem[2 * b + 1], qseg_ref[row], kvseg_ref[...])
    p, ds = _tile(q, kb, vb, do, lbuf[...], dbuf[...], mask(start + qrow, kpos, rng), scale)
    return dk + _dot(ds, finite_part(q), _TN), dv + _dot(p, do, _TN)

  lo, hi = offs_smem[head * nseg + j], offs_smem[head * nseg + j + 1]
  init = (jnp.zeros(dk_ref.shape, f32), jnp.zeros(dv_ref.shape, f32))
  dk, dv = lax.fori_loop(lo, hi, body, init)
  dk_ref[...] = dk * scale
  dv_ref[...] = dv


# Over 60 lines: two pallas_calls over the same head-major operands, one spec per line.
def _backward_tpu(
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
  if ranges is not None:
    lens = [ranges.lengths.reshape(-1)]
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
    _valid, num_keys=s_len, num_queries=num_queries, is_causal=is_causal, window=window
  )
  run = _backward_gpu if variant == "gpu" else _backward_tpu
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
    interpret=interpret,
  )
  return (
    dq.astype(query.dtype),
    group_sum(dk, kh).astype(key.dtype),
    group_sum(dv, kh).astype(value.dtype),
  )
