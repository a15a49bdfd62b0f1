"""Top-k attention as a Flax `attention_fn` (linen and nnx).

`topk_attention_fn(k=...)` returns a callable that plugs into
`flax.linen.MultiHeadDotProductAttention(attention_fn=...)` and
`flax.nnx.MultiHeadAttention(attention_fn=...)`. The maths is the pure
function `sparse_attention`; the callable only adapts flax's keyword
arguments to it.

Layout is flax's (and gsparse's): query `[batch..., T, N, H]`, key/value
`[batch..., S, K, H]`, mask `[batch..., N, T, S]` (True = attend).

Autoregressive decoding: in `decode` mode flax writes the new key into its
cache and passes a mask that admits only the filled cache positions; a masked
key is never selected, so the top-k is taken over the filled part of the cache.

Dropout follows flax: the attention weights (here the weights of the kept
keys, after renormalisation) are multiplied by `keep / (1 - dropout_rate)`.
With `broadcast_dropout=True` the keep mask is drawn exactly as flax draws it
(shape `[1..., T, S]`, shared over batch and heads) and read at the kept
positions, so with `k >= S` the result equals flax's bit for bit; this draws
a `T x S` boolean mask. With `broadcast_dropout=False` one independent draw is
made per kept slot (`[batch..., T, N, k]`), the same distribution as flax's
independent per-entry mask restricted to the kept keys, but not the same bits.
"""

from __future__ import annotations

import dataclasses
import inspect
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
from jax.typing import ArrayLike

import gsparse.topk as _topk
from gsparse import _checks
from gsparse.flax.certified import certified_num_keys, certified_subset  # noqa: F401 (re-exported)
from gsparse.flax.policies import CertifiedK, KPolicy, as_policy
from gsparse.gather import gather_kv, resolve_implementation, sparse_gather_attention
from gsparse.selection import gather_bias, resolve_selection


class SparseAttentionResult(NamedTuple):
  """Output of `sparse_attention(..., return_residuals=True)`.

  Attributes:
    output: `[batch..., T, N, Hv]`.
    indices: `[batch..., T, N, k]` kept key positions (-1 = slot unused).
    weights: `[batch..., T, N, k]` attention weights of the slots, after
      dropout (zero for unused slots).
    num_kept: `[batch..., T, N]` int32 number of keys the policy kept per query
      (`k` for fixed policies, the certified choice for `CertifiedK`).
    tail_mass_bound: `[batch..., T, N]` certified upper bound on the softmax
      mass of the keys that were not kept.
  """

  output: jax.Array
  indices: jax.Array
  weights: jax.Array
  num_kept: jax.Array
  tail_mass_bound: jax.Array


def _topk_kwargs(selection: str | None, implementation: str | None, options) -> dict[str, Any]:
  kwargs = dict(options or {})
  if selection is not None:
    kwargs["selection"] = selection
  if implementation is not None:
    kwargs["implementation"] = implementation
  return kwargs


def check_topk_kwargs(kwargs: dict[str, Any]) -> None:
  """Checks that the installed `gsparse.topk_attention` accepts these keywords."""
  params = inspect.signature(_topk.topk_attention).parameters
  var_kw = any(p.kind is inspect.Parameter.VAR_KEYWORD for p in params.values())
  for name, value in kwargs.items():
    if name not in params and not var_kw:
      raise TypeError(
        f"{name}={value!r}: the installed gsparse.topk_attention has no argument {name!r}"
      )
  # Values through the resolvers topk_attention itself uses: one check, one message.
  if "selection" in kwargs:
    resolve_selection(kwargs["selection"])
  if "implementation" in kwargs:
    resolve_implementation(kwargs["implementation"])


def _gather_kwargs(topk_kwargs: dict[str, Any]) -> dict[str, Any]:
  """The `implementation` for `sparse_gather_attention`, when one was given."""
  impl = topk_kwargs.get("implementation")
  return {} if impl is None else {"implementation": impl}


