"""gsparse: sparse attention that comes with proof.

Exact and top-k attention in the layout of `jax.nn.dot_product_attention`,
sparsity measures, the paper's Gaussian-input setting and certified bounds.
"""

from gsparse.attention import attention_weights, compute_logits, dot_product_attention
from gsparse.block_gather import BlockGatherResult, block_sparse_gather_attention
from gsparse.bounds import (
  ErrorBound,
  InteractionNorms,
  LayerRanking,
  RemBoundaries,
  SparsityBound,
  SparsityEpsBound,
  TauRange,
  binomial_upper_quantile,
  interaction_norms,
  interaction_norms_from_weights,
  power_law_error_bound,
  power_law_k,
  predicted_effective_support,
  predicted_tail_mass,
  rank_layers_by_sparsity,
  rem_boundaries,
  rem_regime,
  sparsity_bound,
  sparsity_eps_bound,
  tau_range,
  topk_error_bound,
  value_norm_bound,
)
from gsparse.certificate import (
  output_error_certificate,
  tail_mass_certificate,
  value_center_and_radius,
)
from gsparse.checking import checked
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
from gsparse.selection import (
  BlockSelection,
  ExactSelection,
  FusedExactSelection,
  LSHSelection,
  selection_recall,
)
from gsparse.sparsity import (
  ErrorDecomposition,
  effective_support,
  is_sparse,
  min_sparse_k,
  tail_mass,
  topk_error_decomposition,
  topk_mask,
)
from gsparse.sweep import SweepTable, run_sweep
from gsparse.topk import TopKStats, topk_attention

__version__ = "0.1.0"

__all__ = [
  "BlockGatherResult",
  "ErrorBound",
  "BlockSelection",
  "ErrorDecomposition",
  "ExactSelection",
  "FusedExactSelection",
  "GatherResult",
  "InteractionNorms",
  "LayerRanking",
  "RemBoundaries",
  "SparsityBound",
  "SparsityEpsBound",
  "SweepTable",
  "TauRange",
  "LSHSelection",
  "TopKStats",
  "Weights",
  "attention_weights",
  "binomial_upper_quantile",
  "block_sparse_gather_attention",
  "checked",
  "compute_logits",
  "dot_product_attention",
  "effective_support",
  "gaussian_attention",
  "gaussian_attention_weights",
  "interaction_matrix",
  "interaction_norms",
  "interaction_norms_from_weights",
  "is_sparse",
  "min_sparse_k",
  "output_error_certificate",
  "power_law_error_bound",
  "power_law_k",
  "predicted_effective_support",
  "predicted_tail_mass",
  "project",
  "rank_layers_by_sparsity",
  "rem_boundaries",
  "rem_regime",
  "run_sweep",
  "sample_inputs",
  "sample_weights",
  "selection_recall",
  "sparse_gather_attention",
  "sparsity_bound",
  "sparsity_eps_bound",
  "tail_mass",
  "tail_mass_certificate",
  "tau_range",
  "topk_attention",
  "topk_error_bound",
  "topk_error_decomposition",
  "topk_mask",
  "value_center_and_radius",
  "value_norm_bound",
]
