"""Index-range masks from O(T + S) data: sequence lengths, a local window and
segment ids, the `jax.nn.dot_product_attention` arguments that would
otherwise need a dense `[T, S]` boolean mask.

`build` checks the arguments once and returns an `Admissible` (or None when
none is given); `admits` evaluates it on any broadcastable grid of query and
key positions: a `[c, S]` chunk of rows in the exact and block selections, the
`[T, m]` candidates of LSH, a whole `[T, S]` matrix for the "full" selection.
Every route calls `admits`, so the window, length and segment logic exists
once. Query `t` of batch element `b` may attend key `s` iff

  t < query_seq_lengths[b] and s < key_value_seq_lengths[b]
  and t - left <= s <= t + right            (local_window_size = (left, right))
  and q_segment_ids[b, t] == kv_segment_ids[b, s]

(each clause only when its argument is given), exactly as
`jax.nn.dot_product_attention` builds its masks (the window is top-left
aligned, as `is_causal`).
"""

from __future__ import annotations

import dataclasses
import functools
import math
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from gsparse._checks import check_mask_and_bias, concrete_or_none


class SegmentIds(NamedTuple):
  """Segment ids of the queries and of the keys (packed sequences).

  The same two fields as `SegmentIds` of jax's Pallas flash and splash
  attention kernels, which this type mirrors: a query attends only keys with
  the same id. Either of those NamedTuples is accepted too.

  Attributes:
    q: `[batch..., T]` integer ids of the queries.
    kv: `[batch..., S]` integer ids of the keys.
  """

  q: Any
  kv: Any


@functools.partial(
  jax.tree_util.register_dataclass,
  data_fields=["q_len", "kv_len", "q_seg", "kv_seg"],
  meta_fields=["window"],
)
@dataclasses.dataclass(frozen=True)
class Admissible:
  """Checked index-range masks, batch flattened to `B = prod(batch)`.

  A pytree (the window is static), so it can be `vmap`ped over the batch:
  `admits` then sees one batch element (scalar lengths, `[T]`/`[S]` ids).

  Attributes:
    q_len: `[B]` int32 query lengths in [0, T], or None.
    kv_len: `[B]` int32 key lengths in [0, S], or None.
    q_seg: `[B, T]` int32 query segment ids, or None.
    kv_seg: `[B, S]` int32 key segment ids, or None.
    window: static `(left, right)` >= 0, or None.
  """

  q_len: jax.Array | None
  kv_len: jax.Array | None
  q_seg: jax.Array | None
  kv_seg: jax.Array | None
  window: tuple[int, int] | None = None


def admits(a: Admissible | None, rows: jax.Array, cols: jax.Array) -> jax.Array | None:
  """Whether query `rows` may attend key `cols` (one batch element), or None if all may.

  Args:
    a: one batch element of an `Admissible` (scalar lengths, `[T]`/`[S]`
      segment ids), or None.
    rows: int query positions; broadcastable against `cols`. Positions past
      T or S (padding) are allowed: their segment id is clipped, and callers
      mask padding themselves.
    cols: int key positions.

  Returns:
    Boolean `broadcast(rows, cols)`, or None when `a` is None.
  """
  if a is None:
    return None
  ok = jnp.ones(jnp.broadcast_shapes(jnp.shape(rows), jnp.shape(cols)), bool)
  if a.q_len is not None:
    ok = ok & (rows < a.q_len)
  if a.kv_len is not None:
    ok = ok & (cols < a.kv_len)
  if a.window is not None:
    left, right = a.window
    ok = ok & (cols >= rows - left) & (cols <= rows + right)
  if a.q_seg is not None:
    qs = jnp.take(a.q_seg, rows, mode="clip")
    ks = jnp.take(a.kv_seg, cols, mode="clip")
    ok = ok & (qs == ks)
  return ok


def dense_mask(a: Admissible, batch: tuple[int, ...], t: int, s: int) -> jax.Array:
  """`[*batch, 1, T, S]` boolean mask of `a`: for the "full" selection and
  references only (it is the T x S array the other routes avoid)."""
  rows, cols = jnp.arange(t)[:, None], jnp.arange(s)[None, :]
  m = jax.vmap(lambda ab: admits(ab, rows, cols))(a)  # [B, T, S]
  return m.reshape(*batch, 1, t, s)


