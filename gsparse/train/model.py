"""A small decoder-only byte-level transformer whose attention is pluggable.

Each layer's attention is described by an `AttentionSpec` (dense, top-k with a
fixed k, k = alpha * n^C, or the certified k), turned into a linen
`attention_fn` by `make_attention_fn` and handed to
`flax.linen.MultiHeadDotProductAttention(attention_fn=...)`.

`measuring_attention_fn` is the same attention that, when flax passes it the
module (`sow_weights=True`), also records per head the sparsity of the dense
softmax of the layer's own logits and the top-k certificate, as
`intermediates`. Its forward output is always that of the plain function.
"""

from __future__ import annotations

import dataclasses
import functools
from collections.abc import Callable, Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp

from gsparse.attention import attention_weights
from gsparse.flax import CertifiedK, FixedK, PowerLawK, sparse_attention, topk_attention_fn
from gsparse.sparsity import effective_support, min_sparse_k, tail_mass
from gsparse.topk import topk_attention

KINDS = ("dense", "topk", "power", "certified")


@dataclasses.dataclass(frozen=True)
class AttentionSpec:
  """How one layer attends.

  Attributes:
    kind: "dense" (flax's `dot_product_attention`), "topk" (fixed `k`),
      "power" (`k = ceil(alpha * n^C)` with n the key length) or "certified"
      (per call, the smallest k in `candidate_ks` whose certified tail mass,
      maximised over the rows of the call, is at most `tolerance`).
    k: kept keys for "topk".
    alpha: factor of the "power" policy.
    power: exponent C in (0, 1) of the "power" policy.
    tolerance: tail-mass tolerance of the "certified" policy, in (0, 1).
    candidate_ks: increasing k values the "certified" policy chooses from.
  """

  kind: str = "dense"
  k: int = 32
  alpha: float = 1.0
  power: float = 0.5
  tolerance: float = 0.05
  candidate_ks: tuple[int, ...] = (8, 16, 32, 64, 128)

  def __post_init__(self):
    if self.kind not in KINDS:
      raise ValueError(f"kind={self.kind!r} must be one of {KINDS}")
    if not isinstance(self.k, int) or self.k < 1:
      raise ValueError(f"k={self.k!r} must be an int >= 1")
    if not self.alpha > 0:
      raise ValueError(f"alpha={self.alpha!r} must be > 0")
    if not 0.0 < self.power < 1.0:
      raise ValueError(f"power={self.power!r} must be in (0, 1)")
    if not 0.0 < self.tolerance < 1.0:
      raise ValueError(f"tolerance={self.tolerance!r} must be in (0, 1)")
    ks = self.candidate_ks
    if not ks or any(not isinstance(c, int) or c < 1 for c in ks) or list(ks) != sorted(set(ks)):
      raise ValueError(f"candidate_ks={ks!r} must be strictly increasing ints >= 1")

  def policy(self):
    """The `gsparse.flax` k policy of a sparse spec (None for dense)."""
    if self.kind == "topk":
      return FixedK(self.k)
    if self.kind == "power":
      return PowerLawK(alpha=self.alpha, C=self.power)
    if self.kind == "certified":
      return CertifiedK(ks=self.candidate_ks, tol=self.tolerance)
    return None

  def label(self) -> str:
    if self.kind == "dense":
      return "dense"
    if self.kind == "topk":
      return f"topk(k={self.k})"
    if self.kind == "power":
      return f"power(k={self.alpha:g}*n^{self.power:g})"
    return f"certified(tol={self.tolerance:g}, ks={list(self.candidate_ks)})"


def _bool_mask(mask):
  return None if mask is None else jnp.asarray(mask).astype(bool)


def _with_segments(mask, segment_ids):
  """`mask` and'ed with the dense same-segment mask (flax's dense baseline
  and the dense measurements hold `[B, N, T, T]` anyway)."""
  if segment_ids is None:
    return mask
  return nn.combine_masks(mask, nn.make_attention_mask(segment_ids, segment_ids, jnp.equal))


def _dense_fn(query, key, value, mask=None, dtype=None, precision=None, segment_ids=None, **kw):
  del kw
  mask = _with_segments(mask, segment_ids)
  return nn.dot_product_attention(query, key, value, mask=mask, dtype=dtype, precision=precision)


