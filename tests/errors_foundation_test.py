"""Bad input raises a clear error naming the argument, eagerly and under jit."""

import jax
import jax.numpy as jnp
import pytest

import gsparse

Q = jnp.ones((4, 2, 8))
K = jnp.ones((6, 2, 8))
V = jnp.ones((6, 2, 8))
P = jnp.full((3, 5), 0.2)

CASES = [
  # (callable taking no args, error type, message fragment)
  ("k<1", lambda: gsparse.topk_attention(Q, K, V, k=0), ValueError, "k=0"),
  ("k float", lambda: gsparse.topk_attention(Q, K, V, k=2.0), TypeError, "k must be an int"),
  ("k bool", lambda: gsparse.topk_attention(Q, K, V, k=True), TypeError, "k must be an int"),
  (
    "head_dim mismatch",
    lambda: gsparse.dot_product_attention(Q, jnp.ones((6, 2, 4)), V),
    ValueError,
    "head_dim",
  ),
  (
    "heads mismatch",
    lambda: gsparse.dot_product_attention(jnp.ones((4, 3, 8)), K, V),
    ValueError,
    "multiple of key/value heads",
  ),
  (
    "kv length mismatch",
    lambda: gsparse.dot_product_attention(Q, K, jnp.ones((5, 2, 8))),
    ValueError,
    "same sequence length",
  ),
  ("rank mismatch", lambda: gsparse.topk_attention(Q[None], K, V, k=2), ValueError, "same rank"),
  (
    "int dtype",
    lambda: gsparse.topk_attention(Q.astype(jnp.int32), K, V, k=2),
    TypeError,
    "query must have a floating dtype",
  ),
  (
    "mask dtype",
    lambda: gsparse.dot_product_attention(Q, K, V, mask=jnp.ones((2, 4, 6))),
    TypeError,
    "mask must be boolean",
  ),
  (
    "mask shape",
    lambda: gsparse.dot_product_attention(Q, K, V, mask=jnp.ones((3, 4, 6), bool)),
    ValueError,
    "mask with shape",
  ),
  (
    "sigma<=0",
    lambda: gsparse.sample_inputs(jax.random.key(0), n=3, d=2, sigma=0.0),
    ValueError,
    "sigma",
  ),
  (
    "sigma<0",
    lambda: gsparse.sample_inputs(jax.random.key(0), n=3, d=2, sigma=-1.0),
    ValueError,
    "sigma",
  ),
  ("eps>=1", lambda: gsparse.min_sparse_k(P, eps=1.0), ValueError, "eps"),
  ("eps<=0", lambda: gsparse.is_sparse(P, eps=0.0, k=2), ValueError, "eps"),
  ("tail k<1", lambda: gsparse.tail_mass(P, k=0), ValueError, "k=0"),
  (
    "selection",
    lambda: gsparse.topk_attention(Q, K, V, k=2, selection="nope"),
    ValueError,
    "selection",
  ),
]


@pytest.mark.parametrize("name,fn,exc,msg", CASES, ids=[c[0] for c in CASES])
def test_raises_eagerly(name, fn, exc, msg):
  with pytest.raises(exc, match=msg):
    fn()


@pytest.mark.parametrize("name,fn,exc,msg", CASES, ids=[c[0] for c in CASES])
def test_raises_under_jit(name, fn, exc, msg):
  # The checks run at trace time, so the same error comes out of a jitted call.
  with pytest.raises(exc, match=msg):
    jax.jit(lambda x: (fn(), x)[1])(1.0)


def test_traced_array_arguments_raise_under_jit():
  with pytest.raises(TypeError, match="query must have a floating dtype"):
    jax.jit(lambda q: gsparse.topk_attention(q, K, V, k=2))(Q.astype(jnp.int32))
  with pytest.raises(ValueError, match="head_dim"):
    jax.jit(lambda k: gsparse.dot_product_attention(Q, k, V))(jnp.ones((6, 2, 4)))