def fold_into_mask(a: Admissible, mask, bias, batch: tuple[int, ...], n: int, t: int, s: int):
  """`(mask & dense_mask(a), bias)` after checking `mask`/`bias` against
  `[*batch, N, T, S]`: for routes that hold the logit matrix anyway."""
  mask, bias = check_mask_and_bias(mask, bias, (*batch, n, t, s))
  return and_masks(mask, dense_mask(a, batch, t, s)), bias


def and_masks(m1: jax.Array | None, m2: jax.Array | None) -> jax.Array | None:
  """`m1 & m2` where None means all True."""
  if m1 is None:
    return m2
  return m1 if m2 is None else m1 & m2


def build(
  batch: tuple[int, ...],
  t: int,
  s: int,
  *,
  query_seq_lengths: Any = None,
  key_value_seq_lengths: Any = None,
  local_window_size: Any = None,
  segment_ids: Any = None,
) -> Admissible | None:
  """Checks the index-range arguments (at trace time) and flattens the batch.

  Lengths are `batch`-shaped integer arrays (`(1,)` or `()` also for an
  unbatched call, as `jax.nn` takes `(B,)` after adding a batch axis). Known
  values outside [0, T] (query) or [0, S] (keys) raise; traced values cannot
  be checked and are clipped to that range.

  Raises:
    ValueError: naming the argument, for a wrong shape, dtype or value.
    TypeError: a window that is not an int or a pair of ints.
  """
  window = _check_window(local_window_size)
  q_len = _check_lengths("query_seq_lengths", query_seq_lengths, batch, t)
  kv_len = _check_lengths("key_value_seq_lengths", key_value_seq_lengths, batch, s)
  q_seg = kv_seg = None
  if segment_ids is not None:
    q_seg, kv_seg = _check_segments(segment_ids, batch, t, s)
  if q_len is None and kv_len is None and q_seg is None and window is None:
    return None
  return Admissible(q_len, kv_len, q_seg, kv_seg, window)


def _check_window(w: Any) -> tuple[int, int] | None:
  if w is None:
    return None
  pair = (w, w) if isinstance(w, (int, np.integer)) and not isinstance(w, bool) else w
  if (
    not isinstance(pair, (tuple, list))
    or len(pair) != 2
    or any(isinstance(x, bool) or not isinstance(x, (int, np.integer)) for x in pair)
  ):
    raise TypeError(f"local_window_size must be an int or a pair (left, right) of ints, got {w!r}")
  if min(pair) < 0:
    raise ValueError(f"local_window_size={w!r} must be >= 0 (left and right)")
  return int(pair[0]), int(pair[1])


def _check_lengths(name: str, x: Any, batch: tuple[int, ...], bound: int) -> jax.Array | None:
  if x is None:
    return None
  known = concrete_or_none(x)  # before jnp.asarray: under jit that would make a tracer
  x = jnp.asarray(x)
  if not jnp.issubdtype(x.dtype, jnp.integer):
    raise ValueError(f"{name} must have an integer dtype, got {x.dtype}")
  nb = math.prod(batch)
  if x.shape != tuple(batch) and not (not batch and x.shape in ((), (1,))):
    raise ValueError(f"{name} must have the batch shape {tuple(batch)}, got shape {x.shape}")
  if known is not None and known.size and (known.min() < 0 or known.max() > bound):
    raise ValueError(f"{name} must lie in [0, {bound}], got values {known.tolist()}")
  return jnp.clip(x.reshape(nb).astype(jnp.int32), 0, bound)


def _check_segments(seg: Any, batch: tuple[int, ...], t: int, s: int):
  if isinstance(seg, tuple):  # SegmentIds (ours or jax's Pallas one), or a (q, kv) pair
    if len(seg) != 2:
      raise ValueError(f"segment_ids must be one array or a pair (q, kv), got {len(seg)} items")
    q, kv = seg
  else:
    if t != s:
      raise ValueError(
        f"segment_ids as one array needs T == S (got T={t}, S={s}); pass SegmentIds(q, kv)"
      )
    q = kv = seg
  out = []
  for part, x, n in (("q", q, t), ("kv", kv, s)):
    x = jnp.asarray(x)
    if not jnp.issubdtype(x.dtype, jnp.integer):
      raise ValueError(f"segment_ids ({part}) must have an integer dtype, got {x.dtype}")
    if x.shape != (*batch, n):
      raise ValueError(
        f"segment_ids ({part}) must have shape [batch..., {'T' if part == 'q' else 'S'}] = "
        f"{(*batch, n)}, got {x.shape}"
      )
    out.append(x.reshape(math.prod(batch), n).astype(jnp.int32))
  return tuple(out)
