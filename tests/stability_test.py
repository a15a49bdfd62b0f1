"""Numerical stability, fully masked rows, and the NaN/Inf policy (docs/errors.md).

Functions run eagerly on one fixed small shape, so the per-operation compile
cache is shared by all tests here (jit is covered by tests/properties_test.py and
tests/compile_test.py); values are compared against a NumPy float64 reference.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.experimental import checkify

import gsparse

T, S, N, K, H = 3, 6, 2, 1, 4


def _inputs(seed, q_scale=1.0, k_scale=1.0, dtype=jnp.float32):
  rng = np.random.default_rng(seed)
  q = rng.standard_normal((T, N, H)) * q_scale
  k = rng.standard_normal((S, K, H)) * k_scale
  v = rng.standard_normal((S, K, H))
  return tuple(jnp.asarray(x, dtype) for x in (q, k, v))


def _ref_dense(q, k, v, bias=None, mask=None):
  """NumPy float64 dense attention; fully masked rows (or all -inf) give 0."""
  q, k, v = (np.asarray(x, np.float64) for x in (q, k, v))
  kr, vr = (np.repeat(x, N // K, axis=-2) for x in (k, v))
  logits = np.einsum("tnh,snh->nts", q, kr) / np.sqrt(q.shape[-1])
  valid = np.ones(logits.shape, bool)
  if bias is not None:
    bias = np.broadcast_to(np.asarray(bias, np.float64), logits.shape)
    valid &= np.isfinite(bias)
    logits = logits + np.where(valid, bias, 0.0)
  if mask is not None:
    valid &= np.broadcast_to(mask, logits.shape)
  m = np.max(np.where(valid, logits, -np.inf), -1, keepdims=True)
  e = np.where(valid, np.exp(np.where(valid, logits - np.where(np.isfinite(m), m, 0), 0)), 0)
  z = e.sum(-1, keepdims=True)
  return np.einsum("nts,snv->tnv", e / np.where(z > 0, z, 1), vr)


def _all_keys(q, k, v, bias=None, mask=None):
  """Sparse gather over every key, masked ones as -1."""
  idx = jnp.broadcast_to(jnp.arange(S), (T, N, S))
  if mask is not None:
    idx = jnp.where(jnp.swapaxes(jnp.broadcast_to(mask, (N, T, S)), 0, 1), idx, -1)
  gb = None if bias is None else jnp.swapaxes(jnp.broadcast_to(bias, (N, T, S)), 0, 1)
  return gsparse.sparse_gather_attention(q, k, v, idx, bias=gb)


# name -> f(q, k, v, bias, mask); each equals dense attention on these inputs
# (k >= S for top-k), so one float64 reference checks them all.
FUNCTIONS = {
  "dense": gsparse.dot_product_attention,
  "topk": functools.partial(gsparse.topk_attention, k=S),
  "topk_k2": functools.partial(gsparse.topk_attention, k=2),
  "gather": _all_keys,
}
EXACT = ["dense", "topk", "gather"]


@pytest.mark.parametrize("name", EXACT)
@pytest.mark.parametrize(
  "dtype, q_scale, k_scale",
  [
    # float32 logits up to about +-1e4.
    (jnp.float32, 2.5e3, 1.0),
    (jnp.float32, -2.5e3, 1.0),
    # float16 inputs whose logits (about 1e5) overflow float16 but not the
    # float32 accumulation.
    (jnp.float16, 300.0, 300.0),
    # bfloat16 inputs far outside the float16 range (1e30 and 1e-28).
    (jnp.bfloat16, 1e30, 1e-28),
    (jnp.bfloat16, 1e4, 1.0),
  ],
)
def test_large_scores_stay_finite_and_exact(name, dtype, q_scale, k_scale):
  q, k, v = _inputs(0, q_scale, k_scale, dtype)
  out = FUNCTIONS[name](q, k, v)
  assert out.dtype == dtype
  assert bool(jnp.all(jnp.isfinite(out)))
  # Rows of huge logits are near one-hot; the reference uses the quantised inputs.
  ref = _ref_dense(q, k, v)
  tol = {jnp.float32: 1e-3, jnp.float16: 4e-3, jnp.bfloat16: 3e-2}[dtype]
  np.testing.assert_allclose(np.asarray(out, np.float64), ref, atol=tol * np.abs(ref).max())


@pytest.mark.parametrize("name", list(FUNCTIONS))
def test_large_scores_finite_gradients(name):
  q, k, v = _inputs(1, 2.5e3)
  grads = jax.grad(lambda *a: jnp.sum(FUNCTIONS[name](*a) ** 2), argnums=(0, 1, 2))(q, k, v)
  for g in grads:
    assert bool(jnp.all(jnp.isfinite(g)))


def _empty_row_inputs():
  """Mask and bias that empty row (head 0, query 1) in two ways."""
  mask = np.ones((N, T, S), bool)
  mask[0, 1] = False
  bias = np.zeros((N, T, S), np.float32)
  bias[0, 1] = -np.inf
  return jnp.asarray(mask), jnp.asarray(bias)


@pytest.mark.parametrize("name", list(FUNCTIONS))
@pytest.mark.parametrize("how", ["mask", "neg_inf_bias", "mask_and_bias"])
def test_fully_masked_row_zero_output_and_zero_gradient(name, how):
  q, k, v = _inputs(2)
  mask, bias = _empty_row_inputs()
  if how == "mask":
    bias = None
  elif how == "neg_inf_bias":
    mask = None
  else:
    bias = jnp.where(mask, bias, 1.0)  # finite bias on the masked row
  f = FUNCTIONS[name]
  out = f(q, k, v, bias, mask)
  assert bool(jnp.all(out[1, 0] == 0)), out[1, 0]
  assert bool(jnp.all(jnp.isfinite(out)))
  # The row's output has zero gradient; all gradients are finite.
  argnums = (0, 1, 2) if bias is None else (0, 1, 2, 3)
  row_loss = lambda *a: jnp.sum(f(*a[:3], *(a[3:] or (None,)), mask)[1, 0] ** 2)
  all_loss = lambda *a: jnp.sum(f(*a[:3], *(a[3:] or (None,)), mask) ** 2)
  args = (q, k, v) if bias is None else (q, k, v, bias)
  for g in jax.grad(row_loss, argnums=argnums)(*args):
    assert bool(jnp.all(g == 0))
  grads = jax.grad(all_loss, argnums=argnums)(*args)
  for g in grads:
    assert bool(jnp.all(jnp.isfinite(g)))
  assert bool(jnp.all(grads[0][1, 0] == 0))  # the masked query gets no gradient


@pytest.mark.parametrize("name", list(FUNCTIONS))
def test_every_row_masked(name):
  q, k, v = _inputs(3)
  mask = jnp.zeros((N, T, S), bool)
  f = lambda q, k, v: FUNCTIONS[name](q, k, v, None, mask)
  assert bool(jnp.all(f(q, k, v) == 0))
  for g in jax.grad(lambda *a: jnp.sum(f(*a)), argnums=(0, 1, 2))(q, k, v):
    assert bool(jnp.all(g == 0))


def test_neg_inf_bias_matches_mask():
  """A -inf bias masks exactly like mask=False, with and without a mask argument."""
  q, k, v = _inputs(4)
  rng = np.random.default_rng(4)
  keep = jnp.asarray(rng.random((N, T, S)) < 0.5)
  bias = jnp.where(keep, 0.0, -jnp.inf)
  for name in EXACT:
    f = FUNCTIONS[name]
    np.testing.assert_allclose(f(q, k, v, bias, None), f(q, k, v, None, keep), atol=1e-6)
    np.testing.assert_allclose(f(q, k, v, bias, None), _ref_dense(q, k, v, mask=keep), atol=1e-5)


def test_topk_stats_on_empty_rows():
  q, k, v = _inputs(5)
  mask, bias = _empty_row_inputs()
  for kwargs in ({"mask": mask}, {"bias": bias}):
    _, stats = gsparse.topk_attention(q, k, v, k=2, return_stats=True, **kwargs)
    assert float(stats.logsumexp[1, 0]) == -np.inf
    assert float(stats.tail_mass_bound[1, 0]) == 0.0
    assert float(stats.error_bound[1, 0]) == 0.0
    assert bool(jnp.all(stats.indices[1, 0] == -1)) or "bias" in kwargs


# ----------------------------------------------------------------------------
# NaN / Inf policy: propagate by default.


@pytest.mark.parametrize("name", list(FUNCTIONS))
@pytest.mark.parametrize("bad", [np.nan, np.inf])
def test_non_finite_query_propagates_to_its_row_only(name, bad):
  q, k, v = _inputs(6)
  q = q.at[1, 0, 2].set(bad)
  out = FUNCTIONS[name](q, k, v)
  assert bool(jnp.all(jnp.isnan(out[1, 0])))
  others = out.at[1, 0].set(0.0)
  assert bool(jnp.all(jnp.isfinite(others)))


@pytest.mark.parametrize("name", list(FUNCTIONS))
def test_nan_key_propagates_to_rows_that_read_it(name):
  q, k, v = _inputs(7)
  k = k.at[4, 0, 0].set(jnp.nan)
  mask = jnp.ones((N, T, S), bool).at[:, 0, 4].set(False)  # query 0 never reads key 4
  out = FUNCTIONS[name](q, k, v, None, mask)
  assert bool(jnp.all(jnp.isnan(out[1:])))  # a NaN logit is selected by top-k (largest)
  assert bool(jnp.all(jnp.isfinite(out[0])))


@pytest.mark.parametrize("name", list(FUNCTIONS))
def test_nan_value_propagates(name):
  q, k, v = _inputs(8)
  v = v.at[3, 0, 1].set(jnp.nan)
  out = FUNCTIONS[name](q, k, v)
  if name == "topk_k2":
    # Top-k reads only the selected values: NaN exactly where key 3 is selected.
    _, stats = gsparse.topk_attention(q, k, v, k=2, return_stats=True)
    reads = jnp.any(stats.indices == 3, axis=-1)  # [T, N]
    assert bool(jnp.all(jnp.isnan(out[..., 1]) == reads))
    assert bool(jnp.all(jnp.isnan(stats.error_bound)))  # R is NaN for every row
  else:
    assert bool(jnp.all(jnp.isnan(out[..., 1])))


def test_nan_reaches_certificate():
  q, k, v = _inputs(9)
  _, stats = gsparse.topk_attention(q, k.at[2, 0, 0].set(jnp.nan), v, k=2, return_stats=True)
  for x in (stats.logsumexp, stats.tail_mass_bound, stats.error_bound):
    assert bool(jnp.all(jnp.isnan(x)))


def test_float32_overflow_of_logits_gives_nan_not_a_number():
  """Logits beyond the float32 range overflow to inf; the result is NaN, never finite garbage."""
  q, k, v = _inputs(10, 1e20, 1e20)
  assert bool(jnp.all(jnp.isnan(gsparse.dot_product_attention(q, k, v))))


# ----------------------------------------------------------------------------
# Checked mode.


def _raises(fn, *args, match, **kwargs):
  with pytest.raises(checkify.JaxRuntimeError, match=match):
    fn(*args, **kwargs)


@pytest.mark.parametrize("arg", ["query", "key", "value", "bias"])
@pytest.mark.parametrize("bad", [np.nan, np.inf])
def test_checked_names_the_argument(arg, bad):
  q, k, v = _inputs(11)
  args = {"query": q, "key": k, "value": v, "bias": jnp.zeros((N, T, S))}
  args[arg] = args[arg].at[(0,) * args[arg].ndim].set(bad)
  # Eager dense for NaN, a jitted top-k for Inf.
  if np.isnan(bad):
    fn = gsparse.checked(gsparse.dot_product_attention)
  else:
    fn = gsparse.checked(jax.jit(functools.partial(gsparse.topk_attention, k=2)))
  _raises(fn, **args, match=rf"^{arg} contains 1 NaN or Inf values")


def test_checked_allows_neg_inf_bias_and_passes_clean_inputs():
  q, k, v = _inputs(12)
  _, bias = _empty_row_inputs()
  f = gsparse.checked(gsparse.topk_attention)
  out, stats = f(q, k, v, bias, k=2, return_stats=True)
  ref, ref_stats = gsparse.topk_attention(q, k, v, bias, k=2, return_stats=True)
  # checked() runs fn under jit: equal up to float32 rounding of a fused program.
  np.testing.assert_allclose(out, ref, rtol=1e-5, atol=1e-6)
  np.testing.assert_allclose(stats.error_bound, ref_stats.error_bound, rtol=1e-5, atol=1e-6)
  # -inf anywhere else is rejected.
  _raises(f, q, k.at[0, 0, 0].set(-jnp.inf), v, k=2, match="^key contains 1")


def test_checked_flags_nan_output_and_pytree_leaves():
  q, k, v = _inputs(13, 1e20, 1e20)
  _raises(gsparse.checked(gsparse.dot_product_attention), q, k, v, match="^output contains")
  w = gsparse.gaussian.sample_weights(jax.random.key(0), d=4, head_dim=2)
  x = jnp.ones((3, 4))
  bad_w = w._replace(w_v=w.w_v.at[0, 0, 0].set(jnp.nan))
  _raises(
    gsparse.checked(gsparse.gaussian.gaussian_attention), x, bad_w, match=r"^weights\.w_v contains"
  )
  _raises(
    gsparse.checked(gsparse.sparse_gather_attention),
    q,
    k,
    v,
    jnp.zeros((T, N, 1), jnp.int32),
    return_residuals=True,
    match=r"^output\.output contains|^output contains",
  )


def test_checked_under_outer_checkify_and_jit():
  """The checks are functionalised by an outer checkify, so a jitted program can carry them."""
  q, k, v = _inputs(14)
  f = gsparse.checked(functools.partial(gsparse.topk_attention, k=2))
  err, out = jax.jit(checkify.checkify(f))(q, k, v)
  assert err.get() is None and out.shape == (T, N, H)
  err, _ = jax.jit(checkify.checkify(f))(q, k, v.at[0, 0, 0].set(jnp.nan))
  assert err.get().startswith("value contains 1 NaN or Inf values")