def make_attention_fn(spec: AttentionSpec) -> Callable[..., jax.Array]:
  """A linen `attention_fn` implementing `spec`.

  Dense layers use flax's own `nn.dot_product_attention` (the baseline a
  user starts from); sparse layers use `gsparse.flax.topk_attention_fn` with
  the spec's k policy.
  """
  if spec.kind == "dense":
    return _dense_fn
  return topk_attention_fn(spec.policy())


@dataclasses.dataclass(frozen=True)
class MeasureSpec:
  """What `measuring_attention_fn` records.

  Attributes:
    eps: threshold of the (eps, k)-sparsity measure `min_sparse_k`.
    k: kept keys at which the exact tail mass and its certificate are taken.
  """

  eps: float = 0.01
  k: int = 32


def measuring_attention_fn(spec: AttentionSpec, measure: MeasureSpec) -> Callable:
  """The attention_fn of `spec` that, given `module`, also sows sparsity measures.

  Sown under `intermediates` (each `[N]`, averaged over batch and query rows):

  * of the dense softmax of this layer's logits (causal mask applied):
    `min_k` (entries above `measure.eps`), `effective_support`, `tail_mass`
    (exact mass outside the top `measure.k`), `tail_bound` (the
    `gsparse.topk_attention` certificate of that mass, `TopKStats`) and
    `tail_bound_max` (its maximum over rows);
  * of the layer as it runs: `kept` (keys kept per query: the policy's
    `num_kept`, or the admissible keys for dense) and `own_tail_bound` (the
    certified mass the policy dropped, 0 for dense).

  The forward output is exactly that of `make_attention_fn(spec)`.
  """
  fn = make_attention_fn(spec)

  def wrapped(
    query, key, value, mask=None, module=None, segment_ids=None, is_causal=False, **kwargs
  ):
    if spec.kind != "dense":  # flax's dense attention has no is_causal argument
      kwargs["is_causal"] = is_causal
    if module is None:
      return fn(query, key, value, mask=mask, segment_ids=segment_ids, **kwargs)
    # The measurements are dense anyway: one [B, N, T, S] mask with the segment
    # mask folded in, and the causal rule of the layer.
    bmask = _bool_mask(_with_segments(mask, segment_ids))
    q, k, v = (jax.lax.stop_gradient(x) for x in (query, key, value))
    p = attention_weights(q, k, mask=bmask, is_causal=is_causal)  # [B, N, T, S]
    if spec.kind == "dense":
      out = fn(query, key, value, mask=mask, segment_ids=segment_ids, **kwargs)
      kept = jnp.sum(p > 0, axis=-1).astype(jnp.float32)  # [B, N, T]
      own = jnp.zeros_like(kept)
    else:
      res = sparse_attention(
        query,
        key,
        value,
        None,
        _bool_mask(mask),
        policy=spec.policy(),
        return_residuals=True,
        is_causal=is_causal,
        segment_ids=segment_ids,
      )
      out = res.output
      kept = jnp.swapaxes(res.num_kept.astype(jnp.float32), -2, -1)
      own = jnp.swapaxes(res.tail_mass_bound, -2, -1)
    _, stats = topk_attention(
      q, k, v, mask=bmask, k=measure.k, is_causal=is_causal, return_stats=True
    )
    tb = jnp.swapaxes(stats.tail_mass_bound, -2, -1)
    per_head = {
      "min_k": min_sparse_k(p, eps=measure.eps).astype(jnp.float32),
      "effective_support": effective_support(p),
      "tail_mass": tail_mass(p, k=measure.k),
      "tail_bound": tb,
      "kept": kept,
      "own_tail_bound": own,
    }
    for name, val in per_head.items():
      module.sow("intermediates", name, jnp.mean(val, axis=(0, 2)))
    module.sow("intermediates", "tail_bound_max", jnp.max(tb, axis=(0, 2)))
    return out

  return wrapped


