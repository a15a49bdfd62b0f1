"""No recompilation storms: hot functions compile once per static configuration.

Compilations are counted with `jax.monitoring` (the
`/jax/core/compile/backend_compile_duration` event fires once per XLA compile)
and traces with a Python counter inside the traced function (and
`chex.assert_max_traces`). Each case calls a function with fresh values of the
same shapes; after the first call nothing may compile or trace again.
"""

from __future__ import annotations

import contextlib
import functools

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest

import gsparse

COMPILE_EVENT = "/jax/core/compile/backend_compile_duration"
T, S, N, K, H = 4, 7, 2, 1, 3


@contextlib.contextmanager
def count_compiles():
  """Yields a list whose length is the number of XLA compiles inside the block."""
  events = []

  def listener(name, *_, **__):
    if name == COMPILE_EVENT:
      events.append(name)

  jax.monitoring.register_event_duration_secs_listener(listener)
  try:
    yield events
  finally:
    jax.monitoring.unregister_event_duration_listener(listener)


def _fresh(seed: int):
  rng = np.random.default_rng(seed)
  q = jnp.asarray(rng.standard_normal((T, N, H)), jnp.float32)
  k = jnp.asarray(rng.standard_normal((S, K, H)), jnp.float32)
  v = jnp.asarray(rng.standard_normal((S, K, H)), jnp.float32)
  mask = jnp.asarray(rng.random((N, T, S)) < 0.7)
  idx = jnp.asarray(rng.integers(-1, S, (T, N, 3)), jnp.int32)
  return q, k, v, mask, idx


# name -> f(q, k, v, mask, idx) with every static argument fixed.
HOT = {
  "dot_product_attention": lambda q, k, v, m, i: gsparse.dot_product_attention(q, k, v, mask=m),
  "attention_weights": lambda q, k, v, m, i: gsparse.attention_weights(q, k, mask=m),
  "topk_attention": lambda q, k, v, m, i: gsparse.topk_attention(q, k, v, mask=m, k=3),
  "topk_attention_stats": lambda q, k, v, m, i: gsparse.topk_attention(
    q, k, v, mask=m, k=3, return_stats=True
  ),
  "topk_attention_causal": lambda q, k, v, m, i: gsparse.topk_attention(
    q, k, v, k=2, is_causal=True
  ),
  "sparse_gather_attention": lambda q, k, v, m, i: gsparse.sparse_gather_attention(q, k, v, i),
}


@pytest.mark.parametrize("name", list(HOT))
def test_jitted_traces_and_compiles_once(name):
  traces = []

  def f(*args):
    traces.append(None)
    return HOT[name](*args)

  jf = jax.jit(f)
  jax.block_until_ready(jf(*_fresh(0)))
  inputs = [_fresh(seed) for seed in (1, 2, 3)]
  with count_compiles() as compiles:
    for args in inputs:
      jax.block_until_ready(jf(*args))
  assert len(traces) == 1
  assert compiles == []


@pytest.mark.parametrize(
  "name", ["dot_product_attention", "topk_attention_stats", "sparse_gather_attention"]
)
def test_eager_calls_do_not_recompile(name):
  """Op-by-op (eager) calls reuse their compiled ops: no jit created per call."""
  jax.block_until_ready(HOT[name](*_fresh(0)))
  inputs = [_fresh(seed) for seed in (1, 2)]
  with count_compiles() as compiles:
    for args in inputs:
      jax.block_until_ready(HOT[name](*args))
  assert compiles == []


def test_traced_scale_and_vmap_compile_once():
  """A traced `scale` is an ordinary argument: new values do not recompile; nor does vmap."""

  @jax.jit
  @chex.assert_max_traces(n=1)
  def f(q, k, v, scale):
    return jax.vmap(lambda q: gsparse.topk_attention(q, k, v, k=2, scale=scale))(q)

  q, k, v, _, _ = _fresh(0)
  qs = jnp.stack([q, q + 1])
  jax.block_until_ready(f(qs, k, v, 0.5))
  inputs = [(qs * scale, scale) for scale in (0.1, 2.0, 7.0)]
  with count_compiles() as compiles:
    for qq, scale in inputs:
      jax.block_until_ready(f(qq, k, v, scale))
  assert compiles == []


def test_each_static_configuration_compiles_once():
  """Two values of k: two traces; repeating either compiles nothing."""
  traces = []

  @functools.partial(jax.jit, static_argnames="k")
  def f(q, k_, v, *, k):
    traces.append(k)
    return gsparse.topk_attention(q, k_, v, k=k)

  q, k, v, _, _ = _fresh(0)
  for kk in (2, 5):
    jax.block_until_ready(f(q, k, v, k=kk))
  inputs = [_fresh(seed)[:3] for seed in (1, 2)]
  with count_compiles() as compiles:
    for q, k, v in inputs:
      for kk in (2, 5):
        jax.block_until_ready(f(q, k, v, k=kk))
  assert traces == [2, 5]
  assert compiles == []


def test_checked_mode_does_not_recompile():
  f = gsparse.checked(jax.jit(functools.partial(gsparse.topk_attention, k=3)))
  q, k, v, _, _ = _fresh(0)
  jax.block_until_ready(f(q, k, v))
  inputs = [_fresh(seed)[:3] for seed in (1, 2)]
  with count_compiles() as compiles:
    for q, k, v in inputs:
      jax.block_until_ready(f(q, k, v))
  assert compiles == []


def test_counter_sees_compiles():
  """The compile counter itself works (guards the tests above against vacuity)."""
  x = jnp.arange(11.0)
  with count_compiles() as compiles:
    jax.block_until_ready(jax.jit(lambda x: x * 3.0 + 1.0)(x))
  assert len(compiles) == 1
