"""The on-chip state of the fused top-k selection (`gsparse.kernels.select`).

Shared by the Triton and the Mosaic kernels: every function here works on
2-D values of one program (`[block_q, *]`), inside the kernel.

One program handles `block_q` queries of one head and walks over the keys
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
"""

from __future__ import annotations

import jax.numpy as jnp
from jax import lax

from gsparse._numerics import sortable_int32

_I32_MIN = -(2**31)  # below every sortable key: an entry taken out of play
_I32_MAX = 2**31 - 1
NEG_KEY = int(jnp.asarray(sortable_int32(jnp.float32(-jnp.inf))))  # the key of -inf
DOT_PRECISION = lax.Precision.HIGHEST  # float32 logits in IEEE float32 (no TF32)


def init_state(bq: int, kp: int):
  """Running (max, sum, count, list keys, list indices) of `bq` rows."""
  col = lax.broadcasted_iota(jnp.int32, (bq, kp), 1)
  return (
    jnp.full((bq, 1), -jnp.inf, jnp.float32),
    jnp.zeros((bq, 1), jnp.float32),
    jnp.zeros((bq, 1), jnp.int32),
    jnp.full((bq, kp), NEG_KEY, jnp.int32),
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


def update(state, logits, valid, col0):
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


def finish(state):
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
  oi = jnp.where(ok == NEG_KEY, -1, oi)  # sentinels: no admissible key left
  m_safe = jnp.where(jnp.abs(m) == jnp.inf, 0.0, m)
  ok_l = denom != 0
  lse = jnp.where(ok_l, m_safe + jnp.log(jnp.where(ok_l, denom, 1.0)), -jnp.inf)
  return oi, ok, lse, num


def block_logits(q, kb, mask, bias, *, scale, row0, col0, num_keys, is_causal):
  """Logits `[bq, bk]` of one block and their admissibility."""
  s = lax.dot_general(
    q,
    kb,
    (((1,), (1,)), ((), ())),
    precision=DOT_PRECISION,
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


def write_outputs(refs, state):
  idx_ref, key_ref, lse_ref, num_ref = refs
  oi, ok, lse, num = finish(state)
  idx_ref[...] = oi
  key_ref[...] = ok
  lse_ref[...] = lse
  num_ref[...] = num
