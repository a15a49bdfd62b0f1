"""Mosaic (TPU) kernels of the token-level Pallas backward (`gsparse.kernels.token_bwd`).

The same two kernels as the Triton variant. The dq kernel copies the listed
K/V rows of one query into VMEM (`fetch_rows_tpu`, as the forward does). The
dk/dv kernel walks its key block's pairs in chunks: it copies the chunk's
query rows (scalars) into SMEM and its keys, `ds` and `p` (columns) into VMEM,
then copies the chunk's query and dO rows from HBM one by one, and adds
`onehot^T @ (ds * q)` and `onehot^T @ (p * dO)`. Copies are not
double-buffered: each step waits for its rows.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl

from gsparse._layout import pad_axis, round_up
from gsparse.kernels._common import interpret_arg
from gsparse.kernels.nonfinite import finite_part
from gsparse.kernels.tpu_rows import fetch_rows_tpu

_NT = (((1,), (1,)), ((), ()))  # a @ b^T
_TN = (((0,), (0,)), ((), ()))  # a^T @ b


def _dq_kernel(
  idx_smem,
  q_ref,
  idx_ref,
  bias_ref,
  dlogits_ref,
  do_ref,
  lse_ref,
  delta_ref,
  k_hbm,
  v_hbm,
  dq_ref,
  p_ref,
  ds_ref,
  kbuf,
  vbuf,
  sems,
  *,
  scale,
  group,
):
  """Grid step `(b, n, query block)`. Blocks: idx_smem `[1, bq * k]` (SMEM), q `[bq, H]`,
  idx/bias/dlogits/p/ds `[bq, k]`, dO `[bq, Hv]`, lse/delta `[bq, 1]`, dq `[bq, H]`."""
  b, n = pl.program_id(0), pl.program_id(1)
  kvh = lax.div(n, group)
  f32 = jnp.float32

  def query_body(i, carry):
    fetch_rows_tpu(idx_smem, i, (b, kvh), k_hbm, v_hbm, kbuf, vbuf, sems)
    one = pl.ds(i, 1)
    q, do = q_ref[one, :].astype(f32), do_ref[one, :].astype(f32)  # [1, H], [1, Hv]
    lse, delta = lse_ref[one, :], delta_ref[one, :]  # [1, 1]
    ok = (idx_ref[one, :] >= 0) & (lse != -jnp.inf)  # [1, k]
    kb = kbuf[...].astype(f32)
    s = lax.dot_general(q, kb, _NT) * scale + bias_ref[one, :].astype(f32)
    p = jnp.where(ok, jnp.exp(jnp.where(ok, s - lse, 0.0)), 0.0)
    dp = lax.dot_general(do, vbuf[...].astype(f32), _NT)
    ds = jnp.where(ok, p * (dp - delta) + dlogits_ref[one, :], 0.0)  # delta may be NaN
    p_ref[one, :] = p
    ds_ref[one, :] = ds
    dq_ref[one, :] = jnp.dot(ds, finite_part(kb)) * scale  # a masked slot copied row 0
    return carry

  lax.fori_loop(0, q_ref.shape[0], query_body, 0)


# Over 60 lines only through its one-spec-per-line pallas_call (ruff format).
def token_dq_tpu(
  query, key, value, idx, bias, do, lse, delta, dlogits, *, scale, block_sizes, interpret
):
  """`(dq [B, T, N, H], p, ds [B, T, N, k])` float32 (the Mosaic dq kernel)."""
  from jax.experimental.pallas import tpu as pltpu

  b, t, n, h = query.shape
  kh, hv, kk = key.shape[2], value.shape[-1], idx.shape[-1]
  bq = round_up(block_sizes.block_q, 8)  # Mosaic tiles: 8 rows
  tp = round_up(t, bq)
  head_major = lambda x, value=0: jnp.swapaxes(pad_axis(x, 1, tp, value), 1, 2)  # [B, N, Tp, .]
  idx_t = head_major(idx, -1)
  blk = lambda w: pl.BlockSpec((None, None, bq, w), lambda bb, nn, i: (bb, nn, i, 0))
  any_spec = pl.BlockSpec(memory_space=pl.ANY)
  dq, p, ds = pl.pallas_call(
    functools.partial(_dq_kernel, scale=scale, group=n // kh),
    grid=(b, n, tp // bq),
    in_specs=[
      pl.BlockSpec(
        (None, None, None, 1, bq * kk),
        lambda bb, nn, i: (bb, nn, i, 0, 0),
        memory_space=pltpu.SMEM,
      ),
      blk(h),
      blk(kk),
      blk(kk),
      blk(kk),
      blk(hv),
      blk(1),
      blk(1),
      any_spec,
      any_spec,
    ],
    out_specs=[blk(h), blk(kk), blk(kk)],
    out_shape=[
      jax.ShapeDtypeStruct((b, n, tp, h), jnp.float32),
      jax.ShapeDtypeStruct((b, n, tp, kk), jnp.float32),
      jax.ShapeDtypeStruct((b, n, tp, kk), jnp.float32),
    ],
    scratch_shapes=[
      pltpu.VMEM((kk, h), key.dtype),
      pltpu.VMEM((kk, hv), value.dtype),
      pltpu.SemaphoreType.DMA((2,)),
    ],
    compiler_params=pltpu.CompilerParams(dimension_semantics=("parallel", "parallel", "arbitrary")),
    interpret=interpret_arg("tpu", interpret),
    name="gsparse_token_bwd_dq_tpu",
  )(
    idx_t.reshape(b, n, tp // bq, 1, bq * kk),
    head_major(query),
    idx_t,
    head_major(bias),
    head_major(dlogits),
    head_major(do),
    head_major(lse)[..., None],
    head_major(delta)[..., None],
    jnp.swapaxes(key, 1, 2),
    jnp.swapaxes(value, 1, 2),
  )
  back = lambda x: jnp.swapaxes(x, 1, 2)[:, :t]
  return back(dq), back(p), back(ds)


# Over 60 lines through its one-per-line ref signature (ruff format) and the copy helpers.
def _dkdv_kernel(
  offs_smem,
  keys_hbm,
  rows_hbm,
  ds_hbm,
  p_hbm,
  q_hbm,
  do_hbm,
  dk_ref,
  dv_ref,
  rows_buf,
  keys_buf,
  ds_buf,
  p_buf,
  qbuf,
  dobuf,
  sems,
  *,
  scale,
  chunk,
):
  """Grid step `(b, n, key block)`. offs_smem: flat prefetched segment offsets; the
  pairs `[B, N, M + chunk(, 1)]`, Q `[B, N, T, H]` and dO in HBM; dk `[bk, H]`."""
  from jax.experimental.pallas import tpu as pltpu

  b, n, j = pl.program_id(0), pl.program_id(1), pl.program_id(2)
  nseg = pl.num_programs(2) + 1
  base = (b * pl.num_programs(1) + n) * nseg + j
  lo, hi = offs_smem[base], offs_smem[base + 1]
  f32 = jnp.float32
  bk = dk_ref.shape[0]
  col = j * bk + lax.broadcasted_iota(jnp.int32, (chunk, bk), 1)
  lane = lax.broadcasted_iota(jnp.int32, (chunk, 1), 0)

  def copy(src, dst, sem):
    c = pltpu.make_async_copy(src, dst, sems.at[sem])
    c.start()
    return c

  def body(c, carry):
    dk, dv = carry
    e0 = lo + c * chunk
    sl = pl.ds(e0, chunk)
    pending = [
      copy(src.at[b, n, sl], buf, i)
      for i, (src, buf) in enumerate(
        ((rows_hbm, rows_buf), (keys_hbm, keys_buf), (ds_hbm, ds_buf), (p_hbm, p_buf))
      )
    ]
    for cp in pending:
      cp.wait()

    def fetch(r, _):
      row = pl.ds(rows_buf[r], 1)
      copy(q_hbm.at[b, n, row], qbuf.at[pl.ds(r, 1)], 4)
      copy(do_hbm.at[b, n, row], dobuf.at[pl.ds(r, 1)], 5)
      return _

    def wait(r, _):
      row = pl.ds(rows_buf[r], 1)
      pltpu.make_async_copy(q_hbm.at[b, n, row], qbuf.at[pl.ds(r, 1)], sems.at[4]).wait()
      pltpu.make_async_copy(do_hbm.at[b, n, row], dobuf.at[pl.ds(r, 1)], sems.at[5]).wait()
      return _

    lax.fori_loop(0, chunk, fetch, 0)
    lax.fori_loop(0, chunk, wait, 0)
    inside = e0 + lane < hi  # [chunk, 1]
    ds = jnp.where(inside, ds_buf[...], 0.0)
    p = jnp.where(inside, p_buf[...], 0.0)
    onehot = ((keys_buf[...] == col) & inside).astype(f32)  # [chunk, bk]
    q = finite_part(qbuf[...].astype(f32))
    dk = dk + lax.dot_general(onehot, ds * q, _TN)
    return dk, dv + lax.dot_general(onehot, p * dobuf[...].astype(f32), _TN)

  init = (jnp.zeros(dk_ref.shape, f32), jnp.zeros(dv_ref.shape, f32))
  dk, dv = lax.fori_loop(0, lax.div(hi - lo + chunk - 1, chunk), body, init)
  dk_ref[...] = dk * scale
  dv_ref[...] = dv


def token_dkdv_tpu(query, do, pairs, offsets, *, s_len, scale, key_block, chunk, interpret):
  """dk, dv per query head `[B, S, N, .]` float32 (the Mosaic dk/dv kernel)."""
  from jax.experimental.pallas import tpu as pltpu

  b, t, n, h = query.shape
  hv = do.shape[-1]
  nkb = offsets.shape[-1] - 1
  keys, rows, ds, p = pairs
  any_spec = pl.BlockSpec(memory_space=pl.ANY)
  out = lambda w: pl.BlockSpec((None, None, key_block, w), lambda bb, nn, j, _: (bb, nn, j, 0))
  dk, dv = pl.pallas_call(
    functools.partial(_dkdv_kernel, scale=scale, chunk=chunk),
    grid_spec=pltpu.PrefetchScalarGridSpec(
      num_scalar_prefetch=1,
      grid=(b, n, nkb),
      in_specs=[any_spec] * 6,
      out_specs=[out(h), out(hv)],
      scratch_shapes=[
        pltpu.SMEM((chunk,), jnp.int32),
        pltpu.VMEM((chunk, 1), jnp.int32),
        pltpu.VMEM((chunk, 1), jnp.float32),
        pltpu.VMEM((chunk, 1), jnp.float32),
        pltpu.VMEM((chunk, h), query.dtype),
        pltpu.VMEM((chunk, hv), do.dtype),
        pltpu.SemaphoreType.DMA((6,)),
      ],
    ),
    out_shape=[
      jax.ShapeDtypeStruct((b, n, nkb * key_block, h), jnp.float32),
      jax.ShapeDtypeStruct((b, n, nkb * key_block, hv), jnp.float32),
    ],
    compiler_params=pltpu.CompilerParams(dimension_semantics=("parallel", "parallel", "arbitrary")),
    interpret=interpret_arg("tpu", interpret),
    name="gsparse_token_bwd_dkdv_tpu",
  )(
    offsets.reshape(-1),
    keys[..., None],
    rows,
    ds[..., None],
    p[..., None],
    jnp.swapaxes(query, 1, 2),
    jnp.swapaxes(do, 1, 2),
  )
  return jnp.swapaxes(dk, 1, 2)[:, :s_len], jnp.swapaxes(dv, 1, 2)[:, :s_len]
