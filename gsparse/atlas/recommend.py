"""A per-layer top-k config from an atlas, and its check on held-aside inputs.

`recommend(atlas, tolerance=...)` returns `{path: k or None}`, the format of
`gsparse.flax.select_sparse_layers`, accepted by `attention_fn_for` and
`configure_nnx`. `validate(runner, config, inputs)` runs the model dense and
with the config on inputs the atlas did not see and reports the change of
the outputs, of the loss and of the run time.
"""

from __future__ import annotations

import math
import statistics
import time
from collections.abc import Callable
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from gsparse import _checks
from gsparse.atlas.measure import Atlas
from gsparse.atlas.record import ModelRunner, _as_args
from gsparse.flax.layers import attention_fn_for


def recommend(
  atlas: Atlas, *, tolerance: float, quantile: float = 0.99, max_fraction: float = 0.5
) -> dict[str, int | None]:
  """`{path: k or None}`: per layer the k that keeps a `quantile` of rows within `tolerance`.

  A layer's k is the `quantile` (over all its heads and rows) of the needed
  k at `tolerance`, rounded up; one k serves all heads of a layer. A layer
  whose k exceeds `max_fraction * seq_len` (too little to gain) and a layer
  that was not recorded stay dense (None).

  Args:
    atlas: from `measure_model`.
    tolerance: one of `atlas.tolerances`.
    quantile: fraction of rows that must meet the tolerance, in (0, 1].
    max_fraction: largest `k / seq_len` worth sparsifying, in (0, 1].

  Returns:
    Dict in the order of the atlas' layers, then the skipped layers.
  """
  i = atlas.tol_index(tolerance)
  for name, v in (("quantile", quantile), ("max_fraction", max_fraction)):
    _checks.check_float_scalar(name, v, allow_traced=False)
    if not 0.0 < float(v) <= 1.0:
      raise ValueError(f"{name}={v!r} must be in (0, 1]")
  config: dict[str, int | None] = {}
  for layer in atlas.layers:
    k = math.ceil(float(np.nanquantile(layer.needed_k[i], quantile)))
    config[layer.path] = max(k, 1) if k <= max_fraction * atlas.seq_len else None
  for path in atlas.skipped:
    config.setdefault(path, None)
  return config


class Validation(NamedTuple):
  """Dense against configured model on held-aside inputs.

  Attributes:
    output_change: `||y_sparse - y_dense|| / ||y_dense||` over the batch.
    max_abs_change: `max |y_sparse - y_dense|`.
    loss_dense: `loss_fn` of the dense outputs (NaN without `loss_fn`).
    loss_sparse: `loss_fn` of the configured outputs.
    time_dense_s: median seconds of one jitted dense forward.
    time_sparse_s: median seconds of one jitted configured forward.
    repeats: timed calls of each (interleaved, after one warm-up call).
  """

  output_change: float
  max_abs_change: float
  loss_dense: float
  loss_sparse: float
  time_dense_s: float
  time_sparse_s: float
  repeats: int

  @property
  def loss_change(self) -> float:
    return self.loss_sparse - self.loss_dense

  @property
  def speedup(self) -> float:
    """Dense time over configured time (> 1: the config is faster)."""
    return self.time_dense_s / self.time_sparse_s


def _config_wrap(config, api: str, topk_kwargs):
  def wrap(path, fn):
    if config.get(path) is None:
      return fn  # the model's own attention
    return attention_fn_for(config, path, api=api, **topk_kwargs)

  return wrap


def _timed(fn, *args) -> float:
  t0 = time.perf_counter()
  jax.block_until_ready(fn(*args))
  return time.perf_counter() - t0


def validate(
  runner: ModelRunner,
  config: dict[str, Any],
  inputs,
  *,
  loss_fn: Callable[[Any, tuple], jax.Array] | None = None,
  repeats: int = 5,
  **topk_kwargs,
) -> Validation:
  """Runs the model dense and with `config` on `inputs` and compares.

  Args:
    runner: the model.
    config: `{path: k or None}` (e.g. from `recommend`).
    inputs: held-aside inputs (array or tuple of arrays, `[B, T, ...]`).
    loss_fn: `loss_fn(outputs, inputs_tuple) -> scalar` (optional).
    repeats: timed calls of each model, interleaved; medians are reported.
    **topk_kwargs: forwarded to `topk_attention_fn` (selection, implementation).

  Returns:
    A `Validation`.
  """
  _checks.check_int("repeats", repeats, minimum=1)
  args = _as_args(inputs)
  if runner.max_len is not None and np.shape(args[0])[1] > runner.max_len:
    raise ValueError(
      f"inputs have length {np.shape(args[0])[1]}, longer than max_len={runner.max_len}"
    )
  sparse_wrap = _config_wrap(config, runner.api, topk_kwargs)
  dense = jax.jit(lambda v, a: runner(a, None, v))
  sparse = jax.jit(lambda v, a: runner(a, sparse_wrap, v))
  y_d, y_s = dense(runner.variables, args), sparse(runner.variables, args)
  times_d, times_s = [], []
  for _ in range(repeats):
    times_d.append(_timed(dense, runner.variables, args))
    times_s.append(_timed(sparse, runner.variables, args))
  diff = jnp.asarray(y_s, jnp.float32) - jnp.asarray(y_d, jnp.float32)
  change = float(jnp.linalg.norm(diff) / jnp.maximum(jnp.linalg.norm(y_d), 1e-30))
  nan = float("nan")
  loss_d = nan if loss_fn is None else float(loss_fn(y_d, args))
  loss_s = nan if loss_fn is None else float(loss_fn(y_s, args))
  return Validation(
    change,
    float(jnp.max(jnp.abs(diff))),
    loss_d,
    loss_s,
    statistics.median(times_d),
    statistics.median(times_s),
    repeats,
  )