def _topk_call_kwargs(common: dict[str, Any], topk_kwargs: dict[str, Any], **ranges) -> dict:
  """`common` plus the index-range masks that are given (once: not also in `topk_kwargs`)."""
  for name, val in ranges.items():
    if val is not None:
      if name in topk_kwargs:
        raise ValueError(f"{name} is given both directly and in topk_kwargs")
      common[name] = val
  return common


def _dropout_output(rng, rate, broadcast, weights, value, indices, num_batch, *, precision, dtype):
  """`(weights, output)` after flax-style dropout of the kept weights (see module docstring)."""
  keep = _dropout_keep(rng, rate, broadcast, indices, num_batch, value.shape[-3])
  weights = weights * keep.astype(weights.dtype) / jnp.asarray(1.0 - rate, weights.dtype)
  safe = jnp.where(indices >= 0, indices, 0)
  vg = gather_kv(value, safe).astype(weights.dtype)
  output = jnp.einsum("...tnk,...tnkv->...tnv", weights, vg, precision=precision)
  return weights, output.astype(dtype)


def _dropout_keep(
  rng, rate: float, broadcast: bool, indices: jax.Array, num_batch: int, kv_len: int
) -> jax.Array:
  """Keep mask of the slots, `[batch..., T, N, k]` boolean (see module docstring)."""
  keep_prob = 1.0 - rate
  if broadcast:
    t = indices.shape[-3]
    # Same shape and draw as flax's dot_product_attention_weights.
    keep = jax.random.bernoulli(rng, keep_prob, (1,) * (num_batch + 1) + (t, kv_len))
    keep = keep.reshape(t, kv_len)
    safe = jnp.where(indices >= 0, indices, 0)
    return keep[jnp.arange(t)[:, None, None], safe]
  return jax.random.bernoulli(rng, keep_prob, indices.shape)


