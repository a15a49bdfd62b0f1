"""Which layers to sparsify: rank attention layers by their weight norms.

The paper's practical insight: attention on Gaussian-like input is sparser
when the interaction matrix `M = scale * W_Q W_K^T` is larger, so layers with
large `||W_Q W_K^T||` are the first to sparsify. This module walks a model's
parameters (a linen params dict, an nnx Module or nnx State), finds every
attention layer (a `query/kernel` with a sibling `key/kernel`, as in
`flax.linen.MultiHeadDotProductAttention` and `flax.nnx.MultiHeadAttention`),
computes per head the singular values of `M`, and ranks the layers with the
package's one layer ranking, `gsparse.bounds.layers.rank_by_expected_tau`:
the random-energy-model effective support (`predicted_effective_support`,
docs/theory.md section 6) at each head's `sqrt(E tau^2) = sigma^2 ||M||_F`,
layers ordered by the mean log support of their heads. The support is a
leading-order prediction, not a bound: it ignores the diagonal score `s_ii`
and non-Gaussian inputs.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any, NamedTuple

import jax
import numpy as np

from gsparse import _checks
from gsparse.bounds.layers import rank_by_expected_tau
from gsparse.bounds.norms import interaction_singular_values
from gsparse.bounds.rem import _log_effective_support
from gsparse.flax.attention import topk_attention_fn
from gsparse.flax.policies import KPolicy, as_policy

LayerConfig = dict[str, Any]  # path -> k (int or policy) or None (dense)


class AttentionLayerReport(NamedTuple):
  """Weight-norm statistics of one attention layer.

  Attributes:
    path: "/"-joined module path of the layer (without a leading "params").
    singular_values: `[heads, h]` singular values of `M` per query head.
    fro_norm: `[heads]` `||M||_F`.
    op_norm: `[heads]` `||M||_2`.
    tau2: `[heads]` expected score variance `sigma^4 ||M||_F^2`.
    predicted_support: `[heads]` predicted effective support (keys per query)
      at sequence length `seq_len` (`predicted_support`).
    seq_len: the sequence length of the prediction.
  """

  path: str
  singular_values: np.ndarray
  fro_norm: np.ndarray
  op_norm: np.ndarray
  tau2: np.ndarray
  predicted_support: np.ndarray
  seq_len: int

  @property
  def layer_support(self) -> float:
    """The layer's predicted support: the largest over its heads (one k serves all)."""
    return float(np.max(self.predicted_support))


def _key_name(k) -> Any:
  for attr in ("key", "name", "idx"):
    if hasattr(k, attr):
      return getattr(k, attr)
  return str(k)


def _as_tree(params) -> Any:
  """A nested dict of arrays from linen variables, an nnx Module or nnx State."""
  from flax import nnx

  if isinstance(params, nnx.Module):
    params = nnx.state(params, nnx.Param)
  if isinstance(params, nnx.State):
    params = nnx.to_pure_dict(params)
  return params


def find_attention_layers(params) -> dict[str, tuple[np.ndarray, np.ndarray]]:
  """Attention layers of a model: path -> `(W_Q [d, N, h], W_K [d, K, h])`.

  Args:
    params: linen variables or params (nested dict), an nnx Module or State.

  Returns:
    Ordered dict (in tree order) from "/"-joined layer path to the query and
    key kernels.
  """
  leaves = jax.tree_util.tree_flatten_with_path(_as_tree(params))[0]
  by_path = {tuple(_key_name(k) for k in path): leaf for path, leaf in leaves}
  layers = {}
  for path, leaf in by_path.items():
    if len(path) < 2 or path[-2:] != ("query", "kernel"):
      continue
    key_kernel = by_path.get(path[:-2] + ("key", "kernel"))
    if key_kernel is None:
      continue
    prefix = path[:-2]
    if prefix and prefix[0] == "params":
      prefix = prefix[1:]
    w_q, w_k = np.asarray(leaf), np.asarray(key_kernel)
    if w_q.ndim != 3 or w_k.ndim != 3 or w_q.shape[0] != w_k.shape[0]:
      raise ValueError(
        f"attention layer {'/'.join(map(str, prefix))!r}: query/key kernels must be "
        f"[d, heads, head_dim], got {w_q.shape} and {w_k.shape}"
      )
    layers["/".join(map(str, prefix))] = (w_q, w_k)
  return layers


def predicted_support(singular_values, *, seq_len: int, sigma: float = 1.0) -> np.ndarray:
  """Predicted effective support of attention rows per head, from the singular values of `M`.

  `predicted_effective_support(seq_len, sigma^2 ||M||_F)` (docs/theory.md
  section 6), the prediction `rank_attention_layers` ranks by.

  Args:
    singular_values: `[..., r]` singular values of `M`.
    seq_len: number of keys `n`.
    sigma: input standard deviation per coordinate.

  Returns:
    `[...]` supports in `[1, seq_len]`, non-increasing in every singular value.
  """
  _checks.check_int("seq_len", seq_len, minimum=1)
  _checks.check_float_scalar("sigma", sigma, positive=True, allow_traced=False)
  sv = np.asarray(singular_values, np.float64)
  tau = float(sigma) ** 2 * np.sqrt(np.sum(sv * sv, axis=-1))
  return np.exp(_log_effective_support(np.float64(seq_len), tau))


