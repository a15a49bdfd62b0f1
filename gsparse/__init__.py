"""gsparse: sparse attention that comes with proof.

The top level holds the attention core: exact and top-k attention in the
layout of `jax.nn.dot_product_attention`, the sparse gathers and the
selection configs. Everything else lives in a submodule, imported on first
use: `gsparse.sparsity` (measures), `gsparse.gaussian` (the paper's
setting), `gsparse.bounds` (the theorems), `gsparse.certificate`,
`gsparse.flax`, `gsparse.sweep`, `gsparse.atlas`, `gsparse.sharding`,
`gsparse.train` and the rest.

>>> import gsparse
>>> gsparse.bounds.sparsity_bound  # doctest: +ELLIPSIS
<function sparsity_bound at ...>
"""

import importlib as _importlib
import warnings as _warnings

from gsparse._admissible import SegmentIds
from gsparse.attention import attention_weights, compute_logits, dot_product_attention
from gsparse.block_gather import BlockGatherResult, block_sparse_gather_attention
from gsparse.checking import checked
from gsparse.gather import GatherResult, sparse_gather_attention
from gsparse.selection import BlockSelection, ExactSelection, FusedExactSelection, LSHSelection
from gsparse.topk import TopKStats, topk_attention

__version__ = "0.1.0"

__all__ = [
  "BlockGatherResult",
  "BlockSelection",
  "ExactSelection",
  "FusedExactSelection",
  "GatherResult",
  "LSHSelection",
  "SegmentIds",
  "TopKStats",
  "attention_weights",
  "block_sparse_gather_attention",
  "checked",
  "compute_logits",
  "dot_product_attention",
  "sparse_gather_attention",
  "topk_attention",
]

# Submodules reachable as attributes of the package (imported on first use).
_SUBMODULES = frozenset(
  {
    "atlas",
    "attention",
    "benchmark",
    "block_gather",
    "bounds",
    "certificate",
    "checking",
    "cli",
    "figures",
    "flax",
    "gather",
    "gaussian",
    "kernels",
    "report",
    "selection",
    "sharding",
    "sparsity",
    "sweep",
    "topk",
    "train",
  }
)

# Names that were re-exported at the top level before the core was made
# small: still importable from here, with a DeprecationWarning naming the home.
_MOVED = {
  "ErrorBound": "gsparse.bounds",
  "ErrorDecomposition": "gsparse.sparsity",
  "InteractionNorms": "gsparse.bounds",
  "LayerRanking": "gsparse.bounds",
  "RemBoundaries": "gsparse.bounds",
  "SparsityBound": "gsparse.bounds",
  "SparsityEpsBound": "gsparse.bounds",
  "SweepTable": "gsparse.sweep",
  "TauRange": "gsparse.bounds",
  "Weights": "gsparse.gaussian",
  "binomial_upper_quantile": "gsparse.bounds",
  "effective_support": "gsparse.sparsity",
  "gaussian_attention": "gsparse.gaussian",
  "gaussian_attention_weights": "gsparse.gaussian",
  "interaction_matrix": "gsparse.gaussian",
  "interaction_norms": "gsparse.bounds",
  "interaction_norms_from_weights": "gsparse.bounds",
  "is_sparse": "gsparse.sparsity",
  "min_sparse_k": "gsparse.sparsity",
  "output_error_certificate": "gsparse.certificate",
  "power_law_error_bound": "gsparse.bounds",
  "power_law_k": "gsparse.bounds",
  "predicted_effective_support": "gsparse.bounds",
  "predicted_tail_mass": "gsparse.bounds",
  "project": "gsparse.gaussian",
  "rank_layers_by_sparsity": "gsparse.bounds",
  "rem_boundaries": "gsparse.bounds",
  "rem_regime": "gsparse.bounds",
  "run_sweep": "gsparse.sweep",
  "sample_inputs": "gsparse.gaussian",
  "sample_weights": "gsparse.gaussian",
  "selection_recall": "gsparse.selection",
  "sparsity_bound": "gsparse.bounds",
  "sparsity_eps_bound": "gsparse.bounds",
  "tail_mass": "gsparse.sparsity",
  "tail_mass_certificate": "gsparse.certificate",
  "tau_range": "gsparse.bounds",
  "topk_error_bound": "gsparse.bounds",
  "topk_error_decomposition": "gsparse.sparsity",
  "topk_mask": "gsparse.sparsity",
  "value_center_and_radius": "gsparse.certificate",
  "value_norm_bound": "gsparse.bounds",
}


def __getattr__(name: str):
  if name in _SUBMODULES:
    return _importlib.import_module(f"gsparse.{name}")
  if name in _MOVED:
    home = _MOVED[name]
    _warnings.warn(
      f"gsparse.{name} is deprecated; use {home}.{name}", DeprecationWarning, stacklevel=2
    )
    return getattr(_importlib.import_module(home), name)
  raise AttributeError(f"module 'gsparse' has no attribute {name!r}")


def __dir__() -> list[str]:
  return sorted(set(globals()) | _SUBMODULES | set(_MOVED))
