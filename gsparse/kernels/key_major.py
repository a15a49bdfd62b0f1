"""Key-major order of (row, slot) pairs: the transpose the Pallas backward walks.

The forward lists, per query row (or query block), the keys (or key blocks) it
reads. dK and dV are sums over the rows that read each key, so the backward
needs the transpose: per key segment, the rows that listed a key in it. Here
XLA sorts the flattened pairs by key id (a stable sort, so the order is fixed:
key, then row, then slot) and finds where each segment of `segment` consecutive
ids starts (`searchsorted`). A kernel program per key segment then walks its
pairs in that fixed order and accumulates in registers or VMEM: no atomics, the
same sums in the same order on every run.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp


def key_major(ids: jax.Array, *, num_ids: int, segment: int, pad: int = 0):
  """Sorts the pairs of `ids` by id, per (batch, head).

  Args:
    ids: `[B, R, N, m]` int32 ids in `[0, num_ids)`, `-1` = no pair.
    num_ids: the number of distinct ids (keys, or key blocks).
    segment: ids per segment (one kernel program each).
    pad: extra entries at the end of every sorted list (so that a kernel can
      read whole chunks past the last pair); they hold id `num_ids` and row 0.

  Returns:
    `(sorted_ids, order, offsets)`: `sorted_ids` `[B, N, R * m + pad]` int32
    (masked pairs sort last, as id `num_ids`); `order` `[B, N, R * m + pad]`
    int32 the flat `r * m + slot` of each sorted pair (`0` in the padding);
    `offsets` `[B, N, ceil(num_ids / segment) + 1]` int32, segment `j` owns
    sorted entries `offsets[j]:offsets[j + 1]`.
  """
  b, r, n, m = ids.shape
  flat = jnp.swapaxes(ids, 1, 2).reshape(b, n, r * m)
  flat = jnp.where(flat >= 0, flat, num_ids)
  order = jnp.argsort(flat, axis=-1, stable=True).astype(jnp.int32)
  sorted_ids = jnp.take_along_axis(flat, order, axis=-1)
  nseg = -(-num_ids // segment)
  # The last edge is num_ids itself: the masked pairs (id num_ids) follow it.
  edges = jnp.minimum(jnp.arange(nseg + 1, dtype=jnp.int32) * segment, num_ids)
  search = jax.vmap(jax.vmap(lambda a: jnp.searchsorted(a, edges, side="left")))
  offsets = search(sorted_ids).astype(jnp.int32)
  if pad:
    sorted_ids = jnp.pad(sorted_ids, ((0, 0), (0, 0), (0, pad)), constant_values=num_ids)
    order = jnp.pad(order, ((0, 0), (0, 0), (0, pad)))
  return sorted_ids, order, offsets


def group_sum(x: jax.Array, kv_heads: int) -> jax.Array:
  """`[B, S, N, D]` per-query-head sums -> `[B, S, K, D]`, adding the `N / K` heads
  of a group one after the other (elementwise adds: a fixed order on every backend)."""
  b, s, n, d = x.shape
  x = x.reshape(b, s, kv_heads, n // kv_heads, d)
  return functools.reduce(lambda acc, i: acc + x[:, :, :, i], range(1, x.shape[3]), x[:, :, :, 0])
