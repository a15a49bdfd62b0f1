"""Pallas kernels for sparse-gather attention, with an XLA backward.

Two granularities, one semantics (see `gsparse.gather`):

* Token level: every (query, head) has its own list of `k` key positions,
  `indices` `[B, T, N, k]` int32, `-1` = masked (the caller de-duplicates).
* Block level: queries are cut into blocks of `block_q` and keys into blocks of
  `block_k`; every (query block, head) has a list of key-block ids,
  `block_indices` `[B, ceil(T / block_q), N, nb]`, `-1` = masked. Key
  positions past `S` in the last block are masked, and `is_causal` also masks
  key position > query position (top-left aligned).

Each kernel reads every selected K/V row once, from wherever K and V live, and
never writes a `[n, k, d]` gathered copy to memory: the token kernel loops over
chunks of `block_slots` slots with a running (flash-style) max and normaliser;
the block kernel does the same over key blocks with two small matmuls per step.
Both return the output and the log-sum-exp (float32, `-inf` for a query with no
key); the token kernel also returns the per-slot logits so that callers can
form the slot weights `exp(logit - lse)` without a second gather.

Variants (static `variant=`):

* `"gpu"`: a plain Pallas kernel written for the Triton lowering (block shapes
  are padded to powers of two; K/V stay in their `[B, S, K, H]` layout and rows
  are fetched with a gathered load). With `interpret=True` it runs anywhere.
* `"tpu"`: a Mosaic kernel; K/V stay in HBM (`pl.ANY`) and rows or key blocks
  are fetched with `pltpu.make_async_copy` into VMEM scratch, as JAX's TPU
  paged-attention kernel does. Block ids come in through scalar prefetch
  (`pltpu.PrefetchScalarGridSpec`); token indices come in per grid step as an
  SMEM block (the whole `[T, N, k]` index tensor would not fit in SMEM). With
  `interpret=True` it runs in the TPU interpreter (`pltpu.InterpretParams`).
  Copies are not double-buffered: each step waits for its rows.

Gradients: `token_gather_attention` and `block_gather_attention` carry a custom
VJP whose backward is plain XLA (`gather_backward_xla`): it recomputes the slot
probabilities from the saved log-sum-exp, and scatter-adds dK and dV. The
scatter is where the backward differs from the forward: many queries select the
same key, so a kernel would need atomics (Triton) or a key-major transposed
index (a sort); XLA's scatter-add is deterministic on TPU, available
everywhere, and keeps the fallback first-class. See docs/kernels.md.

`sparse_gather_reference` and `block_gather_reference` are independent pure
jnp references: they build the dense `[B, N, T, S]` mask from the indices.
"""

from __future__ import annotations

import dataclasses
import functools

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl

from gsparse.gather import gather_kv
from gsparse.kernels.nonfinite import finite_part, nonfinite_indicator, poison

VARIANTS = ("gpu", "tpu")


def _is_pow2(x: int) -> bool:
  return x >= 1 and (x & (x - 1)) == 0


def _next_pow2(x: int) -> int:
  return 1 << max(0, (int(x) - 1).bit_length())


