"""A non-finite key or value that a row cannot attend never reaches that row (issue 21).

Block routes select whole key blocks; inside a selected block, `is_causal`
masks some keys for some queries only, so a NaN key or value there used to
reach the masked rows through `0 * NaN` in the `p @ v` and backward products.
The Mosaic token kernel read the value row of every masked slot (row 0) the
same way. Each test compares a run with NaN at the hidden position against the
same run with a finite value there: the rows that cannot attend it, and every
gradient of a loss on those rows, must be identical (and finite), while the
rows that do attend it are NaN. Every test failed before the fix.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.experimental.pallas import tpu as pltpu

import gsparse
from gsparse import kernels
from tests import np_reference as ref

SCALE = 0.37


def _inputs(seed, t, s, h=4):
  q, k, v = jax.random.normal(jax.random.key(seed), (3, 1, max(t, s), 1, h))
  return q[:, :t], k[:, :s], v[:, :s]


def _poison(x, pos, value):
  return x.at[0, pos].set(value)


def _check_hidden(fn, q, k, v, pos, hidden_rows):
  """`fn(q, k, v) -> out [1, T, 1, Hv]`; position `pos` is hidden from `hidden_rows` only."""
  fn = jax.jit(fn)  # one compile for both runs, not op-by-op dispatch
  clean = fn(q, _poison(k, pos, 1.0), _poison(v, pos, 1.0))
  out = fn(q, _poison(k, pos, jnp.nan), _poison(v, pos, jnp.nan))
  np.testing.assert_array_equal(out[:, hidden_rows], clean[:, hidden_rows])
  assert np.isfinite(np.asarray(out[:, hidden_rows])).all()
  seen = np.setdiff1d(np.arange(q.shape[1]), np.arange(q.shape[1])[hidden_rows])
  assert np.isnan(np.asarray(out[:, seen])).all()
  return clean, out


def _check_hidden_grads(fn, q, k, v, pos, hidden_rows):
  """Gradients of a loss on `hidden_rows` equal the finite run's (no NaN from `pos`)."""
  w = jax.random.normal(jax.random.key(7), (1, q.shape[1], 1, v.shape[-1]))[:, hidden_rows]

  def loss(q, k, v):
    return jnp.sum(fn(q, k, v)[:, hidden_rows] * w)

  grad = jax.jit(jax.grad(loss, argnums=(0, 1, 2)))
  want = grad(q, _poison(k, pos, 1.0), _poison(v, pos, 1.0))
  got = grad(q, _poison(k, pos, jnp.nan), _poison(v, pos, jnp.nan))
  for name, g, e in zip("qkv", got, want, strict=True):
    assert np.isfinite(np.asarray(g)).all(), f"d{name} has NaN"
    np.testing.assert_allclose(g, e, rtol=1e-6, atol=1e-6, err_msg=f"d{name}")


def _block_xla(q, k, v):
  bidx = jnp.array([[[[0, 1]], [[0, 1]]]])  # both query blocks read both key blocks
  return gsparse.block_sparse_gather_attention(
    q, k, v, bidx, block_q=4, block_k=4, scale=SCALE, is_causal=True, implementation="xla"
  )


