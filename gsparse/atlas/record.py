"""Recording attention functions and model runners for linen and nnx models.

A `Recorder` hands out, per attention layer, an `attention_fn` that returns
exactly what the layer's own attention function returns and, on the side,
reduces the exact softmax of the call to per-row statistics
(`gsparse.atlas.stats.row_statistics`), which reach the host through
`jax.debug.callback`, so the model may run eagerly or under `jax.jit`. Only
the per-row statistics leave a layer: its `[B, N, T, S]` weights are built
one query chunk of `[B, N, chunk, S]` at a time and never kept.

A runner (`linen_runner`, `nnx_runner`) calls a model with the attention of
every `flax.linen.MultiHeadDotProductAttention` / `flax.nnx.MultiHeadAttention`
replaced by `wrap(path, original_fn)`. A model with its own attention layers
that takes an `attention_fn` can be wrapped with `ModelRunner` directly.
"""

from __future__ import annotations

import dataclasses
import functools
import inspect
import warnings
from collections.abc import Callable
from typing import Any

import jax
import numpy as np

from gsparse import _checks
from gsparse.atlas.stats import RowStats, row_statistics
from gsparse.flax.policies import CertifiedK

Wrap = Callable[[str, Callable], Callable]

_FLAX_KWARGS = (
  "mask",
  "broadcast_dropout",
  "dropout_rng",
  "dropout_rate",
  "deterministic",
  "dtype",
  "precision",
  "module",
  "is_causal",
  "force_fp32_for_softmax",
  "qk_attn_weights_einsum",
  "attn_weights_value_einsum",
)


def _accepted(fn: Callable, kwargs: dict[str, Any]) -> dict[str, Any]:
  """`kwargs` restricted to what `fn` accepts (all of them if it takes `**kwargs`)."""
  try:
    params = inspect.signature(fn).parameters
  except (TypeError, ValueError):
    return kwargs
  if any(p.kind is inspect.Parameter.VAR_KEYWORD for p in params.values()):
    return kwargs
  return {k: v for k, v in kwargs.items() if k in params}


class Recorder:
  """Collects `RowStats` of every recorded attention call, per layer path.

  Attributes:
    tolerances: tail-mass tolerances of `needed_k` / `certified_k`.
    certified: the `CertifiedK` candidate set (its `tol` is replaced by each
      tolerance).
    chunk: query rows per chunk.
    records: path -> list of `RowStats` (NumPy), one per call.
    skipped: path -> why the layer's attention could not be recorded.
  """

  def __init__(self, *, tolerances, certified_ks=(8, 16, 32, 64, 128, 256), chunk: int = 128):
    self.tolerances = tuple(float(t) for t in tolerances)
    self.certified = CertifiedK(ks=tuple(certified_ks), tol=self.tolerances[0])
    self.chunk = _checks.check_int("chunk", chunk, minimum=1)
    self.records: dict[str, list[RowStats]] = {}
    self.skipped: dict[str, str] = {}

  def _skip(self, path: str, reason: str) -> None:
    if path not in self.skipped:
      warnings.warn(
        f"gsparse.atlas: attention of layer {path!r} not recorded: {reason}", stacklevel=3
      )
      self.skipped[path] = reason

  def record(self, path, query, key, bias=None, mask=None, *, scale=None, is_causal=False):
    """Reduces one attention call to `RowStats`, stored under `path` when it runs.

    Works eagerly and under `jax.jit` (the statistics reach the host through
    `jax.debug.callback`); inputs transformed by `vmap` or `grad` are not
    recorded (the statistics would not be those of whole rows).
    """
    for x in (query, key, bias, mask):
      if isinstance(x, jax.core.Tracer) and type(x).__name__ != "DynamicJaxprTracer":
        self._skip(path, f"its inputs are transformed ({type(x).__name__}: vmap or grad)")
        return
    try:
      stats = row_statistics(
        query,
        key,
        bias,
        mask,
        tolerances=self.tolerances,
        candidates=self.certified.candidates(key.shape[-3]),
        scale=scale,
        is_causal=bool(is_causal),
        chunk=self.chunk,
      )
    except Exception as e:  # noqa: BLE001 -- any failure skips this layer only
      self._skip(path, f"{type(e).__name__}: {e}")
      return
    jax.debug.callback(functools.partial(self._store, path), tuple(stats))

  def _store(self, path, stats) -> None:
    self.records.setdefault(path, []).append(RowStats(*(np.asarray(x) for x in stats)))

  def wrap(self, path: str, fn: Callable) -> Callable:
    """An `attention_fn` that records at `path` and returns `fn`'s output."""
    recorder = self

    def recording_attention_fn(
      query,
      key,
      value,
      bias=None,
      mask=None,
      broadcast_dropout=True,
      dropout_rng=None,
      dropout_rate=0.0,
      deterministic=False,
      dtype=None,
      precision=None,
      module=None,
      is_causal=False,
      force_fp32_for_softmax=False,
      qk_attn_weights_einsum=None,
      attn_weights_value_einsum=None,
      **kwargs,
    ):
      given = dict(locals())
      recorder.record(path, query, key, bias, mask, is_causal=is_causal)
      flax_kwargs = {k: given[k] for k in _FLAX_KWARGS if given[k] is not None or k == "mask"}
      if module is None:
        flax_kwargs.pop("module", None)
      if bias is not None:
        flax_kwargs["bias"] = bias
      return fn(query, key, value, **_accepted(fn, {**flax_kwargs, **kwargs}))

    return recording_attention_fn


