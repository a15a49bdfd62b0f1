"""Argument checks shared by the public functions.

Every check runs at trace time on static information (shapes, dtypes, Python
scalars), so it raises the same error eagerly and under `jax.jit`. Values that
are only known at run time (a traced `sigma` in a vmapped sweep) cannot be
checked here; functions that accept traced scalars say so in their docstring.
"""

from __future__ import annotations

import numbers
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np


def concrete_or_none(x: Any) -> np.ndarray | None:
  """Returns `x` as a NumPy array if its value is known at trace time, else None."""
  try:
    return np.asarray(x)
  except (jax.errors.TracerArrayConversionError, jax.errors.ConcretizationTypeError):
    return None  # A tracer: the value is not known at trace time.
  except (TypeError, ValueError):
    return None


def check_int(
  name: str, value: Any, *, minimum: int | None = None, maximum: int | None = None
) -> int:
  """Checks that `value` is a Python/NumPy integer (not a bool) in range."""
  if isinstance(value, (bool, np.bool_)) or not isinstance(value, numbers.Integral):
    raise TypeError(f"{name} must be an int, got {value!r} of type {type(value).__name__}")
  value = int(value)
  if minimum is not None and value < minimum:
    hi = "" if maximum is None else f", {maximum}"
    raise ValueError(
      f"{name}={value} must be >= {minimum}" + (f" (in [{minimum}{hi}])" if hi else "")
    )
  if maximum is not None and value > maximum:
    raise ValueError(f"{name}={value} must be <= {maximum}")
  return value


def check_float_scalar(
  name: str,
  value: Any,
  *,
  positive: bool = False,
  open_unit: bool = False,
  allow_traced: bool = True,
) -> None:
  """Checks a real scalar hyperparameter when its value is known at trace time.

  Args:
    name: argument name used in the error message.
    value: the value.
    positive: require value > 0.
    open_unit: require 0 < value < 1.
    allow_traced: if False, a traced value is an error; if True it is accepted
      unchecked (documented by the caller).
  """
  if isinstance(value, (bool, np.bool_)):
    raise TypeError(f"{name} must be a real number, got bool {value!r}")
  if isinstance(value, str) or value is None:
    raise TypeError(f"{name} must be a real number, got {value!r}")
  concrete = concrete_or_none(value)
  if concrete is None:
    if not allow_traced:
      raise TypeError(f"{name} must be known at trace time (a Python float), got a tracer")
    return
  if concrete.dtype.kind not in "biuf":
    raise TypeError(f"{name} must be a real number, got dtype {concrete.dtype}")
  if np.any(~np.isfinite(concrete)):
    raise ValueError(f"{name}={value!r} must be finite")
  if open_unit and np.any((concrete <= 0) | (concrete >= 1)):
    raise ValueError(f"{name}={value!r} must be in the open interval (0, 1)")
  if positive and np.any(concrete <= 0):
    raise ValueError(f"{name}={value!r} must be > 0")


def check_scale(scale: Any) -> None:
  """Checks an attention `scale`: None, or a finite real scalar (may be traced)."""
  if scale is None:
    return
  shape = np.shape(scale) if not isinstance(scale, jax.Array) else scale.shape
  if shape != ():
    raise ValueError(f"scale must be a scalar, got an array of shape {shape}")
  check_float_scalar("scale", scale)


def check_prng_key(name: str, key: Any) -> None:
  """Checks an optional PRNG key: a typed key (`jax.random.key`) or raw uint32 key data."""
  if key is None:
    return
  dtype = getattr(key, "dtype", None)
  if dtype is not None and jax.dtypes.issubdtype(dtype, jax.dtypes.prng_key):
    return
  if dtype == np.uint32 and np.ndim(key) == 1:  # legacy jax.random.PRNGKey(...)
    return
  raise TypeError(
    f"{name} must be a PRNG key, e.g. jax.random.key(0), got {key!r} of type {type(key).__name__}"
  )


