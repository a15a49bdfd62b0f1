"""Index-range masks in the fused top-k selection (`gsparse.kernels.select`).

The `jax.nn` arguments (`query_seq_lengths`, `key_value_seq_lengths`,
`segment_ids`, a static `local_window_size`) reach the Triton and Mosaic
selection kernels as three small side inputs, never as a `[T, S]` array:
`[B, 2]` lengths (all of them in SMEM on the TPU), `[B, Tp, 1]` query
segment ids (a `[block_q, 1]` tile per program) and `[B, 1, Sp]` key segment
ids (the program's keys on the GPU, one `[1, block_k]` tile per step on the
TPU). Each tile's admissibility is `_common.range_mask`, the rule of the
block kernels and of `gsparse._admissible.admits`; a key block that the
lengths, the window and causality mask wholly is skipped
(`block_skip.tile_live`: no matmul, no merge; exact, its step would change
nothing). Segment ids are masked per element only.
"""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl

from gsparse._layout import pad_axis
from gsparse.kernels._common import Ranges, kernel_ranges, range_mask
from gsparse.kernels.block_skip import tile_live

__all__ = [
  "flat_ranges",
  "range_inputs",
  "range_specs_gpu",
  "range_specs_tpu",
  "tile_mask",
  "tile_needed",
]


def flat_ranges(q_len, kv_len, segment_ids, window, *, batch: tuple[int, ...], t: int, s: int):
  """`(Ranges or None, window)` of `fused_topk_select`'s batch-shaped arguments.

  Lengths are `batch`-shaped and segment ids `(*batch, T)` and `(*batch, S)`
  (a pair, or any `SegmentIds`-like `(q, kv)`); the batch is flattened to
  `B = prod(batch)` and `_common.kernel_ranges` checks dtypes and the window.

  Raises:
    ValueError: naming the argument, for a wrong shape, dtype or window.
  """
  nb = math.prod(batch)
  q_seg = kv_seg = None
  if segment_ids is not None:
    try:
      q_seg, kv_seg = segment_ids
    except (TypeError, ValueError):
      raise ValueError("segment_ids must be a pair (q, kv) of integer arrays") from None
  args = (
    ("query_seq_lengths", q_len, batch),
    ("key_value_seq_lengths", kv_len, batch),
    ("segment_ids (q)", q_seg, (*batch, t)),
    ("segment_ids (kv)", kv_seg, (*batch, s)),
  )
  flat = []
  for name, x, shape in args:
    if x is not None:
      x = jnp.asarray(x)
      if x.shape != shape:
        raise ValueError(f"{name} must have shape {shape} (the batch axes), got {x.shape}")
      x = x.reshape(nb, *shape[len(batch) :])
    flat.append(x)
  segments = None if q_seg is None else (flat[2], flat[3])
  return kernel_ranges(flat[0], flat[1], segments, window, batch=nb, t=t, s=s)


def range_inputs(ranges: Ranges, tp: int, sp: int) -> list[jax.Array]:
  """The kernel inputs: `[B, 2]` lengths, `[B, Tp, 1]` query ids and `[B, 1, Sp]`
  key ids (padded: padded rows and keys are masked by the lengths or the
  kernel's key count)."""
  q_seg, kv_seg = pad_axis(ranges.q_seg, 1, tp), pad_axis(ranges.kv_seg, 1, sp)
  return [ranges.lengths, q_seg[:, :, None], kv_seg[:, None]]


def range_specs_gpu(bq: int, sp: int) -> list[pl.BlockSpec]:
  """BlockSpecs on the grid `(batch, head, query block)`: the batch element's
  lengths, the program's query ids and all key ids (sliced per key block)."""
  return [
    pl.BlockSpec((None, 2), lambda bb, nn, i: (bb, 0)),
    pl.BlockSpec((None, bq, 1), lambda bb, nn, i: (bb, i, 0)),
    pl.BlockSpec((None, 1, sp), lambda bb, nn, i: (bb, 0, 0)),
  ]


def range_specs_tpu(bq: int, bk: int, kblock) -> list[pl.BlockSpec]:
  """BlockSpecs on the grid `(batch, head, query block, key block)`: all
  `[B, 2]` lengths in SMEM (2-D: under vmap the block stays the whole
  trailing `[B, 2]`, which Mosaic accepts), the program's query ids and the
  step's key ids (block `kblock(i, j)`, the key block the step fetches)."""
  from jax.experimental.pallas import tpu as pltpu

  return [
    pl.BlockSpec(memory_space=pltpu.SMEM),
    pl.BlockSpec((None, bq, 1), lambda bb, nn, i, j: (bb, i, 0)),
    pl.BlockSpec((None, 1, bk), lambda bb, nn, i, j: (bb, 0, kblock(i, j))),
  ]


def tile_mask(mask, lens, qseg, kvseg, *, row0, col0, window):
  """`mask` (int32 `[bq, bk]` or None) and the tile's `range_mask`, as int32.

  Args:
    mask: the tile of the caller's mask, or None.
    lens: `(q_len, kv_len)` scalars of the batch element.
    qseg: `[bq, 1]` query segment ids of the tile.
    kvseg: `[1, bk]` key segment ids of the tile.
    row0: first query position of the tile.
    col0: first key position of the tile.
    window: static `(left, right)` or None.
  """
  shape = (qseg.shape[0], kvseg.shape[1])
  qpos = row0 + lax.broadcasted_iota(jnp.int32, shape, 0)
  kpos = col0 + lax.broadcasted_iota(jnp.int32, shape, 1)
  ok = range_mask(qpos, kpos, *lens, qseg, kvseg, window)
  return ok.astype(jnp.int32) if mask is None else jnp.where(ok, mask, 0)


def tile_needed(lens, row0, col0, *, bq: int, bk: int, is_causal: bool, window):
  """Whether the tile may admit a key (`block_skip.tile_live`; False: skip it)."""
  return tile_live(row0, col0, lens, block_q=bq, block_k=bk, is_causal=is_causal, window=window)
