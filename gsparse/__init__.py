"""gsparse: sparse attention that comes with proof.

Exact and top-k attention in the layout of `jax.nn.dot_product_attention`,
sparsity measures, the paper's Gaussian-input setting and certified bounds.
"""

from gsparse.attention import attention_weights, compute_logits, dot_product_attention
from gsparse.certificate import (
  output_error_certificate,
  tail_mass_certificate,
  value_center_and_radius,
)
from gsparse.gather import GatherResult, sparse_gather_attention
from gsparse.gaussian import (
  Weights,
  gaussian_attention,
  gaussian_attention_weights,
  interaction_matrix,
  project,
  sample_inputs,
  sample_weights,
)
from gsparse.selection import BlockSelection, ExactSelection, LSHSelection, selection_recall
from gsparse.sparsity import (
  ErrorDecomposition,
  effective_support,
  is_sparse,
  min_sparse_k,
  tail_mass,
  topk_error_decomposition,
  topk_mask,
)
from gsparse.topk import TopKStats, topk_attention

__version__ = "0.1.0"

__all__ = [
  "BlockSelection",
  "ErrorDecomposition",
  "ExactSelection",
  "GatherResult",
  "LSHSelection",
  "TopKStats",
  "Weights",
  "attention_weights",
  "compute_logits",
  "dot_product_attention",
  "effective_support",
  "gaussian_attention",
  "gaussian_attention_weights",
  "interaction_matrix",
  "is_sparse",
  "min_sparse_k",
  "output_error_certificate",
  "project",
  "sample_inputs",
  "sample_weights",
  "selection_recall",
  "sparse_gather_attention",
  "tail_mass",
  "tail_mass_certificate",
  "topk_attention",
  "topk_error_decomposition",
  "topk_mask",
  "value_center_and_radius",
]
