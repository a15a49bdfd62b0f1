"""Weight-norm ranking of attention layers and its rank correlation with sparsity.

The theory (THEORY-NOTES fact 8, docs/theory.md) predicts that the logit
spread tau grows with `||M||` for `M = scale * W_Q W_K^T`, so layers with a
larger interaction matrix are sparser. In a pre-LayerNorm block the input to
the projections is `gamma * normalised(x)`, so the LayerNorm scale `gamma` is
folded into `W_Q` and `W_K` before taking the norm (projection biases are
ignored). The ranking itself is the package's one layer ranking,
`gsparse.bounds.layers.rank_by_expected_tau`.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import numpy as np

from gsparse.bounds.layers import rank_by_expected_tau
from gsparse.bounds.norms import interaction_singular_values


def attention_weight_norms(
  params: Mapping, num_layers: int, *, fold_layernorm: bool = True
) -> np.ndarray:
  """`||scale * W_Q W_K^T||_F` per layer and head of a `TransformerLM`.

  Args:
    params: the model's variables (with or without the top-level "params").
    num_layers: number of blocks.
    fold_layernorm: multiply the rows of `W_Q`, `W_K` by the pre-attention
      LayerNorm scale first.

  Returns:
    `[num_layers, num_heads]` float64 Frobenius norms.
  """
  p = params.get("params", params)
  out = []
  for i in range(num_layers):
    blk = p[f"block_{i}"]
    wq = np.asarray(blk["attention"]["query"]["kernel"], np.float64)  # [d, N, H]
    wk = np.asarray(blk["attention"]["key"]["kernel"], np.float64)
    if fold_layernorm:
      gamma = np.asarray(blk["ln_attn"]["scale"], np.float64)[:, None, None]
      wq, wk = gamma * wq, gamma * wk
    sv = interaction_singular_values(wq, wk)  # [N, h]
    out.append(np.sqrt(np.sum(sv * sv, axis=-1)))
  return np.stack(out)


def rank_layers(norms: np.ndarray, num_sparse: int, *, seq_len: int) -> list[int]:
  """Indices (ascending) of the `num_sparse` layers predicted sparsest at `seq_len`.

  `norms` are the per-head `||M||_F` of `attention_weight_norms`, i.e. the
  typical row scale `tau` at unit input variance (the folded LayerNorm scale
  sets the input scale); the order is `rank_by_expected_tau`'s.

  Args:
    norms: `[layers, heads]` (or `[layers]`, one head each) norms.
    num_sparse: how many layers to pick, in `[0, layers]`.
    seq_len: sequence length at which sparsity is predicted.

  Returns:
    Sorted list of layer indices.
  """
  norms = np.asarray(norms, np.float64)
  if norms.ndim == 1:
    norms = norms[:, None]
  if not 0 <= num_sparse <= norms.shape[0]:
    raise ValueError(f"num_sparse={num_sparse} must be in [0, {norms.shape[0]}]")
  order, _, _ = rank_by_expected_tau(norms, n=seq_len)
  return sorted(int(i) for i in order[:num_sparse])


def rankdata(x: Sequence[float]) -> np.ndarray:
  """Ranks 1..n of `x`, ties given their average rank."""
  x = np.asarray(x, np.float64).ravel()
  order = np.argsort(x, kind="stable")
  ranks = np.empty(x.size, np.float64)
  ranks[order] = np.arange(1, x.size + 1, dtype=np.float64)
  # Average the ranks within each group of equal values.
  _, inverse, counts = np.unique(x, return_inverse=True, return_counts=True)
  sums = np.bincount(inverse, weights=ranks)
  return sums[inverse] / counts[inverse]


def spearman(x: Sequence[float], y: Sequence[float]) -> float:
  """Spearman rank correlation: Pearson correlation of the (tie-averaged) ranks.

  Returns NaN when fewer than two points or when either ranking is constant.
  """
  x = np.asarray(x, np.float64).ravel()
  y = np.asarray(y, np.float64).ravel()
  if x.shape != y.shape:
    raise ValueError(f"x and y must have the same size, got {x.size} and {y.size}")
  if x.size < 2:
    return float("nan")
  rx, ry = rankdata(x), rankdata(y)
  rx -= rx.mean()
  ry -= ry.mean()
  den = np.sqrt(np.sum(rx * rx) * np.sum(ry * ry))
  return float(np.sum(rx * ry) / den) if den > 0 else float("nan")