def _round_up(x: int, m: int) -> int:
  return -(-x // m) * m


@dataclasses.dataclass(frozen=True)
class BlockSizes:
  """Tile sizes of the token-level kernel (static under `jit`).

  Attributes:
    block_q: queries handled by one program (one grid step).
    block_slots: slots read per inner step of the GPU kernel (the running
      softmax advances by this many keys); the slot count is padded up to a
      multiple of `min(block_slots, next_pow2(k))`. The TPU kernel copies all
      slots of a query into VMEM at once and ignores it.
    num_warps: Triton warps per program (GPU only).
    num_stages: Triton software-pipelining stages (GPU only).
  """

  block_q: int = 4
  block_slots: int = 64
  num_warps: int = 4
  num_stages: int = 2

  def __post_init__(self):
    for name in ("block_q", "block_slots", "num_warps", "num_stages"):
      value = getattr(self, name)
      if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ValueError(f"BlockSizes.{name}={value!r} must be a positive int")
    for name in ("block_q", "block_slots"):
      if not _is_pow2(getattr(self, name)):
        raise ValueError(
          f"BlockSizes.{name}={getattr(self, name)} must be a power of two (Triton tiles)"
        )


def default_variant() -> tuple[str, bool]:
  """`(variant, interpret)` for the default backend.

  GPU -> Triton kernel, TPU -> Mosaic kernel, anything else (CPU) -> the GPU
  kernel in Pallas interpret mode.
  """
  backend = jax.default_backend()
  if backend in ("gpu", "cuda", "rocm"):
    return "gpu", False
  if backend == "tpu":
    return "tpu", False
  return "gpu", True


def _check_variant(variant: str) -> None:
  if variant not in VARIANTS:
    raise ValueError(f"variant={variant!r} must be one of {VARIANTS}")


def _interpret_arg(variant: str, interpret: bool):
  if not interpret:
    return False
  if variant == "tpu":
    from jax.experimental.pallas import tpu as pltpu

    return pltpu.InterpretParams()
  return True


def _pad_axis(x: jax.Array, axis: int, size: int, value=0) -> jax.Array:
  pad = size - x.shape[axis]
  if pad == 0:
    return x
  widths = [(0, 0)] * x.ndim
  widths[axis] = (0, pad)
  return jnp.pad(x, widths, constant_values=value)


# ----------------------------------------------------------------------------
# References (pure jnp, dense mask built from the indices).
# ----------------------------------------------------------------------------


def _dense_reference(q, k, v, mask, bias, scale):
  """Softmax attention under a dense `[B, N, T, S]` mask and bias (float32)."""
  n, kh = q.shape[-2], k.shape[-2]
  g = n // kh
  kr = jnp.repeat(k, g, axis=-2).astype(jnp.float32)
  vr = jnp.repeat(v, g, axis=-2).astype(jnp.float32)
  s = jnp.einsum("btnh,bsnh->bnts", q.astype(jnp.float32), kr) * scale + bias
  s = jnp.where(mask, s, -jnp.inf)
  m = jnp.max(s, axis=-1, keepdims=True)
  m = jnp.where(jnp.isfinite(m), m, 0.0)
  e = jnp.where(mask, jnp.exp(s - m), 0.0)
  z = jnp.sum(e, axis=-1, keepdims=True)
  w = e / jnp.where(z > 0, z, 1.0)
  out = jnp.einsum("bnts,bsnv->btnv", w, vr)
  lse = jnp.where(
    z[..., 0] > 0, jnp.log(jnp.where(z[..., 0] > 0, z[..., 0], 1.0)) + m[..., 0], -jnp.inf
  )
  return out.astype(q.dtype), jnp.swapaxes(lse, 1, 2)


def sparse_gather_reference(q, k, v, indices, bias=None, *, scale: float):
  """Dense-mask reference for token-level gather attention.

  Args:
    q: `[B, T, N, H]`.
    k: `[B, S, K, H]`.
    v: `[B, S, K, Hv]`.
    indices: `[B, T, N, k]` int, de-duplicated, `-1` (or out of range) = masked.
    bias: optional `[B, T, N, k]` per-slot bias.
    scale: logit scale.

  Returns:
    `(output [B, T, N, Hv] in q.dtype, logsumexp [B, T, N] float32)`.
  """
  s_len = k.shape[1]
  onehot = jax.nn.one_hot(indices, s_len, dtype=jnp.float32)  # [B, T, N, k, S], -1 -> 0
  mask = jnp.swapaxes(jnp.any(onehot > 0, axis=-2), 1, 2)  # [B, N, T, S]
  dense_bias = 0.0
  if bias is not None:
    dense_bias = jnp.swapaxes(
      jnp.einsum("btnks,btnk->btns", onehot, bias.astype(jnp.float32)), 1, 2
    )
  return _dense_reference(q, k, v, mask, dense_bias, scale)


def block_gather_reference(
  q, k, v, block_indices, *, block_q: int, block_k: int, scale: float, is_causal: bool = False
):
  """Dense-mask reference for block-level gather attention.

  Args:
    q: `[B, T, N, H]`.
    k: `[B, S, K, H]`.
    v: `[B, S, K, Hv]`.
    block_indices: `[B, ceil(T / block_q), N, nb]` int key-block ids,
      de-duplicated, `-1` (or out of range) = masked.
    block_q: queries per query block.
    block_k: keys per key block.
    scale: logit scale.
    is_causal: also mask key position > query position.

  Returns:
    `(output [B, T, N, Hv], logsumexp [B, T, N])`.
  """
  t, s_len = q.shape[1], k.shape[1]
  nkb = -(-s_len // block_k)
  blk_mask = jnp.any(jax.nn.one_hot(block_indices, nkb, dtype=jnp.float32) > 0, axis=-2)
  qb = jnp.arange(t) // block_q
  kb = jnp.arange(s_len) // block_k
  mask = blk_mask[:, qb][..., kb]  # [B, T, N, S]
  mask = jnp.swapaxes(mask, 1, 2)
  if is_causal:
    mask = mask & (jnp.arange(s_len)[None, :] <= jnp.arange(t)[:, None])
  return _dense_reference(q, k, v, mask, 0.0, scale)


# ----------------------------------------------------------------------------
# XLA backward shared by both granularities.
# ----------------------------------------------------------------------------


def _slot_positions(block_indices, block_k, num_keys):
  """Key positions `[B, Tb, N, nb * block_k]` and their validity."""
  pos = block_indices[..., None] * block_k + jnp.arange(block_k, dtype=jnp.int32)
  valid = (block_indices >= 0)[..., None] & (pos < num_keys)
  pos = pos.reshape(*pos.shape[:-2], -1)
  valid = valid.reshape(pos.shape)
  return jnp.where(valid, pos, 0), valid


def gather_backward_xla(
  q,
  k,
  v,
  pos,
  slot_valid,
  bias,
  lse,
  do,
  dlse,
  dlogits,
  *,
  block_q,
  scale,
  is_causal,
  num_queries=None,
):
  """Gradients of gather attention from the saved log-sum-exp (plain XLA).

  Works on query blocks that share their slots (token level: `block_q = 1`).

  Args:
    q: `[B, Tb * block_q, N, H]`.
    k: `[B, S, K, H]`.
    v: `[B, S, K, Hv]`.
    pos: `[B, Tb, N, m]` int32 key positions (any value where not valid).
    slot_valid: `[B, Tb, N, m]` bool.
    bias: None or `[B, Tb * block_q, N, m]` per-slot bias (token level).
    lse: `[B, Tb * block_q, N]` saved log-sum-exp.
    do: cotangent of the output, `[B, T, N, Hv]`.
    dlse: None or cotangent of the log-sum-exp.
    dlogits: None or cotangent of the per-slot logits `[B, T, N, m]`.
    block_q: queries sharing one slot list.
    scale: logit scale.
    is_causal: key position > query position is masked.
    num_queries: the real T where `q` is padded to whole query blocks: padded
      rows take no part (they may read a NaN key no real row can attend).

  Returns:
    `(dq, dk, dv, dbias)` with dbias None when bias is None.
  """
  b, tp, n, h = q.shape
  s_len, kh = k.shape[1], k.shape[2]
  tb, m = pos.shape[1], pos.shape[3]
  bq = block_q
  f32 = jnp.float32
  # Gathered rows stay in the input dtype (zero rows at invalid slots, so a
  # NaN key or value elsewhere never enters); products accumulate in float32.
  kg = gather_kv(k, jnp.where(slot_valid, pos, -1))  # [B, Tb, N, m, H]
  vg = gather_kv(v, jnp.where(slot_valid, pos, -1))
  qb = q.reshape(b, tb, bq, n, h)
  dot = functools.partial(jnp.einsum, preferred_element_type=f32)
  s = dot("btqnh,btnmh->btqnm", qb, kg) * scale
  if bias is not None:
    s = s + bias.reshape(b, tb, bq, n, m).astype(f32)
  valid = jnp.broadcast_to(slot_valid[:, :, None], s.shape)
  qpos = (jnp.arange(tb)[:, None] * bq + jnp.arange(bq)[None, :])[None, :, :, None, None]
  if is_causal:
    valid = valid & (pos[:, :, None] <= qpos)
  if num_queries is not None:
    valid = valid & (qpos < num_queries)
  lse_b = lse.reshape(b, tb, bq, n, 1)
  # A row with nothing kept (lse = -inf, e.g. all slots at -inf logits) has
  # p = 0, not exp(-inf - -inf) = NaN; a NaN lse still propagates.
  valid = valid & (lse_b != -jnp.inf)
  p = jnp.where(valid, jnp.exp(jnp.where(valid, s - lse_b, 0.0)), 0.0)
  dob = do.reshape(b, tb, bq, n, -1)
  # A masked slot may still hold a non-finite row (causal masking inside a
  # key block): its dp is dropped, and the products below take the finite
  # parts of K and Q (an admissible NaN still reaches ds through p).
  dp = jnp.where(valid, dot("btqnv,btnmv->btqnm", dob, vg), 0.0)
  delta = jnp.sum(p * dp, axis=-1, keepdims=True)
  ds = p * (dp - delta)
  if dlse is not None:
    ds = ds + p * dlse.reshape(b, tb, bq, n, 1).astype(f32)
  if dlogits is not None:
    ds = ds + jnp.where(valid, dlogits.reshape(ds.shape).astype(f32), 0.0)
  dq = (scale * dot("btqnm,btnmh->btqnh", ds, finite_part(kg).astype(f32))).reshape(q.shape)
  dkg = scale * dot("btqnm,btqnh->btnmh", ds, finite_part(qb).astype(f32))
  dvg = dot("btqnm,btqnv->btnmv", p, dob.astype(f32))
  g = n // kh
  bi = jnp.arange(b)[:, None, None, None]
  hi = (jnp.arange(n) // g)[None, None, :, None]
  drop = jnp.where(slot_valid, pos, s_len)  # out of range -> dropped
  dk = jnp.zeros(k.shape, f32).at[bi, drop, hi].add(dkg, mode="drop")
  dv = jnp.zeros(v.shape, f32).at[bi, drop, hi].add(dvg, mode="drop")
  dbias = None if bias is None else ds.reshape(bias.shape).astype(bias.dtype)
  return dq.astype(q.dtype), dk.astype(k.dtype), dv.astype(v.dtype), dbias


# ----------------------------------------------------------------------------
# Token level: kernels.
# ----------------------------------------------------------------------------


def _token_kernel_gpu(
  q_ref, k_ref, v_ref, idx_ref, bias_ref, o_ref, lse_ref, s_ref, *, scale, chunk
):
  """One program: `block_q` queries of one head. Refs (squeezed blocks):

  q `[bq, H]`, k `[S, H]`, v `[S, Hv]`, idx/bias/s `[bq, kp]`, o `[bq, Hv]`,
  lse `[bq]`.
  """
  bq = q_ref.shape[0]
  kp = idx_ref.shape[-1]
  hv = v_ref.shape[-1]
  f32 = jnp.float32

  def query_body(i, carry):
    q = q_ref[i, :].astype(f32)

    def chunk_body(c, state):
      m, denom, acc = state
      sl = pl.ds(pl.multiple_of(c * chunk, chunk), chunk)
      idx = idx_ref[i, sl]
      valid = idx >= 0
      safe = jnp.where(valid, idx, 0)
      # gathered rows [chunk, H], on chip only; zero at masked slots (0 * NaN)
      kr = jnp.where(valid[:, None], k_ref[safe, :].astype(f32), 0.0)
      s = jnp.sum(kr * q[None, :], axis=1) * scale + bias_ref[i, sl].astype(f32)
      s = jnp.where(valid, s, -jnp.inf)
      s_ref[i, sl] = s
      m_new = jnp.maximum(m, jnp.max(s))
      m_safe = jnp.where(m_new == -jnp.inf, 0.0, m_new)
      alpha = jnp.exp(m - m_safe)
      p = jnp.exp(s - m_safe)
      vr = jnp.where(valid[:, None], v_ref[safe, :].astype(f32), 0.0)
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


def _token_forward_gpu(q, k, v, idx, bias, *, scale, block_sizes, interpret):
  b, t, n, h = q.shape
  s_len, kh, hv = k.shape[1], k.shape[2], v.shape[-1]
  g = n // kh
  kk = idx.shape[-1]
  bq = block_sizes.block_q
  chunk = min(block_sizes.block_slots, _next_pow2(kk))
  kp = _round_up(kk, chunk)
  tp = _round_up(t, bq)
  hp, hvp = _next_pow2(h), _next_pow2(hv)
  # Triton tensors have power-of-two sizes: pad head dims with zeros (exact:
  # zero columns add nothing to q.k and give zero output columns), slots with
  # -1 (masked) and the query axis up to a multiple of block_q.
  q = _pad_axis(_pad_axis(q, 3, hp), 1, tp)
  k = _pad_axis(k, 3, hp)
  v = _pad_axis(v, 3, hvp)
  idx = _pad_axis(_pad_axis(idx, 3, kp, -1), 1, tp, -1)
  bias = _pad_axis(_pad_axis(bias, 3, kp), 1, tp)
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
      jax.ShapeDtypeStruct((b, tp, n, hvp), q.dtype),
      jax.ShapeDtypeStruct((b, tp, n), jnp.float32),
      jax.ShapeDtypeStruct((b, tp, n, kp), jnp.float32),
    ],
    compiler_params=compiler_params,
    interpret=_interpret_arg("gpu", interpret),
    name="gsparse_token_gather_gpu",
  )(q, k, v, idx, bias)
  return out[:, :t, :, :hv], lse[:, :t], logits[:, :t, :, :kk]


def _token_kernel_tpu(
  idx_smem,
  q_ref,
  idx_ref,
  bias_ref,
  k_hbm,
  v_hbm,
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
  q `[bq, H]`, idx/bias/s `[bq, kp]`, o `[bq, Hv]`, lse `[bq, 1]`; K/V in HBM
  `[B, K, S, H]`; kbuf/vbuf VMEM `[kp, H]`.
  """
  from jax.experimental.pallas import tpu as pltpu

  b, n = pl.program_id(0), pl.program_id(1)
  kvh = lax.div(n, group)
  bq, kp = idx_ref.shape
  f32 = jnp.float32

  def copies(i, c):
    row = jnp.maximum(idx_smem[0, i * kp + c], 0)
    ck = pltpu.make_async_copy(k_hbm.at[b, kvh, pl.ds(row, 1)], kbuf.at[pl.ds(c, 1)], sems.at[0])
    cv = pltpu.make_async_copy(v_hbm.at[b, kvh, pl.ds(row, 1)], vbuf.at[pl.ds(c, 1)], sems.at[1])
    return ck, cv

  def query_body(i, carry):
    def start(c, _):
      ck, cv = copies(i, c)
      ck.start()
      cv.start()
      return _

    def wait(c, _):
      ck, cv = copies(i, c)
      ck.wait()
      cv.wait()
      return _

    def zero_masked(c, _):  # a masked slot holds row 0: 0 * NaN would reach the output
      @pl.when(idx_smem[0, i * kp + c] < 0)
      def _zero():
        vbuf[pl.ds(c, 1), :] = jnp.zeros((1, vbuf.shape[1]), vbuf.dtype)

      return _

    lax.fori_loop(0, kp, start, 0)
    lax.fori_loop(0, kp, wait, 0)  # all copies share two semaphores: zero after the last
    lax.fori_loop(0, kp, zero_masked, 0)
    q = q_ref[pl.ds(i, 1), :].astype(f32)  # [1, H]
    valid = idx_ref[pl.ds(i, 1), :] >= 0  # [1, kp]
    s = lax.dot_general(q, kbuf[...].astype(f32), (((1,), (1,)), ((), ())))
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


def _token_forward_tpu(q, k, v, idx, bias, *, scale, block_sizes, interpret):
  from jax.experimental.pallas import tpu as pltpu

  b, t, n, h = q.shape
  kh, hv = k.shape[2], v.shape[-1]
  g = n // kh
  kk = idx.shape[-1]
  # Mosaic tiles are (8, 128): a query block is a multiple of 8 rows.
  bq = _round_up(block_sizes.block_q, 8)
  tp = _round_up(t, bq)
  # Head-major layouts so that the last two block dims are (rows, features).
  qt = jnp.swapaxes(_pad_axis(q, 1, tp), 1, 2)  # [B, N, Tp, H]
  idx_t = jnp.swapaxes(_pad_axis(idx, 1, tp, -1), 1, 2)  # [B, N, Tp, k]
  bias_t = jnp.swapaxes(_pad_axis(bias, 1, tp), 1, 2)
  kt = jnp.swapaxes(k, 1, 2)  # [B, K, S, H]
  vt = jnp.swapaxes(v, 1, 2)
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
      jax.ShapeDtypeStruct((b, n, tp, hv), q.dtype),
      jax.ShapeDtypeStruct((b, n, tp, 1), jnp.float32),
      jax.ShapeDtypeStruct((b, n, tp, kk), jnp.float32),
    ],
    scratch_shapes=[
      pltpu.VMEM((kk, h), k.dtype),
      pltpu.VMEM((kk, hv), v.dtype),
      pltpu.SemaphoreType.DMA((2,)),
    ],
    compiler_params=pltpu.CompilerParams(dimension_semantics=("parallel", "parallel", "arbitrary")),
    interpret=_interpret_arg("tpu", interpret),
    name="gsparse_token_gather_tpu",
  )(idx_flat, qt, idx_t, bias_t, kt, vt)
  out = jnp.swapaxes(out, 1, 2)[:, :t]
  lse = jnp.swapaxes(lse[..., 0], 1, 2)[:, :t]
  logits = jnp.swapaxes(logits, 1, 2)[:, :t]
  return out, lse, logits


def _token_forward(q, k, v, idx, bias, scale, block_sizes, variant, interpret):
  fwd = _token_forward_gpu if variant == "gpu" else _token_forward_tpu
  return fwd(q, k, v, idx, bias, scale=scale, block_sizes=block_sizes, interpret=interpret)


@functools.partial(jax.custom_vjp, nondiff_argnums=(5, 6, 7, 8))
def _token_core(q, k, v, idx, bias, scale, block_sizes, variant, interpret):
  return _token_forward(q, k, v, idx, bias, scale, block_sizes, variant, interpret)


def _token_core_fwd(q, k, v, idx, bias, scale, block_sizes, variant, interpret):
  out, lse, logits = _token_forward(q, k, v, idx, bias, scale, block_sizes, variant, interpret)
  return (out, lse, logits), (q, k, v, idx, bias, lse)


def _token_core_bwd(scale, block_sizes, variant, interpret, res, cts):
  del block_sizes, variant, interpret
  q, k, v, idx, bias, lse = res
  do, dlse, dlogits = cts
  valid = idx >= 0
  dq, dk, dv, dbias = gather_backward_xla(
    q, k, v, idx, valid, bias, lse, do, dlse, dlogits, block_q=1, scale=scale, is_causal=False
  )
  return dq, dk, dv, None, dbias


_token_core.defvjp(_token_core_fwd, _token_core_bwd)


@functools.partial(jax.jit, static_argnames=("scale", "block_sizes", "variant", "interpret"))
def token_gather_attention(
  q: jax.Array,
  k: jax.Array,
  v: jax.Array,
  indices: jax.Array,
  bias: jax.Array | None = None,
  *,
  scale: float,
  block_sizes: BlockSizes = BlockSizes(),
  variant: str = "gpu",
  interpret: bool = False,
) -> tuple[jax.Array, jax.Array, jax.Array]:
  """Token-level sparse-gather attention kernel (differentiable).

  Args:
    q: `[B, T, N, H]`.
    k: `[B, S, K, H]`, `N % K == 0`.
    v: `[B, S, K, Hv]`.
    indices: `[B, T, N, k]` int32 key positions, already de-duplicated;
      `-1` (or anything outside `[0, S)`) = masked.
    bias: optional `[B, T, N, k]` per-slot bias.
    scale: logit scale (a Python float: it is compiled into the kernel).
    block_sizes: tile sizes.
    variant: "gpu" (Triton-style kernel) or "tpu" (Mosaic kernel).
    interpret: run the kernel in the Pallas (or TPU) interpreter.

  Returns:
    `(output [B, T, N, Hv] in q.dtype, logsumexp [B, T, N] float32,
    logits [B, T, N, k] float32 with -inf at masked slots)`.
  """
  _check_variant(variant)
  s_len = k.shape[1]
  idx = indices.astype(jnp.int32)
  idx = jnp.where((idx >= 0) & (idx < s_len), idx, -1)
  if bias is None:
    bias = jnp.zeros(idx.shape, jnp.float32)
  return _token_core(q, k, v, idx, bias, float(scale), block_sizes, variant, interpret)


# ----------------------------------------------------------------------------
# Block level: kernels.
# ----------------------------------------------------------------------------


# Triton lowers a float32 dot at DEFAULT precision to TF32 (10-bit mantissa);
# HIGHEST keeps float32 inputs in IEEE float32 and changes nothing for 16-bit
# inputs, whose products are exact in the float32 accumulator.
_DOT_PRECISION = lax.Precision.HIGHEST


def _block_kernel_gpu(
  bidx_ref, q_ref, k_ref, v_ref, o_ref, lse_ref, *, scale, block_k, num_keys, is_causal
):
  """One program: one query block of one head. Refs: bidx `[nb]`, q `[bq, H]`,
  k `[Sp, H]`, v `[Sp, Hv]`, o `[bq, Hv]`, lse `[bq]`.
  """
  bq = q_ref.shape[0]
  nb = bidx_ref.shape[0]
  hv = v_ref.shape[-1]
  f32 = jnp.float32
  q = q_ref[...]
  qpos = pl.program_id(0) * bq + lax.broadcasted_iota(jnp.int32, (bq, block_k), 0)
  kcol = lax.broadcasted_iota(jnp.int32, (bq, block_k), 1)

  def body(j, state):
    m, denom, acc, reads = state
    blk = bidx_ref[j]
    start = jnp.maximum(blk, 0) * block_k
    kb = k_ref[pl.ds(start, block_k), :]
    vb = v_ref[pl.ds(start, block_k), :]
    s = lax.dot_general(
      q, kb, (((1,), (1,)), ((), ())), precision=_DOT_PRECISION, preferred_element_type=f32
    )
    s = s * scale
    kpos = start + kcol
    valid = (blk >= 0) & (kpos < num_keys)
    if is_causal:
      valid = valid & (kpos <= qpos)
    s = jnp.where(valid, s, -jnp.inf)
    m_new = jnp.maximum(m, jnp.max(s, axis=1))
    m_safe = jnp.where(m_new == -jnp.inf, 0.0, m_new)
    alpha = jnp.exp(m - m_safe)
    p = jnp.exp(s - m_safe[:, None])
    # Causal masking differs per query: p @ v over the finite part, plus a
    # count of non-finite rows each query may read (gsparse.kernels.nonfinite).
    dot = functools.partial(jnp.dot, precision=_DOT_PRECISION, preferred_element_type=f32)
    pv = dot(p.astype(vb.dtype), finite_part(vb))
    reads = reads + dot(valid.astype(f32), nonfinite_indicator(vb))
    return m_new, denom * alpha + jnp.sum(p, axis=1), acc * alpha[:, None] + pv, reads

  zeros = jnp.zeros((bq, hv), f32)
  init = (jnp.full((bq,), -jnp.inf, f32), jnp.zeros((bq,), f32), zeros, zeros)
  m, denom, acc, reads = lax.fori_loop(0, nb, body, init)
  ok = denom != 0  # nothing kept; a NaN (NaN or +inf logit) propagates
  l_safe = jnp.where(ok, denom, 1.0)
  out = poison(jnp.where(ok[:, None], acc / l_safe[:, None], 0.0), reads)
  o_ref[...] = out.astype(o_ref.dtype)
  lse_ref[...] = jnp.where(ok, m + jnp.log(l_safe), -jnp.inf)


def _block_forward_gpu(q, k, v, bidx, *, block_q, block_k, scale, is_causal, interpret):
  b, tp, n, h = q.shape
  s_len, kh, hv = k.shape[1], k.shape[2], v.shape[-1]
  g = n // kh
  nb = bidx.shape[-1]
  nbp = _next_pow2(nb)
  # Triton's dot wants every dimension a power of two >= 16.
  hp, hvp = max(16, _next_pow2(h)), max(16, _next_pow2(hv))
  sp = _round_up(s_len, block_k)
  q = _pad_axis(q, 3, hp)
  k = _pad_axis(_pad_axis(k, 3, hp), 1, sp)
  v = _pad_axis(_pad_axis(v, 3, hvp), 1, sp)
  bidx = _pad_axis(bidx, 3, nbp, -1)
  kernel = functools.partial(
    _block_kernel_gpu, scale=scale, block_k=block_k, num_keys=s_len, is_causal=is_causal
  )
  row = lambda width: pl.BlockSpec((None, block_q, None, width), lambda i, bb, nn: (bb, i, nn, 0))
  kv_spec = lambda width: pl.BlockSpec(
    (None, sp, None, width), lambda i, bb, nn: (bb, 0, nn // g, 0)
  )
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
    ],
    out_specs=[row(hvp), pl.BlockSpec((None, block_q, None), lambda i, bb, nn: (bb, i, nn))],
    out_shape=[
      jax.ShapeDtypeStruct((b, tp, n, hvp), q.dtype),
      jax.ShapeDtypeStruct((b, tp, n), jnp.float32),
    ],
    compiler_params=compiler_params,
    interpret=_interpret_arg("gpu", interpret),
    name="gsparse_block_gather_gpu",
  )(bidx, q, k, v)
  return out[..., :hv], lse


def _block_kernel_tpu(
  bidx_smem,
  q_ref,
  k_hbm,
  v_hbm,
  o_ref,
  lse_ref,
  kbuf,
  vbuf,
  sems,
  *,
  scale,
  block_k,
  num_keys,
  is_causal,
  group,
  num_blocks,
):
  """Grid step `(b, n, query block)`. bidx_smem: flat prefetched block ids;
  q `[bq, H]`, o `[bq, Hv]`, lse `[bq, 1]`; K/V in HBM `[B, K, Sp, H]`;
  kbuf/vbuf VMEM `[block_k, H]`.
  """
  from jax.experimental.pallas import tpu as pltpu

  b, n, i = pl.program_id(0), pl.program_id(1), pl.program_id(2)
  nheads, nqb = pl.num_programs(1), pl.num_programs(2)
  kvh = lax.div(n, group)
  bq = q_ref.shape[0]
  f32 = jnp.float32
  base = ((b * nheads + n) * nqb + i) * num_blocks
  q = q_ref[...].astype(f32)
  qpos = i * bq + lax.broadcasted_iota(jnp.int32, (bq, block_k), 0)
  kcol = lax.broadcasted_iota(jnp.int32, (bq, block_k), 1)

  def body(j, state):
    m, denom, acc, reads = state
    blk = bidx_smem[base + j]
    start = jnp.maximum(blk, 0) * block_k
    ck = pltpu.make_async_copy(k_hbm.at[b, kvh, pl.ds(start, block_k)], kbuf, sems.at[0])
    cv = pltpu.make_async_copy(v_hbm.at[b, kvh, pl.ds(start, block_k)], vbuf, sems.at[1])
    ck.start()
    cv.start()
    ck.wait()
    s = lax.dot_general(q, kbuf[...].astype(f32), (((1,), (1,)), ((), ()))) * scale
    kpos = start + kcol
    valid = (blk >= 0) & (kpos < num_keys)
    if is_causal:
      valid = valid & (kpos <= qpos)
    s = jnp.where(valid, s, -jnp.inf)
    m_new = jnp.maximum(m, jnp.max(s, axis=1, keepdims=True))
    m_safe = jnp.where(m_new == -jnp.inf, 0.0, m_new)
    alpha = jnp.exp(m - m_safe)
    p = jnp.exp(s - m_safe)
    cv.wait()
    vb = vbuf[...].astype(f32)  # finite part and non-finite reads: as the GPU kernel
    pv = jnp.dot(p, finite_part(vb))
    reads = reads + jnp.dot(valid.astype(f32), nonfinite_indicator(vb))
    return m_new, denom * alpha + jnp.sum(p, axis=1, keepdims=True), acc * alpha + pv, reads

  zeros = jnp.zeros((bq, o_ref.shape[-1]), f32)
  init = (jnp.full((bq, 1), -jnp.inf, f32), jnp.zeros((bq, 1), f32), zeros, zeros)
  m, denom, acc, reads = lax.fori_loop(0, num_blocks, body, init)
  ok = denom != 0  # nothing kept; a NaN (NaN or +inf logit) propagates
  l_safe = jnp.where(ok, denom, 1.0)
  o_ref[...] = poison(jnp.where(ok, acc / l_safe, 0.0), reads).astype(o_ref.dtype)
  lse_ref[...] = jnp.where(ok, m + jnp.log(l_safe), -jnp.inf)


def _block_forward_tpu(q, k, v, bidx, *, block_q, block_k, scale, is_causal, interpret):
  from jax.experimental.pallas import tpu as pltpu

  b, tp, n, h = q.shape
  s_len, kh, hv = k.shape[1], k.shape[2], v.shape[-1]
  g = n // kh
  nb = bidx.shape[-1]
  sp = _round_up(s_len, block_k)
  qt = jnp.swapaxes(q, 1, 2)  # [B, N, Tp, H]
  kt = jnp.swapaxes(_pad_axis(k, 1, sp), 1, 2)  # [B, K, Sp, H]
  vt = jnp.swapaxes(_pad_axis(v, 1, sp), 1, 2)
  flat = jnp.swapaxes(bidx, 1, 2).reshape(-1)  # [B * N * Tb * nb]
  blk = lambda width: pl.BlockSpec(
    (None, None, block_q, width), lambda bb, nn, i, _: (bb, nn, i, 0)
  )
  any_spec = pl.BlockSpec(memory_space=pl.ANY)
  kernel = functools.partial(
    _block_kernel_tpu,
    scale=scale,
    block_k=block_k,
    num_keys=s_len,
    is_causal=is_causal,
    group=g,
    num_blocks=nb,
  )
  out, lse = pl.pallas_call(
    kernel,
    grid_spec=pltpu.PrefetchScalarGridSpec(
      num_scalar_prefetch=1,
      grid=(b, n, tp // block_q),
      in_specs=[blk(h), any_spec, any_spec],
      out_specs=[blk(hv), blk(1)],
      scratch_shapes=[
        pltpu.VMEM((block_k, h), k.dtype),
        pltpu.VMEM((block_k, hv), v.dtype),
        pltpu.SemaphoreType.DMA((2,)),
      ],
    ),
    out_shape=[
      jax.ShapeDtypeStruct((b, n, tp, hv), q.dtype),
      jax.ShapeDtypeStruct((b, n, tp, 1), jnp.float32),
    ],
    compiler_params=pltpu.CompilerParams(dimension_semantics=("parallel", "parallel", "arbitrary")),
    interpret=_interpret_arg("tpu", interpret),
    name="gsparse_block_gather_tpu",
  )(flat, qt, kt, vt)
  return jnp.swapaxes(out, 1, 2), jnp.swapaxes(lse[..., 0], 1, 2)


def _block_forward(q, k, v, bidx, block_q, block_k, scale, is_causal, variant, interpret):
  fwd = _block_forward_gpu if variant == "gpu" else _block_forward_tpu
  return fwd(
    q,
    k,
    v,
    bidx,
    block_q=block_q,
    block_k=block_k,
    scale=scale,
    is_causal=is_causal,
    interpret=interpret,
  )


@functools.partial(jax.custom_vjp, nondiff_argnums=(4, 5, 6, 7, 8, 9, 10))
def _block_core(q, k, v, bidx, block_q, block_k, scale, is_causal, variant, interpret, t):
  del t  # the real T (q is padded to whole blocks); used by the backward
  return _block_forward(q, k, v, bidx, block_q, block_k, scale, is_causal, variant, interpret)


def _block_core_fwd(q, k, v, bidx, block_q, block_k, scale, is_causal, variant, interpret, t):
  del t
  out, lse = _block_forward(q, k, v, bidx, block_q, block_k, scale, is_causal, variant, interpret)
  return (out, lse), (q, k, v, bidx, lse)


def _block_core_bwd(block_q, block_k, scale, is_causal, variant, interpret, t, res, cts):
  del variant, interpret
  q, k, v, bidx, lse = res
  do, dlse = cts
  pos, valid = _slot_positions(bidx, block_k, k.shape[1])
  dq, dk, dv, _ = gather_backward_xla(
    q,
    k,
    v,
    pos,
    valid,
    None,
    lse,
    do,
    dlse,
    None,
    block_q=block_q,
    scale=scale,
    is_causal=is_causal,
    num_queries=t,
  )
  return dq, dk, dv, None


_block_core.defvjp(_block_core_fwd, _block_core_bwd)


def _device_tiles(size: int, variant: str) -> bool:
  """Whether a compiled block kernel tiles a block of `size` (Triton dot / Mosaic)."""
  return _is_pow2(size) and size >= 16 if variant == "gpu" else size % 8 == 0


def block_sizes_supported(block_q: int, block_k: int, variant: str, interpret: bool) -> bool:
  """Whether the block kernel tiles `block_q x block_k` (any size in interpret mode)."""
  return interpret or (_device_tiles(block_q, variant) and _device_tiles(block_k, variant))


@functools.partial(
  jax.jit,
  static_argnames=("block_q", "block_k", "scale", "is_causal", "variant", "interpret"),
)
def block_gather_attention(
  q: jax.Array,
  k: jax.Array,
  v: jax.Array,
  block_indices: jax.Array,
  *,
  block_q: int,
  block_k: int,
  scale: float,
  is_causal: bool = False,
  variant: str = "gpu",
  interpret: bool = False,
) -> tuple[jax.Array, jax.Array]:
  """Block-level sparse-gather attention kernel (differentiable).

  Args:
    q: `[B, T, N, H]`.
    k: `[B, S, K, H]`, `N % K == 0`.
    v: `[B, S, K, Hv]`.
    block_indices: `[B, ceil(T / block_q), N, nb]` int key-block ids, already
      de-duplicated; `-1` (or outside `[0, ceil(S / block_k))`) = masked.
    block_q: queries per block (on GPU a power of two >= 16 for the Triton dot).
    block_k: keys per block (same constraint on GPU).
    scale: logit scale (a Python float).
    is_causal: mask key position > query position.
    variant: "gpu" or "tpu".
    interpret: run in the Pallas (or TPU) interpreter.

  Returns:
    `(output [B, T, N, Hv] in q.dtype, logsumexp [B, T, N] float32)`.
  """
  _check_variant(variant)
  for name, size in (("block_q", block_q), ("block_k", block_k)):
    if not (interpret or _device_tiles(size, variant)):
      rule = "a power of two >= 16" if variant == "gpu" else "a multiple of 8"
      tiles = "Triton dot tiles" if variant == "gpu" else "TPU tiles"
      raise ValueError(
        f"{name}={size} must be {rule} for the {variant.upper()} kernel ({tiles}); "
        'use implementation="xla" for other block sizes'
      )
  t = q.shape[1]
  nkb = -(-k.shape[1] // block_k)
  tb = -(-t // block_q)
  if block_indices.shape[1] != tb:
    raise ValueError(
      f"block_indices.shape={block_indices.shape} must have ceil(T / block_q) = {tb} query blocks"
    )
  bidx = block_indices.astype(jnp.int32)
  bidx = jnp.where((bidx >= 0) & (bidx < nkb), bidx, -1)
  qp = _pad_axis(q, 1, tb * block_q)
  out, lse = _block_core(
    qp, k, v, bidx, block_q, block_k, float(scale), is_causal, variant, interpret, t
  )
  return out[:, :t], lse[:, :t]
