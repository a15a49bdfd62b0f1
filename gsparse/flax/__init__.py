"""Flax integration: top-k attention for linen and nnx models.

`import gsparse.flax` (it is not imported by `import gsparse`):

* `topk_attention_fn(k=...)`: an `attention_fn` for
  `flax.linen.MultiHeadDotProductAttention` and `flax.nnx.MultiHeadAttention`.
* k policies: `FixedK`, `PowerLawK` (k = alpha n^C), `CertifiedK`.
* `sparse_attention`: the pure function behind it.
* Layer selection by weight norm: `rank_attention_layers`,
  `select_sparse_layers`, `attention_fn_for`, `configure_nnx`.
"""

from gsparse.flax.attention import (
  SparseAttentionResult,
  TopKAttentionFn,
  certified_num_keys,
  dense_weights,
  sparse_attention,
  topk_attention_fn,
)
from gsparse.flax.layers import (
  AttentionLayerReport,
  attention_fn_for,
  configure_nnx,
  find_attention_layers,
  interaction_singular_values,
  predicted_support,
  rank_attention_layers,
  select_sparse_layers,
)
from gsparse.flax.policies import CertifiedK, FixedK, KPolicy, PowerLawK, as_policy

__all__ = [
  "AttentionLayerReport",
  "CertifiedK",
  "FixedK",
  "KPolicy",
  "PowerLawK",
  "SparseAttentionResult",
  "TopKAttentionFn",
  "as_policy",
  "attention_fn_for",
  "certified_num_keys",
  "configure_nnx",
  "dense_weights",
  "find_attention_layers",
  "interaction_singular_values",
  "predicted_support",
  "rank_attention_layers",
  "select_sparse_layers",
  "sparse_attention",
  "topk_attention_fn",
]
