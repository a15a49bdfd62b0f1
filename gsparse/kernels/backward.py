"""The XLA backward shared by the token- and block-level kernels.

`token_gather_attention` and `block_gather_attention` carry a custom VJP with
two backwards. This one is plain XLA (`gather_backward_xla`): it recomputes the
slot probabilities from the saved log-sum-exp and scatter-adds dK and dV. It is
the reference, the default in interpret mode, and the fallback
(`backward="xla"`). The Pallas backward (`token_bwd`, `block_bwd`) replaces the
scatter with a key-major sort and per-key-block kernels. See docs/kernels.md.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp

from gsparse._layout import gather_kv
from gsparse.kernels.nonfinite import finite_part

_dot = functools.partial(jnp.einsum, preferred_element_type=jnp.float32)


def slot_positions(block_indices: jax.Array, block_k: int, num_keys: int):
  """Key positions `[B, Tb, N, nb * block_k]` of key blocks, and their validity."""
  pos = block_indices[..., None] * block_k + jnp.arange(block_k, dtype=jnp.int32)
  valid = (block_indices >= 0)[..., None] & (pos < num_keys)
  pos = pos.reshape(*pos.shape[:-2], pos.shape[-2] * block_k)
  valid = valid.reshape(pos.shape)
  return jnp.where(valid, pos, 0), valid


def _slot_probabilities(
  qb, kg, pos, slot_valid, bias, lse, *, scale, is_causal, num_queries, extra_valid
):
  """`(p, valid)` `[B, Tb, bq, N, m]`: the recomputed softmax and the admissible slots."""
  b, tb, bq, n, _ = qb.shape
  m = pos.shape[3]
  s = _dot("btqnh,btnmh->btqnm", qb, kg) * scale
  if bias is not None:
    s = s + bias.reshape(b, tb, bq, n, m).astype(jnp.float32)
  valid = jnp.broadcast_to(slot_valid[:, :, None], s.shape)
  qpos = (jnp.arange(tb)[:, None] * bq + jnp.arange(bq)[None, :])[None, :, :, None, None]
  if is_causal:
    valid = valid & (pos[:, :, None] <= qpos)
  if num_queries is not None:
    valid = valid & (qpos < num_queries)
  if extra_valid is not None:
    valid = valid & extra_valid
  lse_b = lse.reshape(b, tb, bq, n, 1)
  # A row with nothing kept (lse = -inf, e.g. all slots at -inf logits) has
  # p = 0, not exp(-inf - -inf) = NaN; a NaN lse still propagates.
  valid = valid & (lse_b != -jnp.inf)
  p = jnp.where(valid, jnp.exp(jnp.where(valid, s - lse_b, 0.0)), 0.0)
  return p, valid


def _scatter_keys(grads, like, pos, slot_valid):
  """Scatter-adds per-slot `[B, Tb, N, m, D]` grads into a zero float32 copy of `like`."""
  b, s_len, kh = like.shape[:3]
  n = pos.shape[2]
  g = n // kh
  bi = jnp.arange(b)[:, None, None, None]
  hi = (jnp.arange(n) // g)[None, None, :, None]
  drop = jnp.where(slot_valid, pos, s_len)  # out of range -> dropped
  return jnp.zeros(like.shape, jnp.float32).at[bi, drop, hi].add(grads, mode="drop")


# Over 60 lines only through its signature and Args list: the body is ~30 lines.
def gather_backward_xla(
  query: jax.Array,
  key: jax.Array,
  value: jax.Array,
  pos: jax.Array,
  slot_valid: jax.Array,
  bias: jax.Array | None,
  lse: jax.Array,
  do: jax.Array,
  dlse: jax.Array | None,
  dlogits: jax.Array | None,
  *,
  block_q: int,
  scale: float,
  is_causal: bool,
  num_queries: int | None = None,
  extra_valid: jax.Array | None = None,
):
  """Gradients of gather attention from the saved log-sum-exp (plain XLA).

  Works on query blocks that share their slots (token level: `block_q = 1`).

  Args:
    query: `[B, Tb * block_q, N, H]`.
    key: `[B, S, K, H]`.
    value: `[B, S, K, Hv]`.
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
    num_queries: the real T where `query` is padded to whole query blocks:
      padded rows take no part (they may read a NaN key no real row can attend).
    extra_valid: None or a bool mask broadcastable to `[B, Tb, block_q, N, m]`
      (the block kernels' index ranges, per query and slot).

  Returns:
    `(dquery, dkey, dvalue, dbias)` with dbias None when bias is None.
  """
  b, _, n, h = query.shape
  tb = pos.shape[1]
  f32 = jnp.float32
  # Gathered rows stay in the input dtype (zero rows at invalid slots, so a
  # NaN key or value elsewhere never enters); products accumulate in float32.
  kg = gather_kv(key, jnp.where(slot_valid, pos, -1))  # [B, Tb, N, m, H]
  vg = gather_kv(value, jnp.where(slot_valid, pos, -1))
  qb = query.reshape(b, tb, block_q, n, h)
  p, valid = _slot_probabilities(
    qb,
    kg,
    pos,
    slot_valid,
    bias,
    lse,
    scale=scale,
    is_causal=is_causal,
    num_queries=num_queries,
    extra_valid=extra_valid,
  )
  dob = do.reshape(b, tb, block_q, n, -1)
  # A masked slot may still hold a non-finite row (causal masking inside a
  # key block): its dp is dropped, and the products below take the finite
  # parts of K and Q (an admissible NaN still reaches ds through p).
  dp = jnp.where(valid, _dot("btqnv,btnmv->btqnm", dob, vg), 0.0)
  delta = jnp.sum(p * dp, axis=-1, keepdims=True)
  ds = p * (dp - delta)
  if dlse is not None:
    ds = ds + p * dlse.reshape(b, tb, block_q, n, 1).astype(f32)
  if dlogits is not None:
    ds = ds + jnp.where(valid, dlogits.reshape(ds.shape).astype(f32), 0.0)
  dq = scale * _dot("btqnm,btnmh->btqnh", ds, finite_part(kg).astype(f32))
  dkg = scale * _dot("btqnm,btqnh->btnmh", ds, finite_part(qb).astype(f32))
  dvg = _dot("btqnm,btqnv->btnmv", p, dob.astype(f32))
  dk = _scatter_keys(dkg, key, pos, slot_valid)
  dv = _scatter_keys(dvg, value, pos, slot_valid)
  dbias = None if bias is None else ds.reshape(bias.shape).astype(bias.dtype)
  return (
    dq.reshape(query.shape).astype(query.dtype),
    dk.astype(key.dtype),
    dv.astype(value.dtype),
    dbias,
  )
