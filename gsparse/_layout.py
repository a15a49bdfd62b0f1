"""Layout helpers shared by the gathers and the kernels (a leaf: depends on jax only).

`gather_kv` reads the listed key/value rows of every query head; `pad_axis`
and `round_up` pad arrays to whole tiles. Both `gsparse.gather` and
`gsparse.kernels` import them from here, so neither imports the other back.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp


def round_up(x: int, multiple: int) -> int:
  """The smallest multiple of `multiple` that is `>= x` (Python ints).

  >>> round_up(10, 8), round_up(16, 8)
  (16, 16)
  """
  return -(-x // multiple) * multiple


def pad_axis(x: jax.Array, axis: int, size: int, value=0) -> jax.Array:
  """`x` padded at the end of `axis` up to `size` entries with `value`.

  Args:
    x: any array.
    axis: the axis to pad (non-negative or negative).
    size: the padded length, `>= x.shape[axis]`.
    value: the fill value.

  Returns:
    `x` itself when it already has `size` entries there, else the padded copy.

  >>> import jax.numpy as jnp
  >>> pad_axis(jnp.array([[1, 2], [3, 4]]), 1, 3, value=-1).tolist()
  [[1, 2, -1], [3, 4, -1]]
  """
  pad = size - x.shape[axis]
  if pad == 0:
    return x
  widths = [(0, 0)] * x.ndim
  widths[axis] = (0, pad)
  return jnp.pad(x, widths, constant_values=value)


def gather_kv(x: jax.Array, indices: jax.Array) -> jax.Array:
  """Gathers `x[..., indices, head(n), :]` for every query head.

  Args:
    x: `[batch..., S, K, D]` keys or values.
    indices: `[batch..., T, N, k]` in `[0, S)`, or negative for "no key": that
      slot gets a zero row, never another key's row (a NaN there would reach
      the output as `0 * NaN`, and every gradient through it); N a multiple of K.

  Returns:
    `[batch..., T, N, k, D]`.
  """
  *batch, s, kh, dd = x.shape
  t, n, k = indices.shape[-3:]
  g = n // kh
  listed = (indices >= 0)[..., None]
  xt = jnp.swapaxes(x, -3, -2)  # [..., K, S, D]
  idx = jnp.moveaxis(jnp.maximum(indices, 0), -3, -2)  # [..., N, T, k]
  idx = idx.reshape(*batch, kh, g * t * k)
  out = jnp.take_along_axis(xt, idx[..., None], axis=-2, mode="clip")  # [..., K, G*T*k, D]
  out = out.reshape(*batch, kh, g, t, k, dd).reshape(*batch, n, t, k, dd)
  return jnp.where(listed, jnp.moveaxis(out, -4, -3), jnp.zeros((), x.dtype))  # [..., T, N, k, D]
