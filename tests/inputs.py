"""Random test inputs shared by the attention tests."""

import jax
import jax.numpy as jnp


def random_qkv(key, batch, t, s, n, kh, h, hv, dtype=jnp.float32, scale=1.0):
  """query `[*batch, t, n, h]`, key `[*batch, s, kh, h]` (times `scale`), value `[*batch, s, kh, hv]`."""
  k1, k2, k3 = jax.random.split(key, 3)
  q = scale * jax.random.normal(k1, (*batch, t, n, h))
  k = scale * jax.random.normal(k2, (*batch, s, kh, h))
  v = jax.random.normal(k3, (*batch, s, kh, hv))
  return q.astype(dtype), k.astype(dtype), v.astype(dtype)