# Over 60 lines: the signature mirrors flax's attention_fn keywords plus the
# index-range masks; the body is select, certify (`certified_subset`), gather,
# dropout (`_dropout_output`), each one call.
def sparse_attention(
  query: ArrayLike,
  key: ArrayLike,
  value: ArrayLike,
  bias: ArrayLike | None = None,
  mask: ArrayLike | None = None,
  *,
  policy: KPolicy | int,
  scale: float | None = None,
  is_causal: bool = False,
  dropout_rng: jax.Array | None = None,
  dropout_rate: float = 0.0,
  broadcast_dropout: bool = True,
  deterministic: bool = True,
  precision=None,
  topk_kwargs: dict[str, Any] | None = None,
  return_residuals: bool = False,
  query_seq_lengths: ArrayLike | None = None,
  key_value_seq_lengths: ArrayLike | None = None,
  local_window_size: int | tuple[int, int] | None = None,
  segment_ids: Any = None,
):
  """Top-k attention with a k policy and flax-style dropout.

  With a fixed-size policy, no dropout and no residuals this is one call of
  `gsparse.topk_attention`. Otherwise the keys are selected by
  `gsparse.topk_attention(..., return_stats=True)` and attended by
  `gsparse.sparse_gather_attention` (given the same `implementation`); with
  dropout, the dropped-out weights average the gathered values in XLA.

  Args:
    query: `[batch..., T, N, H]`.
    key: `[batch..., S, K, H]`, `N % K == 0`.
    value: `[batch..., S, K, Hv]`.
    bias: optional, broadcastable to `[batch..., N, T, S]`.
    mask: optional boolean, broadcastable to `[batch..., N, T, S]`; True keeps.
    policy: a `FixedK`, `PowerLawK`, `CertifiedK`, or an int (fixed k).
    scale: logit scale; default `1 / sqrt(H)`.
    is_causal: top-left aligned causal mask.
    dropout_rng: PRNG key, required when dropout is active.
    dropout_rate: probability of dropping a kept attention weight.
    broadcast_dropout: share the dropout mask over batch and heads (flax's
      default).
    deterministic: if True, no dropout.
    precision: einsum precision.
    topk_kwargs: extra keywords for `gsparse.topk_attention` (`selection`,
      `implementation`, ...).
    return_residuals: return a `SparseAttentionResult` instead of the output.
    query_seq_lengths, key_value_seq_lengths, local_window_size, segment_ids:
      index-range masks, forwarded to `gsparse.topk_attention` (see there);
      never a T x S array.

  Returns:
    `[batch..., T, N, Hv]` output in `query.dtype`, or a
    `SparseAttentionResult`.

  Example:
    >>> import jax
    >>> from gsparse.flax import sparse_attention, CertifiedK
    >>> q, k, v = jax.random.normal(jax.random.key(0), (3, 2, 64, 4, 8))
    >>> policy = CertifiedK(ks=(4, 16, 64), tol=0.05)
    >>> res = jax.jit(lambda q, k, v: sparse_attention(
    ...     q, k, v, policy=policy, return_residuals=True))(q, k, v)
    >>> res.output.shape, res.indices.shape, bool(res.tail_mass_bound.max() <= 0.05)
    ((2, 64, 4, 8), (2, 64, 4, 64), True)
  """
  query, key, value = _checks.check_attention_inputs(query, key, value)
  policy = as_policy(policy)
  topk_kwargs = dict(topk_kwargs or {})
  check_topk_kwargs(topk_kwargs)
  _checks.check_float_scalar("dropout_rate", dropout_rate, allow_traced=False)
  if not 0.0 <= float(dropout_rate) < 1.0:
    raise ValueError(f"dropout_rate={dropout_rate!r} must be in [0, 1)")
  use_dropout = not deterministic and float(dropout_rate) > 0.0
  if use_dropout and dropout_rng is None:
    raise ValueError("dropout_rng must be given when deterministic=False and dropout_rate > 0")
  s = key.shape[-3]
  k = policy.num_keys(s)
  certified = isinstance(policy, CertifiedK)
  common = _topk_call_kwargs(
    dict(scale=scale, is_causal=is_causal, precision=precision, **topk_kwargs),
    topk_kwargs,
    query_seq_lengths=query_seq_lengths,
    key_value_seq_lengths=key_value_seq_lengths,
    local_window_size=local_window_size,
    segment_ids=segment_ids,
  )
  if not (use_dropout or certified or return_residuals):
    return _topk.topk_attention(query, key, value, bias, mask, k=k, **common)

  # Selection alone; the certificate comes from the kept logits the exact
  # selections carry (certified), else from the logsumexp of a gather pass
  # below (the stop-gradient pre-pass when certified, else the final pass), so
  # no pass is spent on an output that would be thrown away.
  # With residuals and no CertifiedK, the tail bound below is the selection's
  # certificate: the band counts make it the band-count one on exact routes.
  flags = dict(row_logsumexp=certified, kept_logits=certified)
  flags.update(band_counts=return_residuals and not certified)
  sel = _topk.select_keys(query, key, value, bias, mask, k=k, **flags, **common)
  indices = sel.indices
  num_batch = query.ndim - 3

  num_kept = jnp.full(indices.shape[:-1], k, jnp.int32)
  tail = None
  if certified:
    indices, num_kept, tail = certified_subset(
      sel,
      query,
      key,
      value,
      bias,
      policy=policy,
      scale=scale,
      precision=precision,
      selection=topk_kwargs.get("selection", _topk.DEFAULT_SELECTION),
      implementation=topk_kwargs.get("implementation"),
    )
  res = sparse_gather_attention(
    query,
    key,
    value,
    indices,
    bias=gather_bias(bias, indices, s),
    scale=scale,
    assume_unique=True,
    return_residuals=True,
    precision=precision,
    **_gather_kwargs(topk_kwargs),
  )
  if tail is None:
    tail = _topk.selection_tail_bound(sel, res.logsumexp)
  weights, output = res.weights, res.output
  if use_dropout:
    weights, output = _dropout_output(
      dropout_rng,
      float(dropout_rate),
      broadcast_dropout,
      weights,
      value,
      indices,
      num_batch,
      precision=precision,
      dtype=query.dtype,
    )
  if not return_residuals:
    return output
  return SparseAttentionResult(output, indices, weights, num_kept, tail)