@dataclasses.dataclass(frozen=True)
class ModelRunner:
  """How to call a model with replaced attention functions.

  Attributes:
    call: `call(variables, inputs, wrap) -> outputs`; runs the model on
      `inputs` (an array or a tuple of positional arrays, each `[B, T, ...]`)
      with every attention layer's `attention_fn` replaced by
      `wrap(path, original_attention_fn)`.
    variables: the model's variables (linen variables or nnx State), also
      searched by `gsparse.flax.find_attention_layers`.
    api: "linen" or "nnx" (the dense attention of `attention_fn_for`).
    max_len: longest sequence the model accepts (None: any).
    searched: what `call` replaces, for error messages.
  """

  call: Callable[[Any, Any, Wrap], Any]
  variables: Any
  api: str = "linen"
  max_len: int | None = None
  searched: str = "the layers the model's call wraps"

  def __call__(self, inputs, wrap: Wrap | None = None, variables=None):
    wrap = wrap or (lambda path, fn: fn)
    return self.call(self.variables if variables is None else variables, _as_args(inputs), wrap)


def _as_args(inputs) -> tuple:
  return tuple(inputs) if isinstance(inputs, (tuple, list)) else (inputs,)


def linen_runner(module, variables, *, max_len: int | None = None, **apply_kwargs) -> ModelRunner:
  """Runner for a linen model with `nn.MultiHeadDotProductAttention` layers.

  Each attention layer is intercepted (`flax.linen.intercept_methods`) and
  runs with `attention_fn=wrap(path, its attention_fn)`; the path is the
  layer's scope path as `find_attention_layers` names it.

  Args:
    module: the linen Module.
    variables: its variables (`{"params": ...}`).
    max_len: longest input length the model accepts.
    **apply_kwargs: forwarded to `module.apply` (e.g. `method`).
  """
  import flax.linen as nn

  def call(variables, args, wrap):
    def interceptor(next_fun, a, kw, context):
      mod = context.module
      if not isinstance(mod, nn.MultiHeadDotProductAttention) or context.method_name != "__call__":
        return next_fun(*a, **kw)
      path = "/".join(str(p) for p in mod.scope.path if p != "params")
      original = mod.attention_fn
      # Linen modules are frozen dataclasses: swap the field for this call only.
      object.__setattr__(mod, "attention_fn", wrap(path, original))
      try:
        return next_fun(*a, **kw)
      finally:
        object.__setattr__(mod, "attention_fn", original)

    with nn.intercept_methods(interceptor):
      return module.apply(variables, *args, **apply_kwargs)

  searched = "flax.linen.MultiHeadDotProductAttention layers called by module.apply"
  return ModelRunner(call, variables, "linen", max_len, searched)


def nnx_runner(model, *, max_len: int | None = None) -> ModelRunner:
  """Runner for an nnx model with `nnx.MultiHeadAttention` layers.

  Every call works on a fresh copy (`nnx.split` / `nnx.merge`), so the
  model itself is never modified.
  """
  from flax import nnx

  graphdef, state = nnx.split(model)

  def call(variables, args, wrap):
    copy = nnx.merge(graphdef, variables)
    for path, mod in nnx.iter_modules(copy):
      if isinstance(mod, nnx.MultiHeadAttention):
        mod.attention_fn = wrap("/".join(map(str, path)), mod.attention_fn)
    return copy(*args)

  searched = "flax.nnx.MultiHeadAttention submodules of the model"
  return ModelRunner(call, state, "nnx", max_len, searched)
