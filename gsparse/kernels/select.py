"""A fused exact top-k selection in Pallas that never writes the logits.

`fused_topk_select` returns, for every query and head, the `k` keys with the
largest logits `scale * q.k + bias` (masked keys excluded): the same indices,
in the same order, as `jax.lax.top_k` on the masked `[T, S]` logit row
(`selection="full"`), with every NaN ranking first and ties going to the lower
key index, and `-1` in the slots beyond the row's admissible keys. It also
returns the kept logits, the log-sum-exp of the whole admissible row and the
number of admissible keys, so a caller gets the exact tail mass of what it
kept, `1 - exp(logsumexp(kept) - logsumexp_all)`.

The algorithm (a running log-sum-exp and a running top-k list, merged block
by block) is described in `gsparse.kernels.topk_state`.

Variants (static `variant=`):

* `"gpu"`: written for the Triton lowering. Grid `(batch, head, query
  block)`; a `fori_loop` walks the key blocks of the program's `[S, H]` keys
  (causal programs stop at the diagonal). Block sizes are powers of two
  (Triton's dot wants >= 16); the head dim is zero-padded to a power of two.
* `"tpu"`: written for Mosaic. Grid `(batch, head, query block, key block)`
  with the key axis "arbitrary": Pallas pipelines the key blocks into VMEM and
  the running state lives in VMEM scratch (the pattern of JAX's TPU flash
  attention). Causal programs skip blocks above the diagonal and do not fetch
  them.

Costs and limits (merge work, state size, when the indices match "full"):
docs/kernels.md, "The fused top-k selection".
"""

from __future__ import annotations

import functools
import math
from typing import NamedTuple

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl
from jax.typing import ArrayLike

from gsparse._layout import pad_axis, round_up
from gsparse._numerics import float_from_sortable, positive_nan
from gsparse.kernels import select_ranges as sr
from gsparse.kernels._common import next_pow2
from gsparse.kernels.block_skip import run_if_live
from gsparse.kernels.select_inputs import check_inputs, side_input
from gsparse.kernels.topk_state import (
  DOT_PRECISION,
  block_logits,
  init_state,
  update,
  write_outputs,
)

__all__ = ["FusedSelection", "fused_topk_select", "fused_topk_select_reference"]


class FusedSelection(NamedTuple):
  """What `fused_topk_select` returns, in the `[batch..., T, N, *]` layout.

  Attributes:
    indices: `[batch..., T, N, k]` int32 key positions in `jax.lax.top_k`
      order, -1 in slots beyond the row's admissible keys.
    logits: `[batch..., T, N, k]` float32 logits of the kept keys (`-inf` at
      -1 slots, NaN where the logit is NaN).
    logsumexp: `[batch..., T, N]` float32 log-sum-exp of every admissible
      logit of the row (`-inf` for a row with none, NaN if one is NaN,
      else `+inf` if one is `+inf`).
    num_keys: `[batch..., T, N]` int32 number of admissible keys of the row
      (mask and causality; a `-inf` bias still counts, as in `select`).
  """

  indices: jax.Array
  logits: jax.Array
  logsumexp: jax.Array
  num_keys: jax.Array


# ----------------------------------------------------------------------------
# GPU (Triton) variant.


def _split_refs(refs, has_mask, has_bias, has_ranges):
  """`(q, k, mask or None, bias or None, the 3 range refs or (), the 4
  outputs, the scratch refs)`."""
  mask_ref = refs[2] if has_mask else None
  bias_ref = refs[2 + has_mask] if has_bias else None
  r = 2 + has_mask + has_bias
  o = r + 3 * has_ranges
  return refs[0], refs[1], mask_ref, bias_ref, refs[r:o], refs[o : o + 4], refs[o + 4 :]


