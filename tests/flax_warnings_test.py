"""The Flax wrappers raise no deprecation warning of their own, and sown weights stay retrievable.

flax 0.12 deprecates `nnx.Module.sow` outside `nnx.capture` (a
`DeprecationWarning` attributed to the caller, here gsparse). Every way of
reading the sown weights is run with gsparse-originated deprecation warnings
turned into errors.
"""

from __future__ import annotations

import warnings

import flax.linen as nn
import jax
import numpy as np
from flax import nnx

import gsparse.flax as gf

B, T, D, HEADS, K = 2, 6, 8, 2, 3


def _nnx_layer():
  return nnx.MultiHeadAttention(
    num_heads=HEADS,
    in_features=D,
    decode=False,
    attention_fn=gf.topk_attention_fn(k=K),
    rngs=nnx.Rngs(0),
  )


def _check_weights(w):
  assert w.shape == (B, HEADS, T, T)
  np.testing.assert_allclose(np.asarray(w).sum(-1), 1.0, atol=1e-5)
  np.testing.assert_array_equal((np.asarray(w) > 0).sum(-1), K)


def _no_gsparse_deprecations():
  ctx = warnings.catch_warnings()
  ctx.__enter__()
  warnings.simplefilter("ignore", DeprecationWarning)  # flax's and jax's own, if any
  warnings.filterwarnings("error", category=DeprecationWarning, module=r"gsparse\b")
  return ctx


def test_sown_weights_without_deprecation_warnings():
  x = jax.random.normal(jax.random.key(0), (B, T, D))
  ctx = _no_gsparse_deprecations()
  try:
    # linen: the "intermediates" collection.
    layer = nn.MultiHeadDotProductAttention(
      num_heads=HEADS, qkv_features=D, attention_fn=gf.topk_attention_fn(k=K)
    )
    params = layer.init(jax.random.key(1), x)
    _, inter = layer.apply(params, x, sow_weights=True, mutable=["intermediates"])
    (w,) = inter["intermediates"]["attention_weights"]
    _check_weights(w)
    # nnx inside nnx.capture (flax 0.12's way): the captured intermediates.
    m = _nnx_layer()
    y, inter = nnx.capture(m, nnx.Intermediate)(x, sow_weights=True)
    (w_captured,) = inter["attention_weights"].get_value()
    _check_weights(w_captured)
    assert not hasattr(m, "attention_weights")
    # nnx outside it (the earlier way): the module attribute, one entry per call.
    y2 = m(x, sow_weights=True)
    m(x, sow_weights=True)
    first, second = m.attention_weights.get_value()
    np.testing.assert_array_equal(first, w_captured)
    np.testing.assert_array_equal(second, w_captured)
    np.testing.assert_array_equal(y2, y)
  finally:
    ctx.__exit__(None, None, None)