@dataclasses.dataclass(frozen=True)
class ModelConfig:
  """Transformer size.

  Attributes:
    vocab_size: 256 for bytes.
    d_model: residual width.
    num_layers: transformer blocks.
    num_heads: attention heads per block (`d_model % num_heads == 0`).
    mlp_ratio: MLP hidden width over `d_model`.
    max_len: longest sequence (learned positional embeddings).
    pack: attend only within a document: each 0 byte (the file separator of
      the byte stream) starts a new segment, passed as `segment_ids`.
  """

  vocab_size: int = 256
  d_model: int = 128
  num_layers: int = 4
  num_heads: int = 4
  mlp_ratio: int = 4
  max_len: int = 512
  pack: bool = False

  def __post_init__(self):
    if not isinstance(self.pack, bool):
      raise TypeError(f"pack must be a bool, got {self.pack!r}")
    for name in ("vocab_size", "d_model", "num_layers", "num_heads", "mlp_ratio", "max_len"):
      v = getattr(self, name)
      if not isinstance(v, int) or v < 1:
        raise ValueError(f"{name}={v!r} must be an int >= 1")
    if self.d_model % self.num_heads:
      raise ValueError(f"d_model={self.d_model} must be divisible by num_heads={self.num_heads}")


class Block(nn.Module):
  """Pre-LayerNorm transformer block."""

  config: ModelConfig
  attention_fn: Callable[..., jax.Array]

  @nn.compact
  def __call__(self, x, mask, measure: bool = False, segment_ids=None):
    cfg = self.config
    h = nn.LayerNorm(name="ln_attn")(x)
    fn = self.attention_fn
    if segment_ids is not None:  # flax's module passes no segment ids: bind them here
      fn = functools.partial(fn, segment_ids=segment_ids)
    h = nn.MultiHeadDotProductAttention(
      num_heads=cfg.num_heads,
      qkv_features=cfg.d_model,
      attention_fn=fn,
      deterministic=True,
      name="attention",
    )(h, h, mask=mask, sow_weights=measure)
    x = x + h
    h = nn.LayerNorm(name="ln_mlp")(x)
    h = nn.Dense(cfg.mlp_ratio * cfg.d_model, name="mlp_in")(h)
    h = nn.gelu(h)
    h = nn.Dense(cfg.d_model, name="mlp_out")(h)
    return x + h


class TransformerLM(nn.Module):
  """Decoder-only LM: `[batch, T]` int tokens -> `[batch, T, vocab]` logits.

  Attributes:
    config: `ModelConfig`.
    attention: one `AttentionSpec` per layer.
    measure: when set, each layer sows sparsity measures (see
      `measuring_attention_fn`) if called with `measure=True`.
  """

  config: ModelConfig
  attention: tuple[AttentionSpec, ...]
  measure: MeasureSpec | None = None

  @nn.compact
  def __call__(self, tokens, measure: bool = False):
    cfg = self.config
    if len(self.attention) != cfg.num_layers:
      raise ValueError(
        f"attention has {len(self.attention)} specs, expected num_layers={cfg.num_layers}"
      )
    t = tokens.shape[-1]
    if t > cfg.max_len:
      raise ValueError(f"sequence length {t} exceeds max_len={cfg.max_len}")
    x = nn.Embed(cfg.vocab_size, cfg.d_model, name="embed")(tokens)
    pos = self.param("pos_embed", nn.initializers.normal(0.02), (cfg.max_len, cfg.d_model))
    x = x + pos[:t]
    # Dense layers get flax's [B, 1, T, T] causal mask (the baseline a user
    # starts from); sparse layers get `is_causal=True`, an index range of the
    # chunked selection, so no T x T array is built in their path.
    mask = nn.make_causal_mask(tokens)
    # Packed documents: a segment starts at each 0 byte (the file separator of
    # gsparse.train.data); top-k layers take the ids as index ranges, no T x T mask.
    segment_ids = jnp.cumsum(tokens == 0, axis=-1, dtype=jnp.int32) if cfg.pack else None
    for i, spec in enumerate(self.attention):
      if self.measure is None:
        fn = make_attention_fn(spec)
      else:
        fn = measuring_attention_fn(spec, self.measure)
      if spec.kind == "dense":
        x = Block(cfg, fn, name=f"block_{i}")(x, mask, measure, segment_ids)
      else:
        fn = functools.partial(fn, is_causal=True)
        x = Block(cfg, fn, name=f"block_{i}")(x, None, measure, segment_ids)
    x = nn.LayerNorm(name="ln_final")(x)
    return nn.Dense(cfg.vocab_size, name="head")(x)


def layer_specs(spec: AttentionSpec, num_layers: int, sparse_layers: Sequence[int] | None = None):
  """Per-layer specs: `spec` in `sparse_layers` (all when None), dense elsewhere."""
  chosen = range(num_layers) if sparse_layers is None else set(sparse_layers)
  return tuple(spec if i in chosen else AttentionSpec("dense") for i in range(num_layers))
