"""`ModelConfig(pack=True)` / `--pack`: a packed document attends only within itself."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from gsparse.train.model import AttentionSpec, ModelConfig, TransformerLM


@pytest.mark.parametrize("kind", ["dense", "topk"])
def test_packed_documents_do_not_see_each_other(kind):
  """Changing the first document changes no logit of the second (a 0 byte
  starts it) with packing, and does change them without (the control)."""
  tokens = jax.random.randint(jax.random.key(0), (2, 24), 1, 256)
  tokens = tokens.at[:, 9].set(0)  # second document: positions 9..23
  other = tokens.at[:, :9].set((tokens[:, :9] + 7) % 255 + 1)  # a different first document
  for pack in (True, False) if kind == "topk" else (True,):  # one control suffices
    cfg = ModelConfig(d_model=16, num_layers=1, num_heads=2, max_len=24, pack=pack)
    model = TransformerLM(cfg, (AttentionSpec(kind, k=4),))
    params = jax.jit(model.init)(jax.random.key(1), tokens)
    apply = jax.jit(model.apply)
    a, b = apply(params, tokens), apply(params, other)
    moved = float(jnp.max(jnp.abs(a[:, 9:] - b[:, 9:])))
    if pack:
      np.testing.assert_allclose(a[:, 9:], b[:, 9:], atol=1e-5)
    else:
      assert moved > 1e-3