def _kernel_gpu(*refs, scale, bk, nkb, num_keys, is_causal, has_mask, has_bias, ranges, window):
  q_ref, k_ref, mask_ref, bias_ref, rng, outs, _ = _split_refs(refs, has_mask, has_bias, ranges)
  bq, kp = outs[0].shape
  row0 = pl.program_id(2) * bq
  q = q_ref[...]
  lens = (rng[0][0], rng[0][1]) if ranges else None

  def side(ref, j):  # a mask/bias block; a size-1 axis broadcasts (T or S)
    if ref is None:
      return None
    x = ref[...] if ref.shape[-1] == 1 else ref[:, pl.ds(j * bk, bk)]
    return jnp.broadcast_to(x, (bq, bk))

  def body(j, state):
    col0 = j * bk
    kb = k_ref[pl.ds(col0, bk), :]
    mask = side(mask_ref, j)
    if ranges:  # the index ranges (gsparse.kernels.select_ranges)
      kvseg = rng[2][:, pl.ds(col0, bk)]
      mask = sr.tile_mask(mask, lens, rng[1][...], kvseg, row0=row0, col0=col0, window=window)
    logits, valid = block_logits(
      q,
      kb,
      mask,
      side(bias_ref, j),
      scale=scale,
      row0=row0,
      col0=col0,
      num_keys=num_keys,
      is_causal=is_causal,
    )
    return update(state, logits, valid, col0)

  if ranges:  # skip key blocks that the lengths, window and causality mask wholly
    live = functools.partial(sr.tile_needed, lens, bq=bq, bk=bk, is_causal=is_causal, window=window)
    step = body
    body = lambda j, st: run_if_live(live(row0, j * bk), functools.partial(step, j), st)
  last = jnp.minimum(nkb, lax.div(row0 + bq - 1, bk) + 1) if is_causal else nkb
  write_outputs(outs, lax.fori_loop(0, last, body, init_state(bq, kp)))


def _side_spec_gpu(x, bq, sp):
  """BlockSpec of a `[B', N', T', S']` mask/bias (size-1 axes broadcast)."""
  b1, n1, t1, s1 = (d == 1 for d in x.shape)
  shape = (None, None, 1 if t1 else bq, 1 if s1 else sp)
  return pl.BlockSpec(
    shape, lambda bb, nn, i: (0 if b1 else bb, 0 if n1 else nn, 0 if t1 else i, 0)
  )


