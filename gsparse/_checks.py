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


def check_real(
  name: str,
  value: Any,
  *,
  lo: float | None = None,
  hi: float | None = None,
  lo_open: bool = False,
  hi_open: bool = False,
  integer: bool = False,
  allow_traced: bool = True,
) -> None:
  """Checks a real number or array when its value is known at trace time.

  The one range check of the package: every error names the argument. A
  traced value cannot be checked; it is accepted (the caller documents what
  an out-of-range traced value gives) unless `allow_traced` is False.

  Args:
    name: argument name used in the error message.
    value: the value (a Python number, NumPy or jax array, or a tracer).
    lo, hi: the allowed range (None: unbounded on that side).
    lo_open, hi_open: exclude the end points.
    integer: require integer values.
    allow_traced: if False, a traced value is a TypeError.
  """
  if value is None or isinstance(value, (bool, np.bool_, str)):
    raise TypeError(f"{name} must be a real number or array, got {value!r}")
  conc = concrete_or_none(value)
  if conc is None:
    if not allow_traced:
      raise TypeError(f"{name} must be known at trace time (a Python float), got a tracer")
    return
  if conc.dtype.kind not in "biuf":
    raise TypeError(f"{name} must be a real number or array, got dtype {conc.dtype}")
  conc = conc.astype(np.float64)
  if np.any(~np.isfinite(conc)):
    raise ValueError(f"{name}={value!r} must be finite")
  bad = np.zeros(conc.shape, bool)
  if lo is not None:
    bad |= (conc <= lo) if lo_open else (conc < lo)
  if hi is not None:
    bad |= (conc >= hi) if hi_open else (conc > hi)
  if integer:
    bad |= conc != np.round(conc)
  if np.any(bad):
    raise ValueError(f"{name}={value!r} must be {_range_text(lo, hi, lo_open, hi_open, integer)}")


def _range_text(lo, hi, lo_open, hi_open, integer) -> str:
  """`> 0`, `>= 1`, `in (0, 1)`, `an integer >= 1`, ... for `check_real`'s message."""
  kind = "an integer " if integer else ""
  if lo is None and hi is None:
    return kind.strip()
  if hi is None:
    return f"{kind}{'>' if lo_open else '>='} {lo}"
  if lo is None:
    return f"{kind}{'<' if hi_open else '<='} {hi}"
  return f"{kind}in {'(' if lo_open else '['}{lo}, {hi}{')' if hi_open else ']'}"


def check_float_scalar(
  name: str,
  value: Any,
  *,
  positive: bool = False,
  open_unit: bool = False,
  allow_traced: bool = True,
) -> None:
  """`check_real` with the two ranges hyperparameters use: `> 0` (`positive`) or `(0, 1)`."""
  hi = 1 if open_unit else None
  lo = 0 if (positive or open_unit) else None
  check_real(name, value, lo=lo, hi=hi, lo_open=True, hi_open=True, allow_traced=allow_traced)


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