def dense_weights(indices: jax.Array, weights: jax.Array, kv_len: int) -> jax.Array:
  """Scatters `[batch..., T, N, k]` slot weights to dense `[batch..., N, T, S]`.

  Slots with an index outside `[0, kv_len)` are dropped.
  """
  *lead, k = indices.shape
  rows = int(np.prod(lead, dtype=np.int64))
  idx = indices.reshape(rows, k)
  idx = jnp.where((idx >= 0) & (idx < kv_len), idx, kv_len)  # kv_len: out of bounds, dropped
  dense = jnp.zeros((rows, kv_len), weights.dtype)
  dense = dense.at[jnp.arange(rows)[:, None], idx].add(weights.reshape(rows, k), mode="drop")
  return jnp.swapaxes(dense.reshape(*lead, kv_len), -3, -2)


def _sow(module, weights: jax.Array) -> None:
  """Stores `weights` as the module's "attention_weights", where flax's own attention does.

  linen: the "intermediates" collection. nnx inside `nnx.capture(...,
  nnx.Intermediate)`: the captured intermediates (`Module.sow`). nnx outside it:
  the attribute `module.attention_weights`, an `nnx.Intermediate` tuple with one
  entry per call, as `Module.sow` stored it before flax 0.12, which deprecates
  sowing outside `nnx.capture`; it is written here directly, so no warning.
  """
  from flax import nnx  # Imported lazily: only needed when weights are sown.

  if not isinstance(module, nnx.Module):
    module.sow("intermediates", "attention_weights", weights)
  elif hasattr(module, "__captures__"):  # set by nnx.capture for the duration of the call
    module.sow(nnx.Intermediate, "attention_weights", weights)
  elif isinstance(held := getattr(module, "attention_weights", None), nnx.Intermediate):
    held.set_value(held.get_value() + (weights,))
  elif held is None:
    module.attention_weights = nnx.Intermediate((weights,))
  else:
    raise ValueError(
      f"module.attention_weights must be an nnx.Intermediate to sow into, got {type(held).__name__}"
    )


@dataclasses.dataclass(frozen=True)
class TopKAttentionFn:
  """A flax `attention_fn` computing top-k attention (linen and nnx).

  Build it with `topk_attention_fn`. Hashable and immutable, so it can be a
  field of a linen Module and an attribute of an nnx Module.

  Attributes:
    policy: the k policy.
    scale: logit scale; None means `1 / sqrt(head_dim)` (flax's).
    topk_kwargs: extra keywords forwarded to `gsparse.topk_attention`, as a
      sorted tuple of `(name, value)` pairs.
    selection_seed: if not None, `selection_key=jax.random.key(selection_seed)`
      is forwarded too (randomised selections such as LSH need a key; a fixed
      seed keeps the module deterministic).
  """

  policy: KPolicy
  scale: float | None = None
  topk_kwargs: tuple[tuple[str, Any], ...] = ()
  selection_seed: int | None = None

  def __post_init__(self):
    object.__setattr__(self, "policy", as_policy(self.policy))
    if self.scale is not None:
      _checks.check_float_scalar("scale", self.scale, positive=True, allow_traced=False)
    kwargs = dict(self.topk_kwargs)
    if self.selection_seed is not None:
      _checks.check_int("selection_seed", self.selection_seed, minimum=0)
      kwargs["selection_key"] = None
    check_topk_kwargs(kwargs)

  def _topk_kwargs(self) -> dict[str, Any]:
    kwargs = dict(self.topk_kwargs)
    if self.selection_seed is not None:
      kwargs["selection_key"] = jax.random.key(self.selection_seed)
    return kwargs

  def __call__(
    self,
    query,
    key,
    value,
    bias=None,
    mask=None,
    broadcast_dropout: bool = True,
    dropout_rng=None,
    dropout_rate: float = 0.0,
    deterministic: bool = False,
    dtype=None,
    precision=None,
    module=None,
    is_causal: bool = False,
    force_fp32_for_softmax: bool = False,
    query_seq_lengths=None,
    key_value_seq_lengths=None,
    segment_ids=None,
    **kwargs,
  ) -> jax.Array:
    """Top-k attention with flax's `dot_product_attention` arguments.

    Arguments are those of `flax.linen.dot_product_attention` /
    `flax.nnx.dot_product_attention`. The softmax always runs in at least
    float32, so `force_fp32_for_softmax` changes nothing. `module`, when
    given (flax passes it for `sow_weights=True`), receives the kept weights
    scattered to dense `[batch..., N, T, S]` under "attention_weights".
    `query_seq_lengths`, `key_value_seq_lengths` and `segment_ids` (per-call
    arrays, which flax's modules do not pass but a custom module may) are
    forwarded to `gsparse.topk_attention`; a static `local_window_size` goes
    through `topk_attention_fn(..., local_window_size=...)`. Other keywords
    flax may pass (`**kwargs`) are ignored.

    Returns:
      `[batch..., T, N, Hv]` in `dtype` (default: the promoted input dtype).
    """
    del force_fp32_for_softmax, kwargs
    dtype = jnp.result_type(query, key, value) if dtype is None else jnp.dtype(dtype)
    query, key, value = (jnp.asarray(x).astype(dtype) for x in (query, key, value))
    res = sparse_attention(
      query,
      key,
      value,
      bias,
      None if mask is None else jnp.asarray(mask).astype(bool),
      policy=self.policy,
      scale=self.scale,
      is_causal=is_causal,
      dropout_rng=dropout_rng,
      dropout_rate=dropout_rate,
      broadcast_dropout=broadcast_dropout,
      deterministic=deterministic,
      precision=precision,
      topk_kwargs=self._topk_kwargs(),
      return_residuals=module is not None,
      query_seq_lengths=query_seq_lengths,
      key_value_seq_lengths=key_value_seq_lengths,
      segment_ids=segment_ids,
    )
    if module is None:
      return res
    _sow(module, dense_weights(res.indices, res.weights, key.shape[-3]).astype(dtype))
    return res.output


