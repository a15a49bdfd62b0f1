"""A fused exact top-k selection in Pallas that never writes the logits.

`fused_topk_select` returns, for every query and head, the `k` keys with the
largest logits `scale * q.k + bias` (masked keys excluded): the same indices,
in the same order, as `jax.lax.top_k` on the masked `[T, S]` logit row
(`selection="full"`), with every NaN ranking first and ties going to the lower
key index, and `-1` in the slots beyond the row's admissible keys. It also
returns the kept logits, the log-sum-exp of the whole admissible row and the
number of admissible keys, so a caller gets the exact tail mass of what it
kept, `1 - exp(logsumexp(kept) - logsumexp_all)`.

How: one program handles `block_q` queries of one head and walks over the keys
in blocks of `block_k`. Each block's logits exist on chip only. The program
keeps, per row,

* a flash-style running max and sum of `exp` (the log-sum-exp of the row),
* a running top-k: an unsorted list of `kp = next_pow2(k)` (int32 sortable
  key, index) pairs, initialised with sentinels below every admissible key.

A block is merged into the list by repeated replacement: while some row's
best remaining block entry beats the worst list entry, that entry replaces
it. Ordering uses the int32 keys of `gsparse._numerics.sortable_int32`
(NaN first, then +inf ... -inf), and because every block entry has a larger
index than every list entry, "beats" is a strict `>` on the keys: ties stay
with the earlier, lower index, as `jax.lax.top_k` keeps them. Each
replacement costs a few reductions over `kp + block_k` lanes; a block whose
maximum does not beat any row's worst entry costs two reductions. At the end
the list is sorted by `kp` max extractions. Only compares, `where` and
max/min/sum reductions over the lane axis are used (no sort, no gather, no
scatter), which both the Triton and the Mosaic lowerings accept.

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

Costs and limits: the list merge is `O(kp + block_k)` vector work per
replacement, and a row sees at most `min(kp, block_k)` replacements per block
(all of them only while its list fills or on adversarial, increasing logits);
on random logits replacements get rare after the first blocks (a key enters
only if it beats the running k-th best). The state is `2 * block_q * kp`
int32 per program, so large `k` (hundreds) wants a small `block_q` on the
GPU (registers) and fits in VMEM on the TPU. The logits are float32 `q.k`
(HIGHEST precision: no TF32), then `* scale`, then `+ bias`, as the XLA
selections compute them; indices agree with `"full"` whenever both matmuls
round the logits alike (always for logits that are exact in float32, e.g.
the small-integer inputs of the tests).
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

from gsparse._numerics import float_from_sortable, positive_nan, sortable_int32

__all__ = ["FusedSelection", "fused_topk_select", "fused_topk_select_reference"]

VARIANTS = ("gpu", "tpu")
_I32_MIN = -(2**31)  # below every sortable key: an entry taken out of play
_I32_MAX = 2**31 - 1
_NEG_KEY = int(jnp.asarray(sortable_int32(jnp.float32(-jnp.inf))))  # key of -inf
_DOT_PRECISION = lax.Precision.HIGHEST


class FusedSelection(NamedTuple):
  """What `fused_topk_select` returns, in the `[batch..., T, N, *]` layout.

  Attributes:
    indices: `[batch..., T, N, k]` int32 key positions in `jax.lax.top_k`
      order, -1 in slots beyond the row's admissible keys.
    logits: `[batch..., T, N, k]` float32 logits of the kept keys (`-inf` at
      -1 slots, NaN where the logit is NaN).
    logsumexp: `[batch..., T, N]` float32 log-sum-exp of every admissible
      logit of the row (`-inf` for a row with none, NaN if one is NaN).
    num_keys: `[batch..., T, N]` int32 number of admissible keys of the row
      (mask and causality; a `-inf` bias still counts, as in `select`).
  """

  indices: jax.Array
  logits: jax.Array
  logsumexp: jax.Array
  num_keys: jax.Array


def _next_pow2(x: int) -> int:
  return 1 << max(0, (int(x) - 1).bit_length())


def _round_up(x: int, m: int) -> int:
  return -(-x // m) * m


def _pad(x: jax.Array, axis: int, size: int, value=0) -> jax.Array:
  if x.shape[axis] >= size:
    return x
  widths = [(0, 0)] * x.ndim
  widths[axis] = (0, size - x.shape[axis])
  return jnp.pad(x, widths, constant_values=value)


# ----------------------------------------------------------------------------
# The per-block update, shared by both variants. Every array is 2-D: [bq, *].


def _init_state(bq: int, kp: int):
  """Running (max, sum, count, list keys, list indices) of `bq` rows."""
  col = lax.broadcasted_iota(jnp.int32, (bq, kp), 1)
  return (
    jnp.full((bq, 1), -jnp.inf, jnp.float32),
    jnp.zeros((bq, 1), jnp.float32),
    jnp.zeros((bq, 1), jnp.int32),
    jnp.full((bq, kp), _NEG_KEY, jnp.int32),
    -1 - col,  # distinct negative sentinel indices: the worst entry is unique
  )


def _merge_block(lk, li, bkeys, bidx):
  """Replaces list entries by better block entries until none is better.

  `lk`/`li` `[bq, kp]` list keys and indices; `bkeys`/`bidx` `[bq, bk]` the
  block's keys and key positions (all larger than any list index).
  """

  def worst_and_best(lk, bkeys):
    lmin = jnp.min(lk, axis=1, keepdims=True)
    bmax = jnp.max(bkeys, axis=1, keepdims=True)
    return lmin, bmax, jnp.max((bmax > lmin).astype(jnp.int32))

  def body(st):
    lk, li, bkeys, lmin, bmax, _ = st
    go = bmax > lmin  # [bq, 1]: rows whose best block entry enters
    pick = jnp.min(jnp.where(bkeys == bmax, bidx, _I32_MAX), axis=1, keepdims=True)
    # The worst list entry: lowest key, then highest index (unique).
    worst = jnp.max(jnp.where(lk == lmin, li, _I32_MIN), axis=1, keepdims=True)
    hit = go & (lk == lmin) & (li == worst)
    lk = jnp.where(hit, bmax, lk)
    li = jnp.where(hit, pick, li)
    bkeys = jnp.where(go & (bidx == pick), _I32_MIN, bkeys)
    return (lk, li, bkeys, *worst_and_best(lk, bkeys))

  st = (lk, li, bkeys, *worst_and_best(lk, bkeys))
  lk, li, *_ = lax.while_loop(lambda st: st[-1] > 0, body, st)
  return lk, li


def _update(state, logits, valid, col0):
  """Folds one key block (`logits`, `valid` `[bq, bk]`, first key `col0`) in."""
  m, denom, num, lk, li = state
  x = jnp.where(valid, logits, -jnp.inf)
  m_new = jnp.maximum(m, jnp.max(x, axis=1, keepdims=True))
  # +-inf maxima shift by 0: a +inf logit then gives l = inf (lse = +inf).
  m_safe = jnp.where(jnp.abs(m_new) == jnp.inf, 0.0, m_new)
  denom = denom * jnp.exp(m - m_safe) + jnp.sum(jnp.exp(x - m_safe), axis=1, keepdims=True)
  num = num + jnp.sum(valid.astype(jnp.int32), axis=1, keepdims=True)
  bidx = col0 + lax.broadcasted_iota(jnp.int32, x.shape, 1)
  lk, li = _merge_block(lk, li, sortable_int32(x), bidx)
  return m_new, denom, num, lk, li


def _finish(state):
  """`(indices, keys, lse, num)`: the list sorted as `jax.lax.top_k` orders it."""
  m, denom, num, lk, li = state
  bq, kp = lk.shape
  col = lax.broadcasted_iota(jnp.int32, (bq, kp), 1)

  def extract(j, st):
    lk, ok, oi = st
    best = jnp.max(lk, axis=1, keepdims=True)
    pick = jnp.min(jnp.where(lk == best, li, _I32_MAX), axis=1, keepdims=True)
    ok = jnp.where(col == j, best, ok)
    oi = jnp.where(col == j, pick, oi)
    return jnp.where((lk == best) & (li == pick), _I32_MIN, lk), ok, oi

  zeros = jnp.zeros((bq, kp), jnp.int32)
  _, ok, oi = lax.fori_loop(0, kp, extract, (lk, zeros, zeros))
  oi = jnp.where(ok == _NEG_KEY, -1, oi)  # sentinels: no admissible key left
  m_safe = jnp.where(jnp.abs(m) == jnp.inf, 0.0, m)
  ok_l = denom != 0
  lse = jnp.where(ok_l, m_safe + jnp.log(jnp.where(ok_l, denom, 1.0)), -jnp.inf)
  return oi, ok, lse, num


def _block_logits(q, kb, mask, bias, *, scale, row0, col0, num_keys, is_causal):
  """Logits `[bq, bk]` of one block and their admissibility."""
  s = lax.dot_general(
    q,
    kb,
    (((1,), (1,)), ((), ())),
    precision=_DOT_PRECISION,
    preferred_element_type=jnp.float32,
  )
  s = s * scale
  if bias is not None:
    s = s + bias.astype(jnp.float32)
  col = col0 + lax.broadcasted_iota(jnp.int32, s.shape, 1)
  valid = col < num_keys
  if mask is not None:
    valid = valid & (mask != 0)
  if is_causal:
    valid = valid & (col <= row0 + lax.broadcasted_iota(jnp.int32, s.shape, 0))
  return s, valid


def _write(refs, state):
  idx_ref, key_ref, lse_ref, num_ref = refs
  oi, ok, lse, num = _finish(state)
  idx_ref[...] = oi
  key_ref[...] = ok
  lse_ref[...] = lse
  num_ref[...] = num


# ----------------------------------------------------------------------------
# GPU (Triton) variant.


def _kernel_gpu(*refs, scale, bk, nkb, num_keys, is_causal, has_mask, has_bias, mask_bc):
  q_ref, k_ref = refs[:2]
  mask_ref = refs[2] if has_mask else None
  bias_ref = refs[2 + has_mask] if has_bias else None
  outs = refs[2 + has_mask + has_bias :]
  bq, kp = outs[0].shape
  row0 = pl.program_id(2) * bq
  q = q_ref[...]

  def side(ref, bc, j):  # a mask/bias block, broadcast along T or S
    if ref is None:
      return None
    x = ref[...] if bc[1] else ref[:, pl.ds(j * bk, bk)]
    return jnp.broadcast_to(x, (bq, bk))

  def body(j, state):
    col0 = j * bk
    kb = k_ref[pl.ds(col0, bk), :]
    logits, valid = _block_logits(
      q,
      kb,
      side(mask_ref, mask_bc[0], j),
      side(bias_ref, mask_bc[1], j),
      scale=scale,
      row0=row0,
      col0=col0,
      num_keys=num_keys,
      is_causal=is_causal,
    )
    return _update(state, logits, valid, col0)

  last = jnp.minimum(nkb, lax.div(row0 + bq - 1, bk) + 1) if is_causal else nkb
  _write(outs, lax.fori_loop(0, last, body, _init_state(bq, kp)))


def _side_spec_gpu(x, bq, sp):
  """BlockSpec of a `[B', N', T', S']` mask/bias (size-1 axes broadcast)."""
  b1, n1, t1, s1 = (d == 1 for d in x.shape)
  shape = (None, None, 1 if t1 else bq, 1 if s1 else sp)
  return pl.BlockSpec(
    shape, lambda bb, nn, i: (0 if b1 else bb, 0 if n1 else nn, 0 if t1 else i, 0)
  ), (t1, s1)


def _forward_gpu(q, k, mask, bias, *, kp, scale, is_causal, bq, bk, num_keys, interpret):
  b, n, tp, h = q.shape
  g = n // k.shape[1]
  sp = k.shape[2]
  hp = max(16, _next_pow2(h))  # zero columns add nothing to q.k
  q, k = _pad(q, 3, hp), _pad(k, 3, hp)
  sides = [x for x in (mask, bias) if x is not None]
  specs = [_side_spec_gpu(x, bq, sp) for x in sides]
  bcs = [sp_[1] for sp_ in specs]
  mask_bc = (bcs[0] if mask is not None else None, bcs[-1] if bias is not None else None)
  kernel = functools.partial(
    _kernel_gpu,
    scale=scale,
    bk=bk,
    nkb=sp // bk,
    num_keys=num_keys,
    is_causal=is_causal,
    has_mask=mask is not None,
    has_bias=bias is not None,
    mask_bc=mask_bc,
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
      *[s[0] for s in specs],
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


def _kernel_tpu(*refs, scale, bk, num_keys, is_causal, has_mask, has_bias):
  q_ref, k_ref = refs[:2]
  mask_ref = refs[2] if has_mask else None
  bias_ref = refs[2 + has_mask] if has_bias else None
  outs = refs[2 + has_mask + has_bias : 6 + has_mask + has_bias]
  scratch = refs[6 + has_mask + has_bias :]
  i, j = pl.program_id(2), pl.program_id(3)
  bq, kp = outs[0].shape
  row0, col0 = i * bq, j * bk

  @pl.when(j == 0)
  def _init():
    for ref, val in zip(scratch, _init_state(bq, kp), strict=True):
      ref[...] = val

  def side(ref):
    return None if ref is None else jnp.broadcast_to(ref[...], (bq, bk))

  needed = (col0 <= row0 + bq - 1) if is_causal else (j >= 0)

  @pl.when(needed)
  def _step():
    logits, valid = _block_logits(
      q_ref[...],
      k_ref[...],
      side(mask_ref),
      side(bias_ref),
      scale=scale,
      row0=row0,
      col0=col0,
      num_keys=num_keys,
      is_causal=is_causal,
    )
    state = _update(tuple(r[...] for r in scratch), logits, valid, col0)
    for ref, val in zip(scratch, state, strict=True):
      ref[...] = val

  @pl.when(j == pl.num_programs(3) - 1)
  def _done():
    _write(outs, tuple(r[...] for r in scratch))


def _forward_tpu(q, k, mask, bias, *, kp, scale, is_causal, bq, bk, num_keys, interpret):
  from jax.experimental.pallas import tpu as pltpu

  b, n, tp, h = q.shape
  g = n // k.shape[1]
  sp = k.shape[2]

  def kblock(i, j):  # causal: blocks past the diagonal re-use the last one read
    return jnp.minimum(j, lax.div(i * bq + bq - 1, bk)) if is_causal else j

  sides = [x for x in (mask, bias) if x is not None]
  specs = []
  for x in sides:
    b1, n1, t1, s1 = (d == 1 for d in x.shape)
    specs.append(
      pl.BlockSpec(
        (None, None, 1 if t1 else bq, 1 if s1 else bk),
        lambda bb, nn, i, j, b1=b1, n1=n1, t1=t1, s1=s1: (
          0 if b1 else bb,
          0 if n1 else nn,
          0 if t1 else i,
          0 if s1 else kblock(i, j),
        ),
      )
    )
  kernel = functools.partial(
    _kernel_tpu,
    scale=scale,
    bk=bk,
    num_keys=num_keys,
    is_causal=is_causal,
    has_mask=mask is not None,
    has_bias=bias is not None,
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


def _check(query, key, mask, bias, k, scale, is_causal, variant, block_q, block_k):
  if query.ndim < 3 or key.ndim != query.ndim:
    raise ValueError(
      f"query {query.shape} and key {key.shape} must be [batch..., T, N, H] and "
      "[batch..., S, K, H] with the same number of dimensions (>= 3)"
    )
  if query.shape[:-3] != key.shape[:-3] or query.shape[-1] != key.shape[-1]:
    raise ValueError(f"query {query.shape} and key {key.shape} differ in batch or head dim")
  n, kh = query.shape[-2], key.shape[-2]
  if n % kh:
    raise ValueError(f"query heads N={n} must be a multiple of key heads K={kh}")
  for name, x in (("query", query), ("key", key)):
    if x.dtype not in (jnp.float32, jnp.bfloat16, jnp.float16):
      raise TypeError(f"{name}.dtype={x.dtype} must be float32, bfloat16 or float16")
  if isinstance(k, bool) or not isinstance(k, int) or k < 1:
    raise ValueError(f"k={k!r} must be a positive int")
  if isinstance(scale, bool) or not isinstance(scale, (int, float)) or not math.isfinite(scale):
    raise ValueError(f"scale={scale!r} must be a finite Python float (static)")
  if not isinstance(is_causal, bool):
    raise ValueError(f"is_causal={is_causal!r} must be a bool")
  if variant not in VARIANTS:
    raise ValueError(f"variant={variant!r} must be one of {VARIANTS}")
  for name, v in (("block_q", block_q), ("block_k", block_k)):
    if v is not None and (isinstance(v, bool) or not isinstance(v, int) or v < 1 or v & (v - 1)):
      raise ValueError(f"{name}={v!r} must be a power of two")
  full = (*query.shape[:-3], n, query.shape[-3], key.shape[-3])
  for name, x in (("mask", mask), ("bias", bias)):
    if x is None:
      continue
    if name == "mask" and x.dtype != jnp.bool_:
      raise TypeError(f"mask.dtype={x.dtype} must be bool")
    if name == "bias" and not jnp.issubdtype(x.dtype, jnp.floating):
      raise TypeError(f"bias.dtype={x.dtype} must be floating")
    try:
      jnp.broadcast_shapes(x.shape, full)
    except ValueError:
      raise ValueError(f"{name} {x.shape} must broadcast to [batch..., N, T, S] = {full}") from None
    if x.ndim > len(full):
      raise ValueError(f"{name} {x.shape} has more dims than [batch..., N, T, S] = {full}")


def _side(x, batch, n, t, tp, sp, fill, dtype):
  """mask/bias broadcastable to `[*batch, N, T, S]` -> `[B', N', T', S']`, padded.

  Axes of size 1 stay 1 (the kernels broadcast them), so a `[S]` padding mask
  or a `[T, S]` bias is never copied per batch and head.
  """
  if x is None:
    return None
  full = (*batch, n, t, x.shape[-1])
  x = x.reshape((1,) * (len(full) - x.ndim) + x.shape)
  lead = x.shape[: len(batch)]
  nb = 1 if all(d == 1 for d in lead) else math.prod(batch)
  x = jnp.broadcast_to(x, (*(batch if nb > 1 else lead), *x.shape[len(batch) :]))
  x = x.reshape(nb, *x.shape[len(batch) :]).astype(dtype)
  if x.shape[2] > 1:
    x = _pad(x, 2, tp, fill)
  if x.shape[3] > 1:
    x = _pad(x, 3, sp, fill)
  return x


@functools.partial(
  jax.jit,
  static_argnames=("k", "scale", "is_causal", "block_q", "block_k", "variant", "interpret"),
)
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
  _check(query, key, mask, bias, k, scale, is_causal, variant, block_q, block_k)
  # No gradient (see the docstring): the kernel sees constants.
  query, key = lax.stop_gradient(query), lax.stop_gradient(key)
  bias = None if bias is None else lax.stop_gradient(bias)
  *batch, t, n, h = query.shape
  batch, s, kh = tuple(batch), key.shape[-3], key.shape[-2]
  nb = math.prod(batch)
  ke = min(k, s)
  bq, bk = _blocks(variant, t, s, block_q, block_k)
  tp, sp = _round_up(t, bq), _round_up(s, bk)
  cd = jnp.promote_types(query.dtype, key.dtype)
  q = _pad(jnp.moveaxis(query.reshape(nb, t, n, h), 1, 2), 2, tp).astype(cd)
  kt = _pad(jnp.moveaxis(key.reshape(nb, s, kh, h), 1, 2), 2, sp).astype(cd)
  m = _side(mask, batch, n, t, tp, sp, 0, jnp.int32)
  bi = _side(bias, batch, n, t, tp, sp, 0, jnp.float32)
  fwd = _forward_gpu if variant == "gpu" else _forward_tpu
  oi, ok, lse, num = fwd(
    q, kt, m, bi, kp=_next_pow2(ke), scale=float(scale), is_causal=is_causal, bq=bq, bk=bk,
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
    bq = block_q or max(16, min(32, _next_pow2(t)))
    return bq, block_k or max(16, min(64, _next_pow2(s)))
  bq = block_q or max(8, min(128, _next_pow2(t)))
  bk = block_k or 128
  if s <= bk:
    bk = _round_up(s, 8)  # one block, equal to the full (padded) key axis
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
    precision=_DOT_PRECISION,
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
