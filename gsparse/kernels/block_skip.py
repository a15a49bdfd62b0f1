"""Block skipping in the block-level Pallas kernels: which tiles cannot admit a key.

A listed `[block_q, block_k]` tile (queries `[q0, q0 + block_q)`, keys
`[k0, k0 + block_k)`) is dead when the index rules mask every entry of it: a
`-1` slot, a key tile past the key length, a query tile past the query
length, a key tile wholly after the last query (causal), wholly outside the
local window of every query of the tile, or whose segment ids lie in a range
disjoint from the query tile's (`[min, max]` per tile, `segment_bounds`). The
forward, dq and dk/dv kernels (Triton and Mosaic) run a dead tile's step under
`lax.cond`: no K/V load or copy, no matmul, no update of the running max, sum
or gradients.

Skipping is exact: a dead tile's step leaves the state unchanged in exact and
in float arithmetic (its probabilities are 0, its rescale factor
`exp(m - m) = 1`), so outputs and gradients equal those of the unskipped
kernels (up to the sign of an exact zero). The segment test is exact for
packed ids (consecutive integers in position order, as the training script's
packing gives: a cumulative sum of document starts); for other ids a tile
whose ranges overlap but whose ids never match is visited and masked per
element (`range_mask`).
"""

from __future__ import annotations

import functools
from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
from jax import lax


def tile_live(
  q0, k0, lens, *, block_q: int, block_k: int, is_causal: bool, window, seg=None
) -> jax.Array:
  """Whether some entry of the tile may be admitted (False: every entry is masked).

  Args:
    q0: int32 scalar, first query position of the tile.
    k0: int32 scalar, first key position of the tile; negative for an
      unlisted (`-1`) slot, which is dead.
    lens: None or `(q_len, kv_len)` int32 scalars of this batch element.
    block_q: queries per tile (static).
    block_k: keys per tile (static).
    is_causal: mask key position > query position (static).
    window: None or the static local window `(left, right)`.
    seg: None or `(q_lo, q_hi, k_lo, k_hi)` int32 scalars, the smallest and
      largest segment id of the query tile and of the key tile.

  Returns:
    A bool scalar: False exactly when the lengths, window and causal rules
    (`range_mask` without the segment ids, and `k <= q`) mask the whole tile
    or the segment id ranges are disjoint, so skipping it changes no result.
  """
  q_hi, k_hi = q0 + (block_q - 1), k0 + (block_k - 1)  # last query and key of the tile
  live = k0 >= 0
  if lens is not None:  # clip the tile to the lengths
    q_len, kv_len = lens
    q_hi, k_hi = jnp.minimum(q_hi, q_len - 1), jnp.minimum(k_hi, kv_len - 1)
    live = live & (q0 <= q_hi) & (k0 <= k_hi)
  # Over the (clipped) tile, k - q takes every integer in [k0 - q_hi, k_hi - q0];
  # the window admits k - q in [-left, right] and the causal rule k - q <= 0.
  lo, hi = (None, None) if window is None else (-window[0], window[1])
  if is_causal:
    hi = 0 if hi is None else min(hi, 0)
  if lo is not None:
    live = live & (k_hi - q0 >= lo)
  if hi is not None:
    live = live & (k0 - q_hi <= hi)
  if seg is not None:
    q_lo_id, q_hi_id, k_lo_id, k_hi_id = seg
    live = live & (q_lo_id <= k_hi_id) & (k_lo_id <= q_hi_id)
  return live


def segment_bounds(seg: jax.Array, block: int, num: int) -> jax.Array:
  """`[B, 2 * num]` int32: the smallest segment id of each block of `block`
  positions, then the largest (block `i` at `i` and `num + i`).

  Args:
    seg: `[B, L]` int32 segment ids, `L <= num * block`; the last id is
      repeated into the padding, so a partial block's range is its own.
    block: positions per block.
    num: blocks (padding blocks past `ceil(L / block)` are never read).
  """
  seg = jnp.pad(seg, ((0, 0), (0, num * block - seg.shape[1])), mode="edge")
  tiles = seg.reshape(seg.shape[0], num, block)
  return jnp.concatenate([tiles.min(-1), tiles.max(-1)], axis=1)


def block_bounds(ref, num: int | None = None, base=0) -> Callable[[Any], tuple[Any, Any]]:
  """`i -> (lo, hi)`, block `i`'s id range from a `segment_bounds` row held in
  a ref: a `[2 * num]` block (Triton) or a flat prefetch from `base` (Mosaic)."""
  num = ref.shape[0] // 2 if num is None else num
  return lambda i: (ref[base + i], ref[base + num + i])


def prefetched_bounds(lens_smem, b, *bounds_smem) -> tuple[Callable, ...]:
  """`block_bounds` of batch element `b` for each flat `[B * 2 * num]` prefetched
  `segment_bounds` (Mosaic), `num` read from the flat `[B * 2]` lengths."""
  nums = [ref.shape[0] // lens_smem.shape[0] for ref in bounds_smem]
  return tuple(block_bounds(r, k, base=b * 2 * k) for r, k in zip(bounds_smem, nums, strict=True))


def run_if_live(live: jax.Array, step: Callable[[Any], Any], state: Any) -> Any:
  """`step(state)` where `live`, else `state` unchanged (the skipped tile's step)."""
  return lax.cond(live, step, lambda s: s, state)


def skipping_body(read_id, step, live, *, own, other_block, lens, bounds=None, keys=True):
  """The `fori_loop` body of a block kernel: walk listed blocks, skip dead tiles.

  A program owns one block (a query block in the forward and dq kernels, a key
  block in dk/dv) and walks other blocks: step `e` reads the id `i =
  read_id(e)` and, with segment ids, that block's id range, and runs
  `step(i, state)` only where `live` says the tile may admit a key.

  Args:
    read_id: `e -> i`, the id of the walked block (a scalar read; `-1` = none).
    step: `(i, state) -> state`, the tile's loads, matmuls and updates.
    live: `tile_live` with its static arguments bound.
    own: `(index, block)`: the owned block's id and its size.
    other_block: positions per walked block.
    lens: None or `(q_len, kv_len)`.
    bounds: None or `(query, key)` `block_bounds`, the blocks' id ranges.
    keys: whether the walked blocks are key blocks (forward, dq).
  """
  own_index, own_block = own
  own_start = own_index * own_block
  if bounds is not None:
    own_at, other_at = bounds if keys else bounds[::-1]
    own_ids = own_at(own_index)

  def body(e, state):
    i = read_id(e)
    seg = None
    if bounds is not None:
      ids = other_at(jnp.maximum(i, 0))
      seg = (*own_ids, *ids) if keys else (*ids, *own_ids)
    starts = (own_start, i * other_block) if keys else (i * other_block, own_start)
    return run_if_live(live(*starts, lens, seg=seg), functools.partial(step, i), state)

  return body
