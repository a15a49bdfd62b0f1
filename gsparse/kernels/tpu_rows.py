"""Row copies of the token-level Mosaic kernels (forward and backward).

The TPU kernels keep K and V in HBM and copy the listed rows of one query into
VMEM with `pltpu.make_async_copy`, as JAX's TPU paged-attention kernel does.
"""

from __future__ import annotations

import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl


def fetch_rows_tpu(idx_smem, i, head, key_hbm, value_hbm, kbuf, vbuf, sems):
  """Copies the `kp` listed K/V rows of query `i` of `head = (batch, kv head)` into VMEM.

  A masked slot (index < 0) fetches row 0 and then gets a zero value row:
  `0 * NaN` would otherwise reach the output.
  """
  from jax.experimental.pallas import tpu as pltpu

  kp = kbuf.shape[0]

  def copies(c):
    row = jnp.maximum(idx_smem[0, i * kp + c], 0)
    rows = (*head, pl.ds(row, 1))
    ck = pltpu.make_async_copy(key_hbm.at[rows], kbuf.at[pl.ds(c, 1)], sems.at[0])
    cv = pltpu.make_async_copy(value_hbm.at[rows], vbuf.at[pl.ds(c, 1)], sems.at[1])
    return ck, cv

  def start(c, _):
    ck, cv = copies(c)
    ck.start()
    cv.start()
    return _

  def wait(c, _):
    ck, cv = copies(c)
    ck.wait()
    cv.wait()
    return _

  def zero_masked(c, _):
    @pl.when(idx_smem[0, i * kp + c] < 0)
    def _zero():
      vbuf[pl.ds(c, 1), :] = jnp.zeros((1, vbuf.shape[1]), vbuf.dtype)

    return _

  lax.fori_loop(0, kp, start, 0)
  lax.fori_loop(0, kp, wait, 0)  # all copies share two semaphores: zero after the last
  lax.fori_loop(0, kp, zero_masked, 0)
