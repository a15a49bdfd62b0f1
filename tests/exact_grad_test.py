"""Derivatives of the fused exact route (`gsparse.selection._exact_grad`).

The default selection on CPU is the chunked exact top-k fused with the
attention over the kept keys. Its forward must not gather the kept keys (only
a backward needs them), its backward must keep O(T k) residuals, and its
derivatives (reverse, forward, second order, under vmap) must equal those of
the "full" reference route, which differentiates the XLA gather directly.
"""

from __future__ import annotations

import jax
import jax.extend.core
import jax.numpy as jnp
import numpy as np
import pytest

import gsparse
from gsparse.selection import _exact_grad

T, N, KH, H, HV, K = 37, 4, 2, 8, 4, 5  # T prime: padded query chunks


def _inputs(seed, batch=(2,)):
  ks = jax.random.split(jax.random.key(seed), 5)
  q = jax.random.normal(ks[0], (*batch, T, N, H))
  k = jax.random.normal(ks[1], (*batch, T, KH, H))
  v = jax.random.normal(ks[2], (*batch, T, KH, HV))
  bias = 0.5 * jax.random.normal(ks[3], (*batch, N, T, T))
  mask = jax.random.uniform(ks[4], (*batch, 1, T, T)) < 0.8
  return q, k, v, bias, mask


def _attention(selection, mask):
  return lambda q, k, v, bias: gsparse.topk_attention(
    q, k, v, bias, mask, k=K, is_causal=True, selection=selection
  )


def _gathers(jaxpr):
  """Output shapes of every `gather` in `jaxpr`, sub-jaxprs (the chunk loop) included."""
  for eqn in jaxpr.eqns:
    if eqn.primitive.name == "gather":
      yield eqn.outvars[0].aval.shape
    for sub in jax.extend.core.jaxprs_in_params(eqn.params):
      yield from _gathers(sub)


def test_forward_gathers_values_but_not_keys():
  """The default forward reads the kept logits back from its chunk's logits:
  it gathers the kept values `[.., k, Hv]` and no kept keys `[.., k, H]`."""
  q, k, v, _, _ = _inputs(0, batch=())
  jaxpr = jax.make_jaxpr(lambda q, k, v: gsparse.topk_attention(q, k, v, k=K, is_causal=True))
  shapes = list(_gathers(jaxpr(q, k, v).jaxpr))
  assert any(s[-2:] == (K, HV) for s in shapes), shapes  # the walk reaches the chunk loop
  assert not any(s[-2:] == (K, H) for s in shapes), shapes


def test_backward_residuals_are_inputs_and_indices():
  """What `jax.vjp` keeps for the backward: the inputs, the `[T, N, k]`
  indices and output-sized arrays; no gathered `[.., k, H]` or `[.., k, Hv]` rows."""
  q, k, v, _, _ = _inputs(1, batch=())
  f = lambda q, k, v: gsparse.topk_attention(q, k, v, k=K, is_causal=True)
  jaxpr = jax.make_jaxpr(lambda *a: jax.tree.leaves(jax.vjp(f, *a)[1]))(q, k, v)
  shapes = [o.aval.shape for o in jaxpr.jaxpr.outvars]
  assert not any(len(s) > 3 or s[-2:] in ((K, H), (K, HV)) for s in shapes), shapes
  total = sum(int(np.prod(s)) for s in shapes)
  assert total <= q.size + k.size + v.size + T * N * K + 2 * T * N * HV + 1, shapes


def test_backward_memory_does_not_grow_with_kept_copies(monkeypatch):
  """Compiled temporaries of forward+backward (`memory_analysis`), the backward in
  chunks of 2**14 gathered entries (the default is 2**21: the same code at
  small n). Copies of the kept keys per query would grow like n k d: from
  k = 8 to 64 they would multiply the temporaries by about 4 (measured on the
  previous route: 9.6 -> 42.7 MiB at n = 1024, 2.2 -> 13.5 at n = 512 with
  k = 8 -> 64, and 13.5 -> 42.7 MiB from n = 512 to 1024 at k = 64)."""
  monkeypatch.setattr(_exact_grad, "CHUNK_ELEMENTS", 1 << 14)

  def temp(n, k):
    x = jnp.ones((n, 1, 32))
    loss = lambda q, kk, v: jnp.sum(gsparse.topk_attention(q, kk, v, k=k) ** 2)
    compiled = jax.jit(jax.grad(loss, (0, 1, 2))).lower(x, x, x).compile()
    return compiled.memory_analysis().temp_size_in_bytes

  big = temp(1024, 64)
  assert big <= 2.5 * temp(1024, 8)  # 1.6 here
  assert big <= 2.5 * temp(512, 64)  # 1.2 here: linear in n at most


@pytest.fixture
def small_chunks(monkeypatch):
  """Backward chunks of 3 query rows (T = 37: padded), so the chunk loop runs."""
  monkeypatch.setattr(_exact_grad, "CHUNK_ELEMENTS", 3 * 2 * N * K * H)


def test_reverse_mode_matches_full(small_chunks):
  """dq, dk, dv and dbias, batch and grouped heads, masked and causal, against
  the "full" route; also `stats.logsumexp`'s cotangent (the dlse path)."""
  del small_chunks
  q, k, v, bias, mask = _inputs(2)
  ct = jax.random.normal(jax.random.key(3), (*q.shape[:-1], HV))

  def loss(selection):
    def f(q, k, v, bias):
      out, st = gsparse.topk_attention(
        q, k, v, bias, mask, k=K, is_causal=True, selection=selection, return_stats=True
      )
      return jnp.sum(out * ct) + jnp.sum(jnp.where(jnp.isfinite(st.logsumexp), st.logsumexp, 0))

    return jax.jit(jax.grad(f, (0, 1, 2, 3)))

  for got, want in zip(loss("auto")(q, k, v, bias), loss("full")(q, k, v, bias), strict=True):
    np.testing.assert_allclose(got, want, rtol=2e-5, atol=2e-5)


def test_forward_mode_second_order_and_vmap_match_full(small_chunks):
  """`jax.jvp`, a Hessian-vector product (grad of grad) and `vmap` of the
  gradient over a batch axis, against the "full" route."""
  del small_chunks
  q, k, v, bias, mask = _inputs(4)
  tq, tk, tv, tb, _ = _inputs(5)
  f, ref = _attention("auto", mask), _attention("full", mask)
  jvp = lambda g: jax.jit(lambda *a: jax.jvp(g, a, (tq, tk, tv, tb))[1])(q, k, v, bias)
  np.testing.assert_allclose(jvp(f), jvp(ref), rtol=2e-5, atol=2e-5)

  def hvp(g):
    dq = lambda q: jax.grad(lambda q: jnp.sum(jnp.sin(g(q, k, v, bias))))(q)
    return jax.jit(lambda q: jax.jvp(dq, (q,), (tq,))[1])(q)

  np.testing.assert_allclose(hvp(f), hvp(ref), rtol=1e-4, atol=1e-4)

  def per_example(selection):
    one = lambda q, k, v, b, m: jax.grad(
      lambda q: jnp.sum(_attention(selection, m)(q, k, v, b) ** 2)
    )(q)
    return jax.jit(jax.vmap(one))(q, k, v, bias, mask)

  np.testing.assert_allclose(per_example("auto"), per_example("full"), rtol=2e-5, atol=2e-5)
