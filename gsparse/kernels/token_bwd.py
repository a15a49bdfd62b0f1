"""Pallas backward of the token-level gather: Triton (GPU) and Mosaic (TPU).

Two kernels:

* dq (per query block and head, as the forward): for every slot, recompute
  `p = exp(scale * q.k + bias - lse)` from the saved log-sum-exp, `dp = dO.v`,
  `ds = p * (dp - delta) + dlogits` with `delta = rowsum(dO * O) - dlse`, and
  accumulate `dq += ds * k`. It also writes `p` and `ds` per slot (`[B, T, N,
  k]` float32, the size of the forward's logits): `ds` is the bias gradient,
  and both feed the second kernel.
* dk, dv (per block of keys and query head): XLA sorts the (query, slot) pairs
  by key (`gsparse.kernels.key_major`, a stable sort), and the program of a
  key block walks its pairs in that fixed order, in chunks: it gathers the
  chunk's query and dO rows and adds `onehot^T @ (ds * q)` and
  `onehot^T @ (p * dO)` into its float32 accumulators, the one-hot matrix
  placing each pair on its key's row. No scatter, no atomics: the sums are the
  same, in the same order, on every run.

A masked slot (index `-1`) never reaches a gradient: its row is never read
(zero rows on chip), its `p` and `ds` are zero, and it sorts after every key.
A query with nothing kept (`lse = -inf`) has zero gradients.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl

from gsparse._layout import pad_axis, round_up
from gsparse.kernels._common import DOT_PRECISION, BlockSizes, interpret_arg, next_pow2
from gsparse.kernels.key_major import group_sum, key_major
from gsparse.kernels.nonfinite import finite_part
from gsparse.kernels.token_bwd_tpu import token_dkdv_tpu, token_dq_tpu

# Keys per dk/dv program and pairs per inner step (Triton dot tiles: powers of
# two >= 16).
KEY_BLOCK = 32
PAIR_CHUNK = 32


def _token_dq_kernel_gpu(
  q_ref,
  k_ref,
  v_ref,
  idx_ref,
  bias_ref,
  do_ref,
  lse_ref,
  delta_ref,
  dlogits_ref,
  dq_ref,
  p_ref,
  ds_ref,
  *,
  scale,
  chunk,
):
  """One program: `block_q` queries of one head. Refs: q `[bq, H]`, K `[S, H]`,
  V `[S, Hv]`, idx/bias/dlogits/p/ds `[bq, kp]`, dO `[bq, Hv]`, lse/delta `[bq]`,
  dq `[bq, H]`."""
  f32 = jnp.float32
  kp = idx_ref.shape[-1]

  def query_body(i, carry):
    q, do = q_ref[i, :].astype(f32), do_ref[i, :].astype(f32)
    lse, delta = lse_ref[i], delta_ref[i]

    def chunk_body(c, dq):
      sl = pl.ds(pl.multiple_of(c * chunk, chunk), chunk)
      idx = idx_ref[i, sl]
      ok = (idx >= 0) & (lse != -jnp.inf)
      safe = jnp.where(idx >= 0, idx, 0)
      # gathered rows [chunk, H], on chip only; zero at masked slots
      kr = jnp.where(ok[:, None], k_ref[safe, :].astype(f32), 0.0)
      vr = jnp.where(ok[:, None], v_ref[safe, :].astype(f32), 0.0)
      s = jnp.sum(kr * q[None, :], axis=1) * scale + bias_ref[i, sl].astype(f32)
      p = jnp.where(ok, jnp.exp(jnp.where(ok, s - lse, 0.0)), 0.0)
      dp = jnp.sum(vr * do[None, :], axis=1)
      ds = jnp.where(ok, p * (dp - delta) + dlogits_ref[i, sl], 0.0)  # delta may be NaN
      p_ref[i, sl] = p
      ds_ref[i, sl] = ds
      return dq + jnp.sum(ds[:, None] * finite_part(kr), axis=0)

    dq = lax.fori_loop(0, kp // chunk, chunk_body, jnp.zeros((q.shape[0],), f32))
    dq_ref[i, :] = dq * scale
    return carry

  lax.fori_loop(0, q_ref.shape[0], query_body, 0)


def _token_dkdv_kernel_gpu(
  bounds_ref, keys_ref, rows_ref, ds_ref, p_ref, q_ref, do_ref, dk_ref, dv_ref, *, scale
):
  """Program `(key block, b, n)`. Refs: bounds `[2]` (its entries of the sorted
  pair list), keys/rows/ds/p `[M + chunk]` the pairs in key-major order, Q `[T, H]`,
  dO `[T, Hv]`, dk `[bk, H]`, dv `[bk, Hv]` float32."""
  f32 = jnp.float32
  bk = dk_ref.shape[0]
  lo, hi = bounds_ref[0], bounds_ref[1]
  col = pl.program_id(0) * bk + lax.broadcasted_iota(jnp.int32, (bk, PAIR_CHUNK), 0)
  lane = lax.broadcasted_iota(jnp.int32, (PAIR_CHUNK,), 0)
  dot = functools.partial(jnp.dot, precision=DOT_PRECISION, preferred_element_type=f32)

  def body(c, carry):
    dk, dv = carry
    e0 = lo + c * PAIR_CHUNK
    sl = pl.ds(e0, PAIR_CHUNK)
    inside = e0 + lane < hi
    rows = jnp.where(inside, rows_ref[sl], 0)
    ds = jnp.where(inside, ds_ref[sl], 0.0)
    p = jnp.where(inside, p_ref[sl], 0.0)
    onehot = ((keys_ref[sl][None, :] == col) & inside[None, :]).astype(f32)  # [bk, chunk]
    qr = finite_part(q_ref[rows, :].astype(f32))
    dor = do_ref[rows, :].astype(f32)
    return dk + dot(onehot, ds[:, None] * qr), dv + dot(onehot, p[:, None] * dor)

  init = (jnp.zeros(dk_ref.shape, f32), jnp.zeros(dv_ref.shape, f32))
  dk, dv = lax.fori_loop(0, lax.div(hi - lo + PAIR_CHUNK - 1, PAIR_CHUNK), body, init)
  dk_ref[...] = dk * scale
  dv_ref[...] = dv


def _compiler_params(block_sizes: BlockSizes, interpret: bool):
  if interpret:
    return None
  from jax.experimental.pallas import triton as plgpu

  return plgpu.CompilerParams(num_warps=block_sizes.num_warps, num_stages=block_sizes.num_stages)


def _token_dq_gpu(
  query, key, value, idx, bias, do, lse, delta, dlogits, *, scale, block_sizes, interpret
):
  """`(dq [B, T, N, H], p, ds [B, T, N, k])` float32, padded as the forward kernel."""
  b, t, n, h = query.shape
  s_len, kh, hv = key.shape[1], key.shape[2], value.shape[-1]
  g, kk, bq = n // kh, idx.shape[-1], block_sizes.block_q
  chunk = min(block_sizes.block_slots, next_pow2(kk))
  kp, tp = round_up(kk, chunk), round_up(t, bq)
  hp, hvp = next_pow2(h), next_pow2(hv)
  rows = lambda x, width, value=0: pad_axis(pad_axis(x, 3, width, value), 1, tp, value)
  query, do = rows(query, hp), rows(do, hvp)
  idx, bias, dlogits = rows(idx, kp, -1), rows(bias, kp), rows(dlogits, kp)
  lse, delta = pad_axis(lse, 1, tp), pad_axis(delta, 1, tp)
  row = lambda width: pl.BlockSpec((None, bq, None, width), lambda i, bb, nn: (bb, i, nn, 0))
  vec = pl.BlockSpec((None, bq, None), lambda i, bb, nn: (bb, i, nn))
  kv_spec = lambda width: pl.BlockSpec(
    (None, s_len, None, width), lambda i, bb, nn: (bb, 0, nn // g, 0)
  )
  dq, p, ds = pl.pallas_call(
    functools.partial(_token_dq_kernel_gpu, scale=scale, chunk=chunk),
    grid=(tp // bq, b, n),
    in_specs=[row(hp), kv_spec(hp), kv_spec(hvp), row(kp), row(kp), row(hvp), vec, vec, row(kp)],
    out_specs=[row(hp), row(kp), row(kp)],
    out_shape=[
      jax.ShapeDtypeStruct((b, tp, n, hp), jnp.float32),
      jax.ShapeDtypeStruct((b, tp, n, kp), jnp.float32),
      jax.ShapeDtypeStruct((b, tp, n, kp), jnp.float32),
    ],
    compiler_params=_compiler_params(block_sizes, interpret),
    interpret=interpret_arg("gpu", interpret),
    name="gsparse_token_bwd_dq_gpu",
  )(query, pad_axis(key, 3, hp), pad_axis(value, 3, hvp), idx, bias, do, lse, delta, dlogits)
  return dq[:, :t, :, :h], p[:, :t, :, :kk], ds[:, :t, :, :kk]


def _token_dkdv_gpu(query, do, pairs, offsets, *, s_len, scale, block_sizes, interpret):
  """dk, dv per query head `[B, S, N, .]` float32 from the key-major `pairs`."""
  b, t, n, h = query.shape
  hv = do.shape[-1]
  hp, hvp = max(16, next_pow2(h)), max(16, next_pow2(hv))
  nkb = offsets.shape[-1] - 1
  bounds = jnp.stack([offsets[..., :-1], offsets[..., 1:]], axis=-1)  # [B, N, nkb, 2]
  pair = pl.BlockSpec((None, None, pairs[0].shape[-1]), lambda j, bb, nn: (bb, nn, 0))
  whole = lambda w: pl.BlockSpec((None, t, None, w), lambda j, bb, nn: (bb, 0, nn, 0))
  out = lambda w: pl.BlockSpec((None, KEY_BLOCK, None, w), lambda j, bb, nn: (bb, j, nn, 0))
  dk, dv = pl.pallas_call(
    functools.partial(_token_dkdv_kernel_gpu, scale=scale),
    grid=(nkb, b, n),
    in_specs=[
      pl.BlockSpec((None, None, None, 2), lambda j, bb, nn: (bb, nn, j, 0)),
      *[pair] * 4,
      whole(hp),
      whole(hvp),
    ],
    out_specs=[out(hp), out(hvp)],
    out_shape=[
      jax.ShapeDtypeStruct((b, nkb * KEY_BLOCK, n, hp), jnp.float32),
      jax.ShapeDtypeStruct((b, nkb * KEY_BLOCK, n, hvp), jnp.float32),
    ],
    compiler_params=_compiler_params(block_sizes, interpret),
    interpret=interpret_arg("gpu", interpret),
    name="gsparse_token_bwd_dkdv_gpu",
  )(bounds, *pairs, pad_axis(query, 3, hp), pad_axis(do, 3, hvp))
  return dk[:, :s_len, :, :h], dv[:, :s_len, :, :hv]


# Over 60 lines only through its signature and Args list: the body is ~25 lines.
def token_backward_pallas(
  query: jax.Array,
  key: jax.Array,
  value: jax.Array,
  idx: jax.Array,
  bias: jax.Array,
  out: jax.Array,
  lse: jax.Array,
  do: jax.Array,
  dlse: jax.Array | None,
  dlogits: jax.Array | None,
  *,
  scale: float,
  block_sizes: BlockSizes,
  variant: str,
  interpret: bool,
) -> tuple[jax.Array, jax.Array, jax.Array, jax.Array]:
  """`(dquery, dkey, dvalue, dbias)` of token gather attention, with the Pallas kernels.

  Args:
    query: `[B, T, N, H]`.
    key: `[B, S, K, H]`.
    value: `[B, S, K, Hv]`.
    idx: `[B, T, N, k]` int32 key positions, de-duplicated, `-1` = masked.
    bias: `[B, T, N, k]` per-slot bias.
    out: the forward output `[B, T, N, Hv]`.
    lse: the saved log-sum-exp `[B, T, N]` float32.
    do: cotangent of `out`.
    dlse: None or cotangent of `lse`.
    dlogits: None or cotangent of the slot logits `[B, T, N, k]`.
    scale: logit scale.
    block_sizes: the forward's tiles (query block, slot chunk, Triton warps).
    variant: "gpu" (Triton) or "tpu" (Mosaic).
    interpret: run the kernels in the Pallas (or TPU) interpreter.

  Returns:
    Gradients in the dtypes of `query`, `key`, `value` and `bias`.
  """
  f32 = jnp.float32
  b, t, n, kk = idx.shape
  s_len, kh = key.shape[1], key.shape[2]
  delta = jnp.sum(do.astype(f32) * out.astype(f32), axis=-1)
  if dlse is not None:
    delta = delta - dlse.astype(f32)
  dlogits = jnp.zeros(idx.shape, f32) if dlogits is None else dlogits.astype(f32)
  kw = dict(scale=scale, interpret=interpret)
  do = do.astype(out.dtype)
  dq_fn = _token_dq_gpu if variant == "gpu" else token_dq_tpu
  dq, p, ds = dq_fn(
    query, key, value, idx, bias, do, lse, delta, dlogits, block_sizes=block_sizes, **kw
  )
  keys, order, offsets = key_major(idx, num_ids=s_len, segment=KEY_BLOCK, pad=PAIR_CHUNK)
  key_major_order = lambda x: jnp.take_along_axis(
    jnp.swapaxes(x, 1, 2).reshape(b, n, t * kk), order, axis=-1
  )
  pairs = (keys, order // kk, key_major_order(ds), key_major_order(p))
  if variant == "gpu":
    dk, dv = _token_dkdv_gpu(query, do, pairs, offsets, s_len=s_len, block_sizes=block_sizes, **kw)
  else:
    dk, dv = token_dkdv_tpu(
      query, do, pairs, offsets, s_len=s_len, key_block=KEY_BLOCK, chunk=PAIR_CHUNK, **kw
    )
  return (
    dq.astype(query.dtype),
    group_sum(dk, kh).astype(key.dtype),
    group_sum(dv, kh).astype(value.dtype),
    ds.astype(bias.dtype),
  )