def _forward_gpu(q, k, mask, bias, rng, *, kp, scale, is_causal, bq, bk, num_keys, interpret):
  b, n, tp, h = q.shape
  g = n // k.shape[1]
  sp = k.shape[2]
  hp = max(16, next_pow2(h))  # zero columns add nothing to q.k
  q, k = pad_axis(q, 3, hp), pad_axis(k, 3, hp)
  sides = [x for x in (mask, bias) if x is not None]
  specs = [_side_spec_gpu(x, bq, sp) for x in sides]
  ranges, window = rng
  if ranges is not None:
    sides += sr.range_inputs(ranges, tp, sp)
    specs += sr.range_specs_gpu(bq, sp)
  kernel = functools.partial(
    _kernel_gpu,
    scale=scale,
    bk=bk,
    nkb=sp // bk,
    num_keys=num_keys,
    is_causal=is_causal,
    has_mask=mask is not None,
    has_bias=bias is not None,
    ranges=ranges is not None,
    window=window,
  )
  row = lambda w: pl.BlockSpec((None, None, bq, w), lambda bb, nn, i: (bb, nn, i, 0))
  compiler_params = None
  if not interpret:
    from jax.experimental.pallas import triton as plgpu

    compiler_params = plgpu.CompilerParams(num_warps=4, num_stages=2)
  return pl.pallas_call(
    kernel,
    grid=(b, n, tp // bq),
    in_specs=[
      row(hp),
      pl.BlockSpec((None, None, sp, hp), lambda bb, nn, i: (bb, lax.div(nn, g), 0, 0)),
      *specs,
    ],
    out_specs=[row(kp), row(kp), row(1), row(1)],
    out_shape=_out_shapes(b, n, tp, kp),
    compiler_params=compiler_params,
    interpret=interpret,
    name="gsparse_topk_select_gpu",
  )(q, k, *sides)


def _out_shapes(b, n, tp, kp):
  i32, f32 = jnp.int32, jnp.float32
  return [
    jax.ShapeDtypeStruct((b, n, tp, kp), i32),
    jax.ShapeDtypeStruct((b, n, tp, kp), i32),
    jax.ShapeDtypeStruct((b, n, tp, 1), f32),
    jax.ShapeDtypeStruct((b, n, tp, 1), i32),
  ]


# ----------------------------------------------------------------------------
# TPU (Mosaic) variant.


def _kernel_tpu(*refs, scale, bk, num_keys, is_causal, has_mask, has_bias, ranges, window):
  q_ref, k_ref, mask_ref, bias_ref, rng, outs, scratch = _split_refs(
    refs, has_mask, has_bias, ranges
  )
  i, j = pl.program_id(2), pl.program_id(3)
  bq, kp = outs[0].shape
  row0, col0 = i * bq, j * bk

  @pl.when(j == 0)
  def _init():
    for ref, val in zip(scratch, init_state(bq, kp), strict=True):
      ref[...] = val

  def side(ref):
    return None if ref is None else jnp.broadcast_to(ref[...], (bq, bk))

  needed = (col0 <= row0 + bq - 1) if is_causal else (j >= 0)
  if ranges:  # the index ranges (gsparse.kernels.select_ranges), lengths in SMEM
    lens = (rng[0][pl.program_id(0), 0], rng[0][pl.program_id(0), 1])
    live = sr.tile_needed(lens, row0, col0, bq=bq, bk=bk, is_causal=is_causal, window=window)
    needed = needed & live

  @pl.when(needed)
  def _step():
    mask = side(mask_ref)
    if ranges:
      mask = sr.tile_mask(mask, lens, rng[1][...], rng[2][...], row0=row0, col0=col0, window=window)
    logits, valid = block_logits(
      q_ref[...],
      k_ref[...],
      mask,
      side(bias_ref),
      scale=scale,
      row0=row0,
      col0=col0,
      num_keys=num_keys,
      is_causal=is_causal,
    )
    state = update(tuple(r[...] for r in scratch), logits, valid, col0)
    for ref, val in zip(scratch, state, strict=True):
      ref[...] = val

  @pl.when(j == pl.num_programs(3) - 1)
  def _done():
    write_outputs(outs, tuple(r[...] for r in scratch))


def _side_spec_tpu(x, bq, bk, kblock):
  """BlockSpec of a `[B', N', T', S']` mask/bias (size-1 axes broadcast); key
  block `kblock(i, j)`, the one the step fetches."""
  b1, n1, t1, s1 = (d == 1 for d in x.shape)
  return pl.BlockSpec(
    (None, None, 1 if t1 else bq, 1 if s1 else bk),
    lambda bb, nn, i, j: (
      0 if b1 else bb,
      0 if n1 else nn,
      0 if t1 else i,
      0 if s1 else kblock(i, j),
    ),
  )


def _forward_tpu(q, k, mask, bias, rng, *, kp, scale, is_causal, bq, bk, num_keys, interpret):
  from jax.experimental.pallas import tpu as pltpu

  b, n, tp, h = q.shape
  g = n // k.shape[1]
  sp = k.shape[2]

  def kblock(i, j):  # causal: blocks past the diagonal re-use the last one read
    return jnp.minimum(j, lax.div(i * bq + bq - 1, bk)) if is_causal else j

  sides = [x for x in (mask, bias) if x is not None]
  specs = [_side_spec_tpu(x, bq, bk, kblock) for x in sides]
  ranges, window = rng
  if ranges is not None:
    sides += sr.range_inputs(ranges, tp, sp)
    specs += sr.range_specs_tpu(bq, bk, kblock)
  kernel = functools.partial(
    _kernel_tpu,
    scale=scale,
    bk=bk,
    num_keys=num_keys,
    is_causal=is_causal,
    has_mask=mask is not None,
    has_bias=bias is not None,
    ranges=ranges is not None,
    window=window,
  )
  row = lambda w: pl.BlockSpec((None, None, bq, w), lambda bb, nn, i, j: (bb, nn, i, 0))
  f32, i32 = jnp.float32, jnp.int32
  return pl.pallas_call(
    kernel,
    grid=(b, n, tp // bq, sp // bk),
    in_specs=[
      row(h),
      pl.BlockSpec((None, None, bk, h), lambda bb, nn, i, j: (bb, lax.div(nn, g), kblock(i, j), 0)),
      *specs,
    ],
    out_specs=[row(kp), row(kp), row(1), row(1)],
    out_shape=_out_shapes(b, n, tp, kp),
    scratch_shapes=[
      pltpu.VMEM((bq, 1), f32),
      pltpu.VMEM((bq, 1), f32),
      pltpu.VMEM((bq, 1), i32),
      pltpu.VMEM((bq, kp), i32),
      pltpu.VMEM((bq, kp), i32),
    ],
    compiler_params=pltpu.CompilerParams(
      dimension_semantics=("parallel", "parallel", "parallel", "arbitrary")
    ),
    interpret=pltpu.InterpretParams() if interpret else False,
    name="gsparse_topk_select_tpu",
  )(q, k, *sides)


# ----------------------------------------------------------------------------
# Public entry point.


@functools.partial(
  jax.jit,
  static_argnames=(
    "k", "scale", "is_causal", "block_q", "block_k", "variant", "interpret", "local_window_size"
  ),
)  # fmt: skip
def fused_topk_select(
  query: ArrayLike,
  key: ArrayLike,
  *,
  k: int,
  scale: float,
  is_causal: bool = False,
  mask: ArrayLike | None = None,
  bias: ArrayLike | None = None,
  block_q: int | None = None,
  block_k: int | None = None,
  variant: str | None = None,
  interpret: bool | None = None,
  query_seq_lengths: ArrayLike | None = None,
  key_value_seq_lengths: ArrayLike | None = None,
  segment_ids: tuple[ArrayLike, ArrayLike] | None = None,
  local_window_size: tuple[int, int] | None = None,
) -> FusedSelection:
  """Exact top-k keys per query, fused: the `[T, S]` logits never reach memory.

  The indices are those of `jax.lax.top_k` on the row of logits
  `scale * q.k + bias` with inadmissible keys at `-inf` (`selection="full"`):
  descending, ties to the lower key index, NaN first, -1 beyond the row's
  admissible keys (a fully masked row is all -1). See the module docstring
  for the algorithm and its limits.

  Args:
    query: `[batch..., T, N, H]` float32, bfloat16 or float16.
    key: `[batch..., S, K, H]`, `N` a multiple of `K` (grouped-query heads).
    k: keys kept per query; `k > S` pads with -1.
    scale: logit scale (a static Python float).
    is_causal: mask key `j > ` query `i` (top-left aligned).
    mask: None or bool broadcastable to `[batch..., N, T, S]`, True = admissible.
    bias: None or float broadcastable to `[batch..., N, T, S]`, added to the
      logits; `-inf` removes a key from the top-k (it still counts in
      `num_keys`, as in `gsparse.selection.select`).
    block_q: queries per program (power of two; default 32 on "gpu", 128 on
      "tpu"; Triton's dot wants >= 16, Mosaic a multiple of 8).
    block_k: keys per step (power of two; default 64 on "gpu", 128 on "tpu";
      on "tpu" a multiple of 128 unless the keys fit in one block).
    variant: "gpu" (Triton) or "tpu" (Mosaic); default from the backend
      ("gpu" on CPU, in interpret mode).
    interpret: run in the Pallas (or TPU) interpreter; default True on CPU.
    query_seq_lengths: None or `batch`-shaped int: query `t` is admissible
      only if `t < length` (a row past it has no keys).
    key_value_seq_lengths: None or `batch`-shaped int: key `j < length` only.
    segment_ids: None or a pair `(q [batch..., T], kv [batch..., S])` of
      int ids: a query admits keys of its own segment only.
    local_window_size: None or a static `(left, right)`: `t - left <= j <=
      t + right`. These four are index ranges evaluated per tile in the
      kernel (`gsparse.kernels.select_ranges`), the rule of the block
      kernels; length values are not checked here (`topk_attention` checks).

  Returns:
    A `FusedSelection` (indices, kept logits, row log-sum-exp, key count).

  Not differentiable: the outputs are constants to autodiff (a gradient
  through them is zero), like the indices of `jax.lax.top_k`. A caller that
  needs the gradient of the kept logits recomputes them from the indices
  (O(T k H)), as the sparse gathers do.
  """
  query, key = jnp.asarray(query), jnp.asarray(key)
  mask = None if mask is None else jnp.asarray(mask)
  bias = None if bias is None else jnp.asarray(bias)
  backend = jax.default_backend()
  if variant is None:
    variant = "tpu" if backend == "tpu" else "gpu"
  if interpret is None:
    interpret = backend not in ("gpu", "cuda", "rocm", "tpu")
  check_inputs(query, key, mask, bias, k, scale, is_causal, variant, block_q, block_k)
  *batch, t, n, h = query.shape
  batch, s, kh = tuple(batch), key.shape[-3], key.shape[-2]
  rng = sr.flat_ranges(
    query_seq_lengths, key_value_seq_lengths, segment_ids, local_window_size,
    batch=batch, t=t, s=s,
  )  # fmt: skip
  # No gradient (see the docstring): the kernel sees constants.
  query, key = lax.stop_gradient(query), lax.stop_gradient(key)
  bias = None if bias is None else lax.stop_gradient(bias)
  nb = math.prod(batch)
  ke = min(k, s)
  bq, bk = _blocks(variant, t, s, block_q, block_k)
  tp, sp = round_up(t, bq), round_up(s, bk)
  cd = jnp.promote_types(query.dtype, key.dtype)
  q = pad_axis(jnp.moveaxis(query.reshape(nb, t, n, h), 1, 2), 2, tp).astype(cd)
  kt = pad_axis(jnp.moveaxis(key.reshape(nb, s, kh, h), 1, 2), 2, sp).astype(cd)
  m = side_input(mask, batch, n, t, tp, sp, 0, jnp.int32)
  bi = side_input(bias, batch, n, t, tp, sp, 0, jnp.float32)
  fwd = _forward_gpu if variant == "gpu" else _forward_tpu
  oi, ok, lse, num = fwd(
    q, kt, m, bi, rng, kp=next_pow2(ke), scale=float(scale), is_causal=is_causal, bq=bq, bk=bk,
    num_keys=s, interpret=bool(interpret),
  )  # fmt: skip

  def back(x, width):  # [B, N, Tp, w] -> [*batch, T, N, width]
    x = jnp.moveaxis(x[:, :, :t, :width], 1, 2)
    return x.reshape(*batch, t, n, width)

  pad = [(0, 0)] * (len(batch) + 2) + [(0, k - ke)]  # k > S: -1 slots
  idx = jnp.pad(back(oi, ke), pad, constant_values=-1)
  logits = jnp.pad(float_from_sortable(back(ok, ke)), pad, constant_values=-jnp.inf)
  return FusedSelection(idx, logits, back(lse, 1)[..., 0], back(num, 1)[..., 0])


def _blocks(variant, t, s, block_q, block_k):
  """Tile sizes: the caller's, or defaults no larger than the padded input."""
  if variant == "gpu":  # Triton's dot: powers of two >= 16
    bq = block_q or max(16, min(32, next_pow2(t)))
    return bq, block_k or max(16, min(64, next_pow2(s)))
  bq = block_q or max(8, min(128, next_pow2(t)))
  bk = block_k or 128
  if s <= bk:
    bk = round_up(s, 8)  # one block, equal to the full (padded) key axis
  return bq, bk


def fused_topk_select_reference(
  query: ArrayLike,
  key: ArrayLike,
  *,
  k: int,
  scale: float,
  is_causal: bool = False,
  mask: ArrayLike | None = None,
  bias: ArrayLike | None = None,
) -> FusedSelection:
  """Pure-jnp reference of `fused_topk_select`: the dense logits and `lax.top_k`.

  Materialises the `[batch..., N, T, S]` logits; for tests and small inputs.
  """
  query, key = jnp.asarray(query), jnp.asarray(key)
  *batch, t, n, h = query.shape
  s, kh = key.shape[-3], key.shape[-2]
  g = n // kh
  kr = jnp.repeat(key, g, axis=-2)
  logits = jnp.einsum(
    "...tnh,...snh->...nts",
    query.astype(jnp.float32),
    kr.astype(jnp.float32),
    precision=DOT_PRECISION,
  )
  logits = logits * scale
  if bias is not None:
    logits = logits + jnp.asarray(bias, jnp.float32)
  valid = jnp.ones(logits.shape, bool)
  if mask is not None:
    valid = valid & jnp.asarray(mask)
  if is_causal:
    valid = valid & (jnp.arange(s)[None, :] <= jnp.arange(t)[:, None])
  x = positive_nan(jnp.where(valid, logits, -jnp.inf))
  ke = min(k, s)
  vals, idx = lax.top_k(x, ke)
  idx = jnp.where(vals == -jnp.inf, -1, idx)
  vals = jnp.where(idx < 0, -jnp.inf, vals)
  pad = [(0, 0)] * (idx.ndim - 1) + [(0, k - ke)]
  idx = jnp.pad(idx, pad, constant_values=-1)
  vals = jnp.pad(vals, pad, constant_values=-jnp.inf)
  lse = jax.nn.logsumexp(x, axis=-1)
  num = jnp.sum(valid, axis=-1, dtype=jnp.int32)
  mv = lambda a: jnp.moveaxis(a, -3, -2)  # [..., N, T, *] -> [..., T, N, *]
  return FusedSelection(mv(idx), mv(vals), jnp.moveaxis(lse, -2, -1), jnp.moveaxis(num, -2, -1))
