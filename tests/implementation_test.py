"""`implementation=`: one resolver, reachable from topk_attention, the gathers and Flax.

Regressions of issue 17: `selection="exact"` with an unknown implementation
listed only three values (and rejected "masked"), and
`topk_attention_fn(k=4, implementation="bogus")` was accepted when built
because its check read a `topk.IMPLEMENTATIONS` that does not exist.
"""

from __future__ import annotations

import re

import jax
import numpy as np
import pytest

import gsparse
from gsparse import flax as gf

EVERY_VALUE = re.escape("(None, 'xla', 'masked', 'pallas')")


@pytest.mark.parametrize("selection", ["full", "exact", "block"])
def test_one_message_lists_every_value(selection):
  q, k, v = jax.random.normal(jax.random.key(0), (3, 8, 1, 4))
  with pytest.raises(ValueError, match=f"implementation='bogus' must be one of {EVERY_VALUE}"):
    gsparse.topk_attention(q, k, v, k=2, selection=selection, implementation="bogus")
  idx = np.zeros((8, 1, 2), np.int32)
  with pytest.raises(ValueError, match=f"must be one of {EVERY_VALUE}"):
    gsparse.sparse_gather_attention(q, k, v, idx, implementation="bogus")


def test_exact_selection_takes_masked():
  q, k, v = jax.random.normal(jax.random.key(1), (3, 8, 1, 4))
  want = gsparse.topk_attention(q, k, v, k=3, selection="exact", implementation="xla")
  got = gsparse.topk_attention(q, k, v, k=3, selection="exact", implementation="masked")
  np.testing.assert_allclose(np.asarray(got), np.asarray(want), rtol=1e-5, atol=1e-6)


def test_flax_rejects_bogus_implementation_when_built():
  with pytest.raises(ValueError, match=f"must be one of {EVERY_VALUE}"):
    gf.topk_attention_fn(k=4, implementation="bogus")
  gf.topk_attention_fn(k=4, implementation="masked")  # every valid value is accepted