def _block_kernel(variant, block):
  def fn(q, k, v):
    nqb = -(-q.shape[1] // block)
    bidx = jnp.broadcast_to(jnp.arange(2), (1, nqb, 1, 2))
    out, _ = kernels.block_gather_attention(
      q, k, v, bidx, block_q=block, block_k=block, scale=SCALE, is_causal=True,
      variant=variant, interpret=variant == "gpu",
    )  # fmt: skip
    return out

  return fn


def test_block_xla_causal_hides_nan_key_and_value():
  # Key 5 lies in the diagonal key block of query block 1: query 4 may not attend it.
  q, k, v = _inputs(0, 8, 8)
  _check_hidden(_block_xla, q, k, v, 5, slice(0, 5))
  # T = 5: no query attends key 5 (query 4 is masked, the rest of its block is padding).
  _check_hidden(_block_xla, q[:, :5], k, v, 5, slice(None))
  _check_hidden_grads(_block_xla, q[:, :5], k, v, 5, slice(None))


def test_block_triton_interpret_causal_hides_nan_key_and_value():
  fn = _block_kernel("gpu", 4)
  q, k, v = _inputs(1, 8, 8)
  _check_hidden(fn, q, k, v, 5, slice(0, 5))
  _check_hidden(fn, q[:, :5], k, v, 5, slice(None))
  _check_hidden_grads(fn, q[:, :5], k, v, 5, slice(None))


@pytest.fixture
def tpu_interpret():
  with pltpu.force_tpu_interpret_mode():
    yield


@pytest.mark.usefixtures("tpu_interpret")
def test_block_mosaic_interpret_causal_hides_nan_key_and_value():
  # Mosaic tiles are multiples of 8; its backward is the XLA code tested above.
  q, k, v = _inputs(2, 16, 16)
  _check_hidden(_block_kernel("tpu", 8), q, k, v, 13, slice(0, 13))


@pytest.mark.usefixtures("tpu_interpret")
def test_token_mosaic_interpret_masked_slot_hides_nan_value():
  # A masked slot (-1) used to copy key/value row 0 and add 0 * v[0]; rows 0
  # and 2 list key 0 only behind -1, row 1 lists it.
  q, k, v = _inputs(3, 3, 9)
  idx = jnp.array([[-1, 3, 4, -1], [0, 2, -1, 5], [6, -1, 7, 8]], jnp.int32)[None, :, None]

  def fn(q, k, v):
    out, _, _ = kernels.token_gather_attention(
      q, k, v, idx, scale=SCALE, block_sizes=kernels.BlockSizes(block_q=1), variant="tpu"
    )
    return out

  _check_hidden(fn, q, k, v, 0, np.array([0, 2]))


def _inf_inputs(seed, n):
  """Causal inputs whose values hold +inf, -inf, both signs and NaN in different
  columns at different positions, and a key with an infinite entry."""
  q, k, v = _inputs(seed, n, n)
  v = v.at[0, 2, 0, 0].set(jnp.inf).at[0, 5, 0, 0].set(jnp.inf)  # col 0: +inf only
  v = v.at[0, 3, 0, 1].set(-jnp.inf).at[0, n - 2, 0, 1].set(jnp.inf)  # col 1: -inf then both
  v = v.at[0, n - 1, 0, 2].set(jnp.nan)  # col 2: NaN in the last row only
  k = k.at[0, 4, 0, 3].set(jnp.inf)  # an infinite logit (either sign) for rows >= 4
  return q, k, v


def _check_against_dense(out, q, k, v):
  """The causal dense reference of np_reference (reads only keys with weight)."""
  n = q.shape[1]
  causal = np.tril(np.ones((n, n), bool))[None, None]  # [1, N, T, S]
  want = ref.topk_reference(q, k, v, kept=causal, scale=SCALE, is_causal=True).output
  out = np.asarray(out, np.float64)
  np.testing.assert_array_equal(np.isnan(out), np.isnan(want))
  np.testing.assert_array_equal(np.isposinf(out), np.isposinf(want))
  np.testing.assert_array_equal(np.isneginf(out), np.isneginf(want))
  assert np.isposinf(want).any() and np.isneginf(want).any() and np.isnan(want).any()
  np.testing.assert_allclose(out, want, rtol=0, atol=2e-6 * 4)


def test_block_xla_inf_values_follow_dense():
  # Failed before: every +-inf read gave NaN, and the +inf key entry gave NaN logits.
  q, k, v = _inf_inputs(4, 8)
  _check_against_dense(_block_xla(q, k, v), q, k, v)


def test_block_triton_interpret_inf_values_follow_dense():
  q, k, v = _inf_inputs(4, 8)
  _check_against_dense(_block_kernel("gpu", 4)(q, k, v), q, k, v)


@pytest.mark.usefixtures("tpu_interpret")
def test_block_mosaic_interpret_inf_values_follow_dense():
  q, k, v = _inf_inputs(5, 16)
  _check_against_dense(_block_kernel("tpu", 8)(q, k, v), q, k, v)


def test_masked_inf_values_follow_dense():
  q, k, v = _inf_inputs(4, 8)
  n = q.shape[1]
  idx = np.where(np.tril(np.ones((n, n), bool)), np.arange(n)[None], -1)[None, :, None]
  out = gsparse.sparse_gather_attention(q, k, v, idx, scale=SCALE, implementation="masked")
  _check_against_dense(out, q, k, v)