def rank_attention_layers(
  params, *, seq_len: int, sigma: float = 1.0, scale: float | None = None
) -> list[AttentionLayerReport]:
  """Reports for every attention layer, the sparsest first (`rank_by_expected_tau`).

  Args:
    params: linen variables or params, an nnx Module or State.
    seq_len: sequence length at which sparsity is predicted.
    sigma: input standard deviation per coordinate (1 after LayerNorm).
    scale: logit scale; default `1 / sqrt(head_dim)` (flax's).

  Returns:
    List of `AttentionLayerReport`, sparsest first: by the mean over heads of
    the log predicted support, ties by the larger mean tau, then tree order.

  Example:
    >>> import jax, jax.numpy as jnp
    >>> from flax import nnx
    >>> from gsparse.flax import rank_attention_layers
    >>> class Two(nnx.Module):
    ...   def __init__(self, rngs):
    ...     kw = dict(num_heads=2, in_features=8, decode=False, rngs=rngs)
    ...     self.a = nnx.MultiHeadAttention(**kw)
    ...     self.b = nnx.MultiHeadAttention(**kw)
    ...     self.b.query.kernel[...] *= 3.0
    >>> [r.path for r in rank_attention_layers(Two(nnx.Rngs(0)), seq_len=64)]
    ['b', 'a']
  """
  _checks.check_int("seq_len", seq_len, minimum=1)
  _checks.check_float_scalar("sigma", sigma, positive=True, allow_traced=False)
  layers = find_attention_layers(params)
  svs = [interaction_singular_values(w_q, w_k, scale=scale) for w_q, w_k in layers.values()]
  fros = [np.sqrt(np.sum(sv**2, axis=-1)) for sv in svs]
  taus = [float(sigma) ** 2 * fro for fro in fros]
  if not layers:
    return []
  order, supports, _ = rank_by_expected_tau(taus, n=seq_len)
  reports = [
    AttentionLayerReport(
      path=path,
      singular_values=sv,
      fro_norm=fro,
      op_norm=sv[:, 0],
      tau2=tau**2,
      predicted_support=support,
      seq_len=seq_len,
    )
    for path, sv, fro, tau, support in zip(layers, svs, fros, taus, supports, strict=True)
  ]
  return [reports[i] for i in order]


def select_sparse_layers(
  params,
  *,
  k: KPolicy | int,
  seq_len: int,
  num_layers: int | None = None,
  max_support: float | None = None,
  sigma: float = 1.0,
  scale: float | None = None,
) -> LayerConfig:
  """A config that sparsifies the layers predicted sparsest and keeps the rest dense.

  A layer is sparsified when it is among the `num_layers` sparsest (if
  given) and its predicted support is at most `max_support` (default: the
  number of keys `k` keeps at `seq_len`).

  Args:
    params: linen variables or params, an nnx Module or State.
    k: the k (int or policy) for the sparsified layers.
    seq_len: sequence length at which sparsity is predicted.
    num_layers: at most this many layers are sparsified (None: no cap).
    max_support: largest predicted support a sparsified layer may have.
    sigma: input standard deviation per coordinate.
    scale: logit scale; default `1 / sqrt(head_dim)`.

  Returns:
    Dict in tree order: layer path -> `k` (sparsify) or None (keep dense).
  """
  policy = as_policy(k)
  if num_layers is not None:
    _checks.check_int("num_layers", num_layers, minimum=0)
  if max_support is None:
    max_support = float(policy.num_keys(seq_len))
  else:
    _checks.check_float_scalar("max_support", max_support, positive=True, allow_traced=False)
  ranked = rank_attention_layers(params, seq_len=seq_len, sigma=sigma, scale=scale)
  chosen = [r.path for r in ranked if r.layer_support <= max_support]
  if num_layers is not None:
    chosen = chosen[:num_layers]
  order = list(find_attention_layers(params))
  return {path: (k if path in chosen else None) for path in order}


def attention_fn_for(config: Mapping[str, Any], path: str, *, api: str = "linen", **kwargs):
  """The `attention_fn` that `config` gives the layer at `path`.

  Args:
    config: path -> k (int or policy) or None, e.g. from `select_sparse_layers`.
    path: the layer's path as in the config; a path not in the config is dense.
    api: "linen" or "nnx": which flax dense attention to return for None.
    **kwargs: forwarded to `topk_attention_fn` (selection, implementation, ...).

  Returns:
    `topk_attention_fn(k=config[path], **kwargs)`, or flax's own
    `dot_product_attention` when the layer stays dense.
  """
  if api not in ("linen", "nnx"):
    raise ValueError(f"api={api!r} must be 'linen' or 'nnx'")
  k = config.get(path)
  if k is not None:
    return topk_attention_fn(k, **kwargs)
  if api == "linen":
    import flax.linen as nn

    return nn.dot_product_attention
  from flax import nnx

  return nnx.dot_product_attention


def configure_nnx(model, config: Mapping[str, Any], **kwargs) -> list[str]:
  """Sets, in place, the `attention_fn` of every configured nnx attention layer.

  Args:
    model: an nnx Module containing `nnx.MultiHeadAttention` layers.
    config: path -> k or None; paths as returned by `find_attention_layers`.
    **kwargs: forwarded to `topk_attention_fn`.

  Returns:
    The paths that were changed.

  Raises:
    ValueError: if a config path names no `nnx.MultiHeadAttention`.
  """
  from flax import nnx

  modules = {
    "/".join(map(str, p)): m
    for p, m in nnx.iter_modules(model)
    if isinstance(m, nnx.MultiHeadAttention)
  }
  missing = sorted(set(config) - set(modules))
  if missing:
    raise ValueError(f"config paths {missing} are not nnx.MultiHeadAttention layers of the model")
  for path in config:
    modules[path].attention_fn = attention_fn_for(config, path, api="nnx", **kwargs)
  return list(config)
