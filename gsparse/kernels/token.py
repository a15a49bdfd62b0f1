"""Token-level sparse-gather attention kernels: Triton (GPU) and Mosaic (TPU).

Every (query, head) has its own list of `k` key positions, `indices`
`[B, T, N, k]` int32, `-1` = masked (the caller de-duplicates). The kernel
reads every selected K/V row once, from wherever K and V live, and never
writes a `[n, k, d]` gathered copy to memory: the GPU kernel loops over chunks
of `block_slots` slots with a running (flash-style) max and normaliser; the
TPU kernel copies the rows of one query into VMEM (`pltpu.make_async_copy`)
and takes its indices per grid step as an SMEM block (the whole `[T, N, k]`
index tensor would not fit in SMEM). Both return the output, the log-sum-exp
(float32, `-inf` for a query with no key) and the per-slot logits, so that
callers can form the slot weights without a second gather. The backward is
`gsparse.kernels.token_bwd` (Pallas) or `gsparse.kernels.backward.gather_backward_xla`.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl

from gsparse._layout import pad_axis, round_up
from gsparse.kernels._common import (
  DEFAULT_BLOCK_SIZES,
  Backward,
  BlockSizes,
  Variant,
  check_variant,
  interpret_arg,
  next_pow2,
  resolve_backward,
)
from gsparse.kernels.backward import gather_backward_xla
from gsparse.kernels.token_bwd import token_backward_pallas
from gsparse.kernels.tpu_rows import fetch_rows_tpu


def _token_kernel_gpu(
  query_ref, key_ref, value_ref, idx_ref, bias_ref, o_ref, lse_ref, s_ref, *, scale, chunk
):
  """One program: `block_q` queries of one head. Refs (squeezed blocks):

  query `[bq, H]`, key `[S, H]`, value `[S, Hv]`, idx/bias/s `[bq, kp]`, o `[bq, Hv]`,
  lse `[bq]`.
  """
  bq = query_ref.shape[0]
  kp = idx_ref.shape[-1]
  hv = value_ref.shape[-1]
  f32 = jnp.float32

  def query_body(i, carry):
    query = query_ref[i, :].astype(f32)

    def chunk_body(c, state):
      m, denom, acc = state
      sl = pl.ds(pl.multiple_of(c * chunk, chunk), chunk)
      idx = idx_ref[i, sl]
      valid = idx >= 0
      safe = jnp.where(valid, idx, 0)
      # gathered rows [chunk, H], on chip only; zero at masked slots (0 * NaN)
      kr = jnp.where(valid[:, None], key_ref[safe, :].astype(f32), 0.0)
      s = jnp.sum(kr * query[None, :], axis=1) * scale + bias_ref[i, sl].astype(f32)
      s = jnp.where(valid, s, -jnp.inf)
      s_ref[i, sl] = s
      m_new = jnp.maximum(m, jnp.max(s))
      m_safe = jnp.where(m_new == -jnp.inf, 0.0, m_new)
      alpha = jnp.exp(m - m_safe)
      p = jnp.exp(s - m_safe)
      vr = jnp.where(valid[:, None], value_ref[safe, :].astype(f32), 0.0)
      acc = acc * alpha + jnp.sum(p[:, None] * vr, axis=0)
      return m_new, denom * alpha + jnp.sum(p), acc

    init = (jnp.full((), -jnp.inf, f32), jnp.zeros((), f32), jnp.zeros((hv,), f32))
    m, denom, acc = lax.fori_loop(0, kp // chunk, chunk_body, init)
    ok = denom != 0  # nothing kept; a NaN (NaN or +inf logit) propagates
    l_safe = jnp.where(ok, denom, 1.0)
    o_ref[i, :] = jnp.where(ok, acc / l_safe, 0.0).astype(o_ref.dtype)
    lse_ref[i] = jnp.where(ok, m + jnp.log(l_safe), -jnp.inf)
    return carry

  lax.fori_loop(0, bq, query_body, 0)


def _token_forward_gpu(query, key, value, idx, bias, *, scale, block_sizes, interpret):
  b, t, n, h = query.shape
  s_len, kh, hv = key.shape[1], key.shape[2], value.shape[-1]
  g = n // kh
  kk = idx.shape[-1]
  bq = block_sizes.block_q
  chunk = min(block_sizes.block_slots, next_pow2(kk))
  kp = round_up(kk, chunk)
  tp = round_up(t, bq)
  hp, hvp = next_pow2(h), next_pow2(hv)
  # Triton tensors have power-of-two sizes: pad head dims with zeros (exact:
  # zero columns add nothing to q.k and give zero output columns), slots with
  # -1 (masked) and the query axis up to a multiple of block_q.
  query = pad_axis(pad_axis(query, 3, hp), 1, tp)
  key = pad_axis(key, 3, hp)
  value = pad_axis(value, 3, hvp)
  idx = pad_axis(pad_axis(idx, 3, kp, -1), 1, tp, -1)
  bias = pad_axis(pad_axis(bias, 3, kp), 1, tp)
  kernel = functools.partial(_token_kernel_gpu, scale=scale, chunk=chunk)
  row = lambda width: pl.BlockSpec((None, bq, None, width), lambda i, bb, nn: (bb, i, nn, 0))
  kv_spec = lambda width: pl.BlockSpec(
    (None, s_len, None, width), lambda i, bb, nn: (bb, 0, nn // g, 0)
  )
  compiler_params = None
  if not interpret:
    from jax.experimental.pallas import triton as plgpu

    compiler_params = plgpu.CompilerParams(
      num_warps=block_sizes.num_warps, num_stages=block_sizes.num_stages
    )
  out, lse, logits = pl.pallas_call(
    kernel,
    grid=(tp // bq, b, n),
    in_specs=[row(hp), kv_spec(hp), kv_spec(hvp), row(kp), row(kp)],
    out_specs=[
      row(hvp),
      pl.BlockSpec((None, bq, None), lambda i, bb, nn: (bb, i, nn)),
      row(kp),
    ],
    out_shape=[
      jax.ShapeDtypeStruct((b, tp, n, hvp), query.dtype),
      jax.ShapeDtypeStruct((b, tp, n), jnp.float32),
      jax.ShapeDtypeStruct((b, tp, n, kp), jnp.float32),
    ],
    compiler_params=compiler_params,
    interpret=interpret_arg("gpu", interpret),
    name="gsparse_token_gather_gpu",
  )(query, key, value, idx, bias)
  return out[:, :t, :, :hv], lse[:, :t], logits[:, :t, :, :kk]


def _token_kernel_tpu(
  idx_smem,
  query_ref,
  idx_ref,
  bias_ref,
  key_hbm,
  value_hbm,
  o_ref,
  lse_ref,
  s_ref,
  kbuf,
  vbuf,
  sems,
  *,
  scale,
  group,
):
  """One grid step `(b, n, query block)`. Blocks: idx_smem `[1, bq * kp]` (SMEM),
  query `[bq, H]`, idx/bias/s `[bq, kp]`, o `[bq, Hv]`, lse `[bq, 1]`; K/V in HBM
  `[B, K, S, H]`; kbuf/vbuf VMEM `[kp, H]`.
  """
  b, n = pl.program_id(0), pl.program_id(1)
  kvh = lax.div(n, group)
  bq, kp = idx_ref.shape
  f32 = jnp.float32

  def query_body(i, carry):
    fetch_rows_tpu(idx_smem, i, (b, kvh), key_hbm, value_hbm, kbuf, vbuf, sems)
    query = query_ref[pl.ds(i, 1), :].astype(f32)  # [1, H]
    valid = idx_ref[pl.ds(i, 1), :] >= 0  # [1, kp]
    s = lax.dot_general(query, kbuf[...].astype(f32), (((1,), (1,)), ((), ())))
    s = s * scale + bias_ref[pl.ds(i, 1), :].astype(f32)
    s = jnp.where(valid, s, -jnp.inf)
    m = jnp.max(s, axis=-1, keepdims=True)
    m_safe = jnp.where(m == -jnp.inf, 0.0, m)
    p = jnp.exp(s - m_safe)
    denom = jnp.sum(p, axis=-1, keepdims=True)
    ok = denom != 0  # nothing kept; a NaN (NaN or +inf logit) propagates
    l_safe = jnp.where(ok, denom, 1.0)
    acc = jnp.dot(p, vbuf[...].astype(f32))
    o_ref[pl.ds(i, 1), :] = jnp.where(ok, acc / l_safe, 0.0).astype(o_ref.dtype)
    lse_ref[pl.ds(i, 1), :] = jnp.where(ok, m + jnp.log(l_safe), -jnp.inf)
    s_ref[pl.ds(i, 1), :] = s
    return carry

  lax.fori_loop(0, bq, query_body, 0)


def _token_forward_tpu(query, key, value, idx, bias, *, scale, block_sizes, interpret):
  from jax.experimental.pallas import tpu as pltpu

  b, t, n, h = query.shape
  kh, hv = key.shape[2], value.shape[-1]
  g = n // kh
  kk = idx.shape[-1]
  # Mosaic tiles are (8, 128): a query block is a multiple of 8 rows.
  bq = round_up(block_sizes.block_q, 8)
  tp = round_up(t, bq)
  # Head-major layouts so that the last two block dims are (rows, features).
  qt = jnp.swapaxes(pad_axis(query, 1, tp), 1, 2)  # [B, N, Tp, H]
  idx_t = jnp.swapaxes(pad_axis(idx, 1, tp, -1), 1, 2)  # [B, N, Tp, k]
  bias_t = jnp.swapaxes(pad_axis(bias, 1, tp), 1, 2)
  kt = jnp.swapaxes(key, 1, 2)  # [B, K, S, H]
  vt = jnp.swapaxes(value, 1, 2)
  blk = lambda width: pl.BlockSpec((None, None, bq, width), lambda bb, nn, i: (bb, nn, i, 0))
  # SMEM copy of this step's indices, one row so that the block equals the
  # array in its last two dims: [B, N, Tp / bq, 1, bq * k].
  idx_flat = idx_t.reshape(b, n, tp // bq, 1, bq * kk)
  idx_smem_spec = pl.BlockSpec(
    (None, None, None, 1, bq * kk),
    lambda bb, nn, i: (bb, nn, i, 0, 0),
    memory_space=pltpu.SMEM,
  )
  any_spec = pl.BlockSpec(memory_space=pl.ANY)
  out, lse, logits = pl.pallas_call(
    functools.partial(_token_kernel_tpu, scale=scale, group=g),
    grid=(b, n, tp // bq),
    in_specs=[idx_smem_spec, blk(h), blk(kk), blk(kk), any_spec, any_spec],
    out_specs=[blk(hv), blk(1), blk(kk)],
    out_shape=[
      jax.ShapeDtypeStruct((b, n, tp, hv), query.dtype),
      jax.ShapeDtypeStruct((b, n, tp, 1), jnp.float32),
      jax.ShapeDtypeStruct((b, n, tp, kk), jnp.float32),
    ],
    scratch_shapes=[
      pltpu.VMEM((kk, h), key.dtype),
      pltpu.VMEM((kk, hv), value.dtype),
      pltpu.SemaphoreType.DMA((2,)),
    ],
    compiler_params=pltpu.CompilerParams(dimension_semantics=("parallel", "parallel", "arbitrary")),
    interpret=interpret_arg("tpu", interpret),
    name="gsparse_token_gather_tpu",
  )(idx_flat, qt, idx_t, bias_t, kt, vt)
  out = jnp.swapaxes(out, 1, 2)[:, :t]
  lse = jnp.swapaxes(lse[..., 0], 1, 2)[:, :t]
  logits = jnp.swapaxes(logits, 1, 2)[:, :t]
  return out, lse, logits


def _token_forward(query, key, value, idx, bias, scale, block_sizes, variant, interpret):
  fwd = _token_forward_gpu if variant == "gpu" else _token_forward_tpu
  return fwd(
    query, key, value, idx, bias, scale=scale, block_sizes=block_sizes, interpret=interpret
  )


@functools.partial(jax.custom_vjp, nondiff_argnums=(5, 6, 7, 8, 9))
def _token_core(query, key, value, idx, bias, scale, block_sizes, variant, interpret, backward):
  del backward  # for the VJP
  return _token_forward(query, key, value, idx, bias, scale, block_sizes, variant, interpret)


def _token_core_fwd(query, key, value, idx, bias, scale, block_sizes, variant, interpret, backward):
  del backward
  out, lse, logits = _token_forward(
    query, key, value, idx, bias, scale, block_sizes, variant, interpret
  )
  return (out, lse, logits), (query, key, value, idx, bias, out, lse)


def _token_core_bwd(scale, block_sizes, variant, interpret, backward, res, cts):
  query, key, value, idx, bias, out, lse = res
  do, dlse, dlogits = cts
  if backward == "pallas":
    dq, dk, dv, dbias = token_backward_pallas(
      query,
      key,
      value,
      idx,
      bias,
      out,
      lse,
      do,
      dlse,
      dlogits,
      scale=scale,
      block_sizes=block_sizes,
      variant=variant,
      interpret=interpret,
    )
    return dq, dk, dv, None, dbias
  valid = idx >= 0
  dq, dk, dv, dbias = gather_backward_xla(
    query,
    key,
    value,
    idx,
    valid,
    bias,
    lse,
    do,
    dlse,
    dlogits,
    block_q=1,
    scale=scale,
    is_causal=False,
  )
  return dq, dk, dv, None, dbias


_token_core.defvjp(_token_core_fwd, _token_core_bwd)


@functools.partial(
  jax.jit, static_argnames=("scale", "block_sizes", "variant", "interpret", "backward")
)
def token_gather_attention(
  query: jax.Array,
  key: jax.Array,
  value: jax.Array,
  indices: jax.Array,
  bias: jax.Array | None = None,
  *,
  scale: float,
  block_sizes: BlockSizes = DEFAULT_BLOCK_SIZES,
  variant: Variant = "gpu",
  interpret: bool = False,
  backward: Backward = "auto",
) -> tuple[jax.Array, jax.Array, jax.Array]:
  """Token-level sparse-gather attention kernel (differentiable).

  Args:
    query: `[B, T, N, H]`.
    key: `[B, S, K, H]`, `N % K == 0`.
    value: `[B, S, K, Hv]`.
    indices: `[B, T, N, k]` int32 key positions, already de-duplicated;
      `-1` (or anything outside `[0, S)`) = masked.
    bias: optional `[B, T, N, k]` per-slot bias.
    scale: logit scale (a Python float: it is compiled into the kernel).
    block_sizes: tile sizes.
    variant: "gpu" (Triton-style kernel) or "tpu" (Mosaic kernel).
    interpret: run the kernel in the Pallas (or TPU) interpreter.
    backward: "pallas" (`gsparse.kernels.token_bwd`), "xla"
      (`gather_backward_xla`, the reference) or "auto" (Pallas unless
      `interpret`).

  Returns:
    `(output [B, T, N, Hv] in query.dtype, logsumexp [B, T, N] float32,
    logits [B, T, N, k] float32 with -inf at masked slots)`.
  """
  check_variant(variant)
  backward = resolve_backward(backward, interpret=interpret)
  s_len = key.shape[1]
  idx = indices.astype(jnp.int32)
  idx = jnp.where((idx >= 0) & (idx < s_len), idx, -1)
  if bias is None:
    bias = jnp.zeros(idx.shape, jnp.float32)
  return _token_core(
    query, key, value, idx, bias, float(scale), block_sizes, variant, interpret, backward
  )
