"""Block skipping in the block-level Pallas kernels: which tiles cannot admit a key.

A listed `[block_q, block_k]` tile (queries `[q0, q0 + block_q)`, keys
`[k0, k0 + block_k)`) is dead when the index rules mask every entry of it
whatever the segment ids: a `-1` slot, a key tile past the key length, a query
tile past the query length, a key tile wholly after the last query (causal) or
wholly outside the local window of every query of the tile. The forward, dq and
dk/dv kernels (Triton and Mosaic) run a dead tile's step under `lax.cond`: no
K/V load or copy, no matmul, no update of the running max, sum or gradients.

Skipping is exact: a dead tile's step leaves the state unchanged in exact and
in float arithmetic (its probabilities are 0, its rescale factor
`exp(m - m) = 1`), so outputs and gradients equal those of the unskipped
kernels (up to the sign of an exact zero). Segment ids stay per element
(`range_mask`): a tile whose ids never match is visited and masked.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
from jax import lax


def tile_live(q0, k0, lens, *, block_q: int, block_k: int, is_causal: bool, window) -> jax.Array:
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

  Returns:
    A bool scalar: False exactly when the lengths, window and causal rules
    (`range_mask` without the segment ids, and `k <= q`) mask the whole tile,
    so skipping it changes no result.
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
  return live


def run_if_live(live: jax.Array, step: Callable[[Any], Any], state: Any) -> Any:
  """`step(state)` where `live`, else `state` unchanged (the skipped tile's step)."""
  return lax.cond(live, step, lambda s: s, state)
