"""Argument checks and side-input layout of `gsparse.kernels.select.fused_topk_select`."""

from __future__ import annotations

import math

import jax.numpy as jnp

from gsparse._layout import pad_axis

VARIANTS = ("gpu", "tpu")


def check_inputs(query, key, mask, bias, k, scale, is_causal, variant, block_q, block_k):
  """Raises ValueError or TypeError naming the bad argument (at trace time)."""
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


def side_input(x, batch, n, t, tp, sp, fill, dtype):
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
    x = pad_axis(x, 2, tp, fill)
  if x.shape[3] > 1:
    x = pad_axis(x, 3, sp, fill)
  return x
