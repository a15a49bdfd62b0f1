"""Flax integration: top-k attention for linen and nnx models.

`import gsparse.flax` (it is not imported by `import gsparse`):

* `topk_attention_fn(k=...)`: an `attention_fn` for
  `flax.linen.MultiHeadDotProductAttention` and `flax.nnx.MultiHeadAttention`.
* k policies: `FixedK`, `PowerLawK` (k = alpha n^C), `CertifiedK`.
* `sparse_attention`: the pure function behind it.
"""

from gsparse.flax.attention import (
  SparseAttentionResult,
  TopKAttentionFn,
  certified_num_keys,
  dense_weights,
  sparse_attention,
  topk_attention_fn,
)
from gsparse.flax.policies import CertifiedK, FixedK, KPolicy, PowerLawK, as_policy

__all__ = [
  "CertifiedK",
  "FixedK",
  "KPolicy",
  "PowerLawK",
  "SparseAttentionResult",
  "TopKAttentionFn",
  "as_policy",
  "certified_num_keys",
  "dense_weights",
  "sparse_attention",
  "topk_attention_fn",
]
