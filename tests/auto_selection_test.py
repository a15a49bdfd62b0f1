"""The default selection "auto": exact, resolved once by platform and shape."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import gsparse
from gsparse.flax import CertifiedK, sparse_attention
from gsparse.selection import ExactSelection, FusedExactSelection, auto_selection

T, S, N, K, H = 40, 40, 4, 2, 8


def _inputs(seed):
  keys = jax.random.split(jax.random.key(seed), 5)
  q = jax.random.normal(keys[0], (2, T, N, H)) * 1.5
  q = q.at[0, 3].set(0.0)  # zero queries: every logit ties
  k = jax.random.normal(keys[1], (2, S, K, H))
  v = jax.random.normal(keys[2], (2, S, K, 3))
  mask = jax.random.bernoulli(keys[3], 0.8, (2, N, T, S))
  bias = jax.random.normal(keys[4], (T, S))
  return q, k, v, bias, mask


def test_default_is_auto_and_gives_full_results():
  """Default vs "full": same indices (ties included), outputs, certificates,
  exact tail mass and gradients, with mask, bias, causality and grouped heads.
  The chunk of 8 rows makes 5 chunks and 5 causal key groups."""
  assert gsparse.topk.DEFAULT_SELECTION == "auto"
  q, k, v, bias, mask = _inputs(0)
  small = ExactSelection(query_chunk=8)

  def run(sel):
    def loss(q, k, v):
      kw = {} if sel is None else {"selection": sel}
      out, st = gsparse.topk_attention(
        q, k, v, bias, mask, k=6, is_causal=True, return_stats=True, **kw
      )
      return jnp.sum(out * jnp.cos(out)), (out, st)

    return jax.jit(jax.value_and_grad(loss, argnums=(0, 1, 2), has_aux=True))(q, k, v)

  (_, (ref, rs)), rgrads = run("full")
  for sel in (None, small):
    (_, (out, st)), grads = run(sel)
    np.testing.assert_array_equal(st.indices, rs.indices)
    np.testing.assert_allclose(out, ref, atol=2e-6)
    np.testing.assert_allclose(st.tail_mass_bound, rs.tail_mass_bound, atol=2e-6)
    np.testing.assert_allclose(st.tail_mass, rs.tail_mass, atol=2e-6)
    for g, rg in zip(grads, rgrads, strict=True):
      np.testing.assert_allclose(g, rg, atol=1e-5)


def test_auto_selection_by_platform():
  q, k = jnp.ones((2, 64, 4, 8)), jnp.ones((2, 4096, 4, 8))
  cpu = auto_selection(q, k, scale=0.5, platform="cpu")
  assert isinstance(cpu, ExactSelection) and cpu.query_chunk == 128  # at most 128 rows
  for s, rows in ((16, 128), (1 << 16, 32)):  # 2**21 logits // S
    chunk = auto_selection(q, jnp.ones((1, s, 1, 8)), scale=0.5, platform="cpu").query_chunk
    assert chunk == rows
  for platform in ("gpu", "tpu"):
    assert isinstance(auto_selection(q, k, scale=0.5, platform=platform), FusedExactSelection)
    # Index-range masks: the fused kernel takes them (gsparse.kernels.select_ranges).
    ranged = auto_selection(q, k, scale=0.5, ranges=True, platform=platform)
    assert isinstance(ranged, FusedExactSelection)
  # A traced scale: the fused kernel compiles its scale in, so the chunked route.
  traced = jax.jit(
    lambda s: jnp.int32(isinstance(auto_selection(q, k, scale=s, platform="gpu"), ExactSelection))
  )
  assert traced(0.5) == 1


def test_fused_selection_matches_full_in_interpret_mode():
  """The GPU/TPU choice of "auto", run by the Pallas interpreter on CPU."""
  q, k, v, bias, mask = _inputs(1)
  q, k, v, mask = q[:1, :16], k[:1, :24], v[:1, :24], mask[:1, :, :16, :24]
  bias = bias[:16, :24]
  run = jax.jit(
    lambda sel, q, k, v: gsparse.topk_attention(
      q, k, v, bias, mask, k=5, is_causal=True, selection=sel, return_stats=True
    ),
    static_argnums=0,
  )
  ref, rs = run("full", q, k, v)
  out, st = run(FusedExactSelection(interpret=True), q, k, v)
  np.testing.assert_array_equal(st.indices, rs.indices)
  np.testing.assert_allclose(out, ref, atol=2e-6)
  np.testing.assert_allclose(st.tail_mass, rs.tail_mass, atol=2e-6)


def test_certified_k_uses_the_exact_tail():
  """With an exact selection, `CertifiedK`'s reported tail is the true dropped
  mass of the keys it kept (float64 NumPy), not just a bound above it."""
  q, k, v, _, _ = _inputs(2)
  q, k, v = q[0], k[0], v[0]
  policy = CertifiedK(ks=(2, 4, 8, 16), tol=0.3)
  res = jax.jit(lambda q, k, v: sparse_attention(q, k, v, policy=policy, return_residuals=True))(
    q, k, v
  )
  q64, k64 = np.asarray(q, np.float64), np.repeat(np.asarray(k, np.float64), N // K, axis=1)
  lg = np.einsum("tnh,snh->tns", q64, k64) / np.sqrt(H)
  w = np.exp(lg - lg.max(-1, keepdims=True))
  w /= w.sum(-1, keepdims=True)
  idx = np.asarray(res.indices)
  kept = np.where(idx >= 0, np.take_along_axis(w, np.maximum(idx, 0), axis=-1), 0.0).sum(-1)
  np.testing.assert_allclose(np.asarray(res.tail_mass_bound), 1.0 - kept, atol=2e-6)
  assert (np.asarray(res.num_kept) < 16).any()  # some rows stop early: not the trivial k


def test_select_keys_row_logsumexp_is_checked():
  q, k, v, _, _ = _inputs(3)
  with pytest.raises(TypeError, match="row_logsumexp must be a bool"):
    gsparse.topk.select_keys(q, k, v, k=2, row_logsumexp=1)
