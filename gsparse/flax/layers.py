"""Which layers to sparsify: rank attention layers by their weight norms.

The paper's practical insight: attention on Gaussian-like input is sparser
when the interaction matrix `M = scale * W_Q W_K^T` is larger, so layers with
large `||W_Q W_K^T||` are the first to sparsify. This module walks a model's
parameters (a linen params dict, an nnx Module or nnx State), finds every
attention layer (a `query/kernel` with a sibling `key/kernel`, as in
`flax.linen.MultiHeadDotProductAttention` and `flax.nnx.MultiHeadAttention`),
computes per head the singular values of `M` and a predicted effective
support, ranks the layers and returns a config that sparsifies the sparsest.

The predictor is `predicted_support`, the only place where norms become a
prediction (swap it for the certified bounds of `gsparse.bounds` when those
are wanted). It uses the Gaussian-score picture: given a query `x_i`, the
scores `s_ij = x_i^T M x_j` over keys are i.i.d. `N(0, tau_i^2)` with
`tau_i^2 = sigma^2 ||M^T x_i||^2` and `E tau_i^2 = sigma^4 ||M||_F^2`; for
i.i.d. Gaussian scores the effective support `1 / sum_j p_j^2` is about
`n exp(-tau^2)` (second-moment estimate, accurate while `tau^2` is small
against `log n`). Averaging `exp(-tau_i^2)` over `x_i ~ N(0, sigma^2 I)`
gives, with `s_1, s_2, ...` the singular values of `M`,

    predicted_support = max(1, n * prod_j (1 + 2 sigma^4 s_j^2)^(-1/2)).

It is a heuristic prediction, not a bound: it ignores the diagonal score
`s_ii` and non-Gaussian inputs. Only its ordering of layers is relied on.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any, NamedTuple

import jax
import numpy as np

from gsparse import _checks
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
    predicted_support: `[heads]` predicted mean effective support (keys per
      query) at sequence length `seq_len`.
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


def interaction_singular_values(
  w_q: np.ndarray, w_k: np.ndarray, *, scale: float | None = None
) -> np.ndarray:
  """Singular values of `M_n = scale * W_Q[:, n] W_K[:, kv(n)]^T` per query head.

  Computed from `h x h` factors (QR of each kernel), so the cost is
  `O(d h^2)` per head, never `O(d^3)`.

  Args:
    w_q: `[d, N, h]` query kernel.
    w_k: `[d, K, h]` key kernel, `N % K == 0` (grouped-query heads).
    scale: logit scale; default `1 / sqrt(h)`.

  Returns:
    `[N, h]` singular values in decreasing order (float64).
  """
  w_q, w_k = np.asarray(w_q, np.float64), np.asarray(w_k, np.float64)
  n, kh, h = w_q.shape[1], w_k.shape[1], w_q.shape[2]
  if kh == 0 or n % kh:
    raise ValueError(f"query heads {n} must be a multiple of key heads {kh}")
  scale = 1.0 / np.sqrt(h) if scale is None else float(scale)
  out = []
  for head in range(n):
    _, r_q = np.linalg.qr(w_q[:, head, :])
    _, r_k = np.linalg.qr(w_k[:, head // (n // kh), :])
    out.append(np.linalg.svd(scale * r_q @ r_k.T, compute_uv=False))
  return np.stack(out)


def predicted_support(singular_values, *, seq_len: int, sigma: float = 1.0) -> np.ndarray:
  """Predicted mean effective support of attention rows (see the module docstring).

  Args:
    singular_values: `[..., r]` singular values of `M`.
    seq_len: number of keys `n`.
    sigma: input standard deviation per coordinate.

  Returns:
    `[...]` `max(1, n * prod_j (1 + 2 sigma^4 s_j^2)^(-1/2))`, decreasing in
    every singular value.
  """
  _checks.check_int("seq_len", seq_len, minimum=1)
  _checks.check_float_scalar("sigma", sigma, positive=True, allow_traced=False)
  s2 = np.square(np.asarray(singular_values, np.float64))
  log_frac = -0.5 * np.sum(np.log1p(2.0 * sigma**4 * s2), axis=-1)
  return np.clip(seq_len * np.exp(log_frac), 1.0, seq_len)


def rank_attention_layers(
  params, *, seq_len: int, sigma: float = 1.0, scale: float | None = None
) -> list[AttentionLayerReport]:
  """Reports for every attention layer, the sparsest (smallest predicted support) first.

  Args:
    params: linen variables or params, an nnx Module or State.
    seq_len: sequence length at which sparsity is predicted.
    sigma: input standard deviation per coordinate (1 after LayerNorm).
    scale: logit scale; default `1 / sqrt(head_dim)` (flax's).

  Returns:
    List of `AttentionLayerReport`, sorted by `layer_support` (ties: tree order).

  Example:
    >>> import jax, jax.numpy as jnp
    >>> from flax import nnx
    >>> from gsparse.flax import rank_attention_layers
    >>> class Two(nnx.Module):
    ...   def __init__(self, rngs):
    ...     kw = dict(num_heads=2, in_features=8, decode=False, rngs=rngs)
    ...     self.a = nnx.MultiHeadAttention(**kw)
    ...     self.b = nnx.MultiHeadAttention(**kw)
    ...     self.b.query.kernel.value *= 3.0
    >>> [r.path for r in rank_attention_layers(Two(nnx.Rngs(0)), seq_len=64)]
    ['b', 'a']
  """
  _checks.check_int("seq_len", seq_len, minimum=1)
  reports = []
  for path, (w_q, w_k) in find_attention_layers(params).items():
    sv = interaction_singular_values(w_q, w_k, scale=scale)
    fro = np.sqrt(np.sum(sv**2, axis=-1))
    reports.append(
      AttentionLayerReport(
        path=path,
        singular_values=sv,
        fro_norm=fro,
        op_norm=sv[:, 0],
        tau2=float(sigma) ** 4 * fro**2,
        predicted_support=predicted_support(sv, seq_len=seq_len, sigma=sigma),
        seq_len=seq_len,
      )
    )
  return sorted(reports, key=lambda r: r.layer_support)


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
