"""Rigorous sparsity and top-k error bounds for attention on Gaussian input.

Setting (docs/theory.md, section 2): rows `x_i ~ N(0, sigma^2 I_d)` i.i.d.,
scores `s_ij = x_i^T M x_j` with `M = scale * W_Q W_K^T`, `p_i = softmax(s_i)`
over all `n` keys (the diagonal included). Given `x_i`, the `n - 1`
off-diagonal scores are i.i.d. `N(0, tau_i^2)` with `tau_i = sigma ||M^T x_i||`.

Everything here is a pure function of scalars (and of weight norms), built from
`jnp` only, so it runs under `jax.jit` and `jax.vmap` over every argument, `n`
included (all arithmetic is in floating point). It works in float32 and uses
float64 when `jax_enable_x64` is on; delicate quantities are kept in log space.

Public pieces (each proven in docs/theory.md):

* `interaction_norms`, `interaction_norms_from_weights`: the three norms of a
  matrix that the bounds need.
* `tau_range`: an interval holding every `tau_i` with high probability.
* `sparsity_bound` (Theorem 1) and its inverse `sparsity_eps_bound`;
  `row_sparsity_bound` (Theorem 1R), per row given its own tau_i.
* `topk_error_bound` (Theorem 2) and `value_norm_bound`; `row_tail_bound`
  (Theorem 2R), the top-k tail mass per row given its own tau_i.
* `causal_sparsity_bound`, `causal_tail_bound` (Theorems 1C, 2C): the same
  under a causal mask (row i sees i keys).
* `binomial_upper_quantile`: the exact binomial quantile through `betainc`.
* The n^C view: `power_law_k`, `power_law_error_bound`,
  `predicted_tail_mass`, `predicted_effective_support`, `rem_boundaries`,
  `rem_regime`; the proven converse `head_mass_exceeds_prob` (Theorems R1, R1'),
  the proven sufficiency `tail_mass_exceeds_prob` (Theorem R3) and the
  collapsed-phase limit `collapsed_tail_mean` (Theorem R6).
* `value_factor_bound` and `row_value_error_bound` (Lemma V): the value factor
  from isotropy, given the row's scores, replacing `2 max_j ||v_j||`;
  `isotropic_error_bound` (Theorem 2V): Lemma V's split made a-priori.
* `rank_layers_by_sparsity`: which layers are sparsest, from their weights.

The deterministic certificate (fact 4) lives in `gsparse.certificate` and is
re-exported here as `tail_mass_certificate` / `output_error_certificate`;
the multi-gap certificates (`multi_gap_tail_bound` on a few more order statistics,
`band_count_tail_bound` on counts of dropped logits in bands), is in `gsparse.bounds.certificates`.

Arguments whose values are known at trace time (Python numbers, NumPy arrays,
closed-over constants under `jit`) are range-checked and raise `ValueError`
naming the argument. Traced arguments (vmapped sweeps) cannot be checked; an
out-of-range traced value gives NaN in the result.
"""

from __future__ import annotations

from gsparse.bounds._common import DEFAULT_DELTA, binomial_upper_quantile
from gsparse.bounds.asymptotics import collapsed_tail_mean, tail_mass_exceeds_prob
from gsparse.bounds.causal import CausalBound, causal_sparsity_bound, causal_tail_bound
from gsparse.bounds.certificates import (
  band_count_tail_bound,
  band_counts,
  dyadic_band_ranks,
  multi_gap_tail_bound,
)
from gsparse.bounds.converse import head_mass_exceeds_prob
from gsparse.bounds.error import ErrorBound, topk_error_bound, value_norm_bound
from gsparse.bounds.layers import LayerRanking, rank_layers_by_sparsity
from gsparse.bounds.norms import InteractionNorms, interaction_norms, interaction_norms_from_weights
from gsparse.bounds.rem import (
  RemBoundaries,
  power_law_error_bound,
  power_law_k,
  predicted_effective_support,
  predicted_tail_mass,
  rem_boundaries,
  rem_regime,
)
from gsparse.bounds.row import row_sparsity_bound
from gsparse.bounds.row_tail import row_tail_bound
from gsparse.bounds.sparsity import (
  SparsityBound,
  SparsityEpsBound,
  sparsity_bound,
  sparsity_eps_bound,
)
from gsparse.bounds.tau import TauRange, tau_range
from gsparse.bounds.value import RowValueBound, row_value_error_bound, value_factor_bound
from gsparse.bounds.value_apriori import IsotropicErrorBound, isotropic_error_bound
from gsparse.certificate import output_error_certificate, tail_mass_certificate

__all__ = [
  "CausalBound",
  "DEFAULT_DELTA",
  "ErrorBound",
  "InteractionNorms",
  "IsotropicErrorBound",
  "LayerRanking",
  "RemBoundaries",
  "RowValueBound",
  "SparsityBound",
  "SparsityEpsBound",
  "TauRange",
  "band_count_tail_bound",
  "band_counts",
  "binomial_upper_quantile",
  "collapsed_tail_mean",
  "causal_sparsity_bound",
  "causal_tail_bound",
  "dyadic_band_ranks",
  "head_mass_exceeds_prob",
  "interaction_norms",
  "interaction_norms_from_weights",
  "isotropic_error_bound",
  "multi_gap_tail_bound",
  "output_error_certificate",
  "power_law_error_bound",
  "power_law_k",
  "predicted_effective_support",
  "predicted_tail_mass",
  "rank_layers_by_sparsity",
  "rem_boundaries",
  "rem_regime",
  "row_sparsity_bound",
  "row_tail_bound",
  "row_value_error_bound",
  "sparsity_bound",
  "sparsity_eps_bound",
  "tail_mass_certificate",
  "tail_mass_exceeds_prob",
  "tau_range",
  "topk_error_bound",
  "value_factor_bound",
  "value_norm_bound",
]
