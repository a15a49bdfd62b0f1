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
kernels. The segment test is exact for packed ids (consecutive integers in
position order, as `gsparse.SegmentIds` from packing gives); for other ids a
tile whose ranges overlap but whose ids never match is visited and masked per
element (`range_mask`).
"""

from __future__ import annotations

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


def num_bounds(lens_ref, bounds_ref) -> int:
  """Blocks per batch element of a flat `[B * 2 * num]` `segment_bounds` (static),
  from the flat `[B * 2]` lengths next to it (the Mosaic kernels' prefetch)."""
  return bounds_ref.shape[0] // lens_ref.shape[0]


def bounds_at(ref, i, num: int, base=0):
  """`(lo, hi)` of block `i` from a `segment_bounds` row (a ref, flat from `base`)."""
  return ref[base + i], ref[base + num + i]


def run_if_live(live: jax.Array, step: Callable[[Any], Any], state: Any) -> Any:
  """`step(state)` where `live`, else `state` unchanged (the skipped tile's step)."""
  return lax.cond(live, step, lambda s: s, state)