def topk_attention_fn(
  k: KPolicy | int,
  *,
  selection: str | None = None,
  implementation: str | None = None,
  scale: float | None = None,
  selection_seed: int | None = None,
  **options,
) -> TopKAttentionFn:
  """A top-k `attention_fn` for flax linen and nnx attention modules.

  One line swaps dense attention for top-k attention:

      nn.MultiHeadDotProductAttention(..., attention_fn=topk_attention_fn(k=32))
      nnx.MultiHeadAttention(..., attention_fn=topk_attention_fn(k=32), rngs=...)

  Args:
    k: an int (fixed k), or a policy: `FixedK`, `PowerLawK`, `CertifiedK`.
    selection: how keys are selected, forwarded to `gsparse.topk_attention`
      (None: its default).
    implementation: forwarded to `gsparse.topk_attention` when given.
    scale: logit scale; default `1 / sqrt(head_dim)` as in flax.
    selection_seed: seed of the `selection_key` forwarded to
      `gsparse.topk_attention` (for randomised selections such as "lsh").
    **options: further keywords forwarded to `gsparse.topk_attention`.

  Returns:
    A hashable `TopKAttentionFn`.

  Raises:
    TypeError / ValueError: for a bad `k`, or a keyword the installed
      `gsparse.topk_attention` does not accept.

  Example:
    >>> import jax, jax.numpy as jnp
    >>> import flax.linen as nn
    >>> from gsparse.flax import topk_attention_fn
    >>> layer = nn.MultiHeadDotProductAttention(
    ...     num_heads=2, qkv_features=16, attention_fn=topk_attention_fn(k=4))
    >>> x = jnp.ones((1, 10, 16))
    >>> params = jax.jit(layer.init)(jax.random.key(0), x)
    >>> jax.jit(layer.apply)(params, x).shape
    (1, 10, 16)
    >>> from flax import nnx
    >>> layer = nnx.MultiHeadAttention(num_heads=2, in_features=16, decode=False,
    ...     attention_fn=topk_attention_fn(k=4), rngs=nnx.Rngs(0))
    >>> nnx.jit(lambda layer, x: layer(x))(layer, x).shape
    (1, 10, 16)
  """
  kwargs = _topk_kwargs(selection, implementation, options)
  return TopKAttentionFn(
    policy=as_policy(k),
    scale=scale,
    topk_kwargs=tuple(sorted(kwargs.items())),
    selection_seed=selection_seed,
  )