def _check_array_like(name: str, x: Any) -> None:
  """Rejects what jnp cannot take as an array (lists, strings, None) by name."""
  if x is None or isinstance(x, (list, tuple, dict, set, str, bytes)):
    raise TypeError(f"{name} must be an array (jax.Array or numpy.ndarray), got {type(x).__name__}")


def check_float_array(name: str, x: Any, *, min_ndim: int = 0) -> jax.Array:
  """Converts `x` to a jax array and checks it has a floating dtype."""
  _check_array_like(name, x)
  dtype = jnp.result_type(x)
  if not jnp.issubdtype(dtype, jnp.floating):
    raise TypeError(f"{name} must have a floating dtype, got {dtype}")
  x = jnp.asarray(x)
  if x.ndim < min_ndim:
    raise ValueError(f"{name} must have at least {min_ndim} dimensions, got shape {x.shape}")
  return x


def check_attention_inputs(
  query: Any, key: Any, value: Any
) -> tuple[jax.Array, jax.Array, jax.Array]:
  """Checks `[batch..., seq, heads, head_dim]` query/key/value and returns arrays.

  Allows grouped-query attention: the query heads must be a multiple of the
  key/value heads, as in `jax.nn.dot_product_attention`.
  """
  query = check_float_array("query", query, min_ndim=3)
  key = check_float_array("key", key, min_ndim=3)
  value = check_float_array("value", value, min_ndim=3)
  if not (query.ndim == key.ndim == value.ndim):
    raise ValueError(
      "query, key and value must have the same rank [batch..., seq, heads, head_dim], "
      f"got query.shape={query.shape}, key.shape={key.shape}, value.shape={value.shape}"
    )
  if query.shape[:-3] != key.shape[:-3] or key.shape[:-3] != value.shape[:-3]:
    raise ValueError(
      "query, key and value must have the same batch dimensions, got "
      f"query.shape={query.shape}, key.shape={key.shape}, value.shape={value.shape}"
    )
  if key.shape[-3] != value.shape[-3]:
    raise ValueError(
      f"key and value must have the same sequence length, got key.shape={key.shape}, "
      f"value.shape={value.shape}"
    )
  if key.shape[-2] != value.shape[-2]:
    raise ValueError(
      f"key and value must have the same number of heads, got key.shape={key.shape}, "
      f"value.shape={value.shape}"
    )
  if query.shape[-1] != key.shape[-1]:
    raise ValueError(
      f"query and key must have the same head_dim, got query.shape={query.shape}, "
      f"key.shape={key.shape}"
    )
  if query.shape[-1] == 0:
    raise ValueError(
      f"query and key must have head_dim >= 1 (the default scale is 1 / sqrt(head_dim)), got "
      f"query.shape={query.shape}"
    )
  n_q, n_kv = query.shape[-2], key.shape[-2]
  if n_kv == 0 or n_q % n_kv:
    raise ValueError(
      f"query heads ({n_q}) must be a multiple of key/value heads ({n_kv}); got "
      f"query.shape={query.shape}, key.shape={key.shape}"
    )
  if key.shape[-3] == 0:
    raise ValueError(f"key must have at least one position, got key.shape={key.shape}")
  return query, key, value


def check_mask_and_bias(mask: Any, bias: Any, logits_shape: tuple[int, ...]):
  """Checks that mask/bias broadcast to `[batch..., heads, q_len, kv_len]`."""
  if mask is not None:
    mask = jnp.asarray(mask)
    if mask.dtype != jnp.bool_:
      raise TypeError(f"mask must be boolean, got dtype {mask.dtype}")
    _check_broadcast("mask", mask.shape, logits_shape)
  if bias is not None:
    bias = check_float_array("bias", bias)
    _check_broadcast("bias", bias.shape, logits_shape)
  return mask, bias


def _check_broadcast(name: str, shape: tuple[int, ...], target: tuple[int, ...]) -> None:
  try:
    out = np.broadcast_shapes(shape, target)
  except ValueError:
    out = None
  if out != tuple(target):
    raise ValueError(
      f"{name} with shape {shape} does not broadcast to the logits shape "
      f"[batch..., heads, q_len, kv_len] = {tuple(target)}"
    )
