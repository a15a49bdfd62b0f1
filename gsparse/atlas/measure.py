"""The atlas: per layer and head sparsity statistics of a model on a batch.

`measure_model(runner, inputs)` runs the model once at full length with a
`Recorder`, then at shorter prefixes for the n^C fits, and returns an
`Atlas`: per layer and head the per-row effective support, needed k,
certified k, logit scale and Gaussian predictions (from the row's logit
scale with `gsparse.bounds.predicted_effective_support`, and from the
weights with `gsparse.flax.rank_attention_layers`), the n^C fits and the
Spearman correlations of each prediction with the measured support.
"""

from __future__ import annotations

import dataclasses
import math

import jax
import numpy as np

from gsparse import _checks, bounds
from gsparse.atlas.fit import PowerLawFit, classify_phase, fit_power_law
from gsparse.atlas.record import ModelRunner, Recorder, _as_args
from gsparse.flax.layers import find_attention_layers, rank_attention_layers
from gsparse.train.rank import spearman


@dataclasses.dataclass
class LayerAtlas:
  """Statistics of one attention layer; rows are the batch's queries (`R = B * T`).

  Invalid rows (fully masked, or outside `query_mask`) are NaN.

  Attributes:
    path: the layer's path (as in `find_attention_layers` and configs).
    effective_support: `[N, R]` `1 / sum_j p_j^2`.
    num_keys: `[N, R]` admissible keys of each row.
    tau: `[N, R]` standard deviation of each row's logits.
    needed_k: `[len(tolerances), N, R]` smallest k with tail mass <= tol.
    certified_k: `[len(tolerances), N, R]` the k `CertifiedK` keeps.
    predicted_row: `[N, R]` `predicted_effective_support(num_keys, tau)`.
    predicted_weights: `[N]` `rank_attention_layers`' predicted support
      (NaN when the layer's weights were not found).
    fits: `fits[i][h]`: the n^C fit of head h at tolerance i (None if not fitted).
  """

  path: str
  effective_support: np.ndarray
  num_keys: np.ndarray
  tau: np.ndarray
  needed_k: np.ndarray
  certified_k: np.ndarray
  predicted_row: np.ndarray
  predicted_weights: np.ndarray
  fits: list[list[PowerLawFit]] | None = None

  @property
  def num_heads(self) -> int:
    return self.effective_support.shape[0]

  def support(self) -> np.ndarray:
    """`[N]` mean effective support over valid rows."""
    return np.nanmean(self.effective_support, axis=-1)

  def needed_quantile(self, tol_index: int, q: float) -> np.ndarray:
    """`[N]` quantile `q` over rows of the needed k at `tolerances[tol_index]`."""
    return np.nanquantile(self.needed_k[tol_index], q, axis=-1)

  def certified_gap(self, tol_index: int) -> np.ndarray:
    """`[N]` mean over rows of `certified_k - needed_k`."""
    return np.nanmean(self.certified_k[tol_index] - self.needed_k[tol_index], axis=-1)

  def phases(self, tol_index: int) -> list[str]:
    """Per head, the phase of its n^C fit ("undetermined" without a fit)."""
    if self.fits is None:
      return ["undetermined"] * self.num_heads
    return [classify_phase(f) for f in self.fits[tol_index]]


@dataclasses.dataclass
class Atlas:
  """Result of `measure_model`.

  Attributes:
    tolerances: tail-mass tolerances measured.
    seq_len: full input length `T`.
    lengths: prefix lengths of the n^C fits.
    layers: one `LayerAtlas` per recorded layer, in call order.
    skipped: path -> why its attention could not be recorded.
    spearman: Spearman correlation of each prediction with the measured mean
      effective support, over layers (`*_layers`) and over all heads (`*_heads`).
  """

  tolerances: tuple[float, ...]
  seq_len: int
  lengths: tuple[int, ...]
  layers: list[LayerAtlas]
  skipped: dict[str, str]
  spearman: dict[str, float]

  def layer(self, path: str) -> LayerAtlas:
    for layer in self.layers:
      if layer.path == path:
        return layer
    raise KeyError(f"no recorded layer {path!r}; recorded: {[x.path for x in self.layers]}")

  def tol_index(self, tolerance: float) -> int:
    for i, t in enumerate(self.tolerances):
      if math.isclose(t, float(tolerance)):
        return i
    raise ValueError(f"tolerance={tolerance!r} was not measured; measured: {self.tolerances}")


def check_tolerances(tolerances) -> tuple[float, ...]:
  """The tolerances as a tuple of floats, each checked to be in (0, 1)."""
  if isinstance(tolerances, (int, float)):
    tolerances = (tolerances,)
  out = []
  for t in tolerances:
    _checks.check_float_scalar("tolerance", t, allow_traced=False)
    if not 0.0 < float(t) < 1.0:
      raise ValueError(f"tolerance={t!r} must be in (0, 1)")
    out.append(float(t))
  if not out:
    raise ValueError("tolerances must not be empty")
  return tuple(out)


def _rows(x: np.ndarray, valid: np.ndarray) -> np.ndarray:
  """`[..., B, N, T]` -> `[..., N, B * T]` float64, NaN where not `valid` (`[B, N, T]`)."""
  x = np.where(valid, np.asarray(x, np.float64), np.nan)
  x = np.swapaxes(x, -3, -2)  # [..., N, B, T]
  return x.reshape(x.shape[:-2] + (-1,))


def _layer_rows(records, query_mask) -> dict[str, np.ndarray]:
  """Concatenated rows of all calls of one layer."""
  parts = []
  for r in records:
    valid = np.asarray(r.num_keys) > 0
    if query_mask is not None:
      valid = valid & np.asarray(query_mask, bool).reshape(valid.shape[0], 1, -1)
    parts.append({name: _rows(getattr(r, name), valid) for name in r._fields})
  return {k: np.concatenate([p[k] for p in parts], axis=-1) for k in parts[0]}


def _prefix(args: tuple, n: int) -> tuple:
  return jax.tree_util.tree_map(lambda x: x[:, :n], args)


def default_lengths(t: int) -> tuple[int, ...]:
  """128, 256, ... below `t`, and `t` (for `t < 256`: `t/4, t/2, t`)."""
  lengths = [n for n in (128 * 2**i for i in range(20)) if n < t] + [t]
  if len(lengths) < 3:
    lengths = sorted({max(2, t // 4), max(2, t // 2), t})
  return tuple(lengths)


def _run(runner, args, recorder, jit: bool) -> None:
  """Runs the model with `recorder`'s attention and waits for its statistics."""
  fn = lambda v, a: runner(a, recorder.wrap, v)  # noqa: E731
  jax.block_until_ready((jax.jit(fn) if jit else fn)(runner.variables, args))
  jax.effects_barrier()


def _record(runner, args, recorder, weight_paths, jit):
  _run(runner, args, recorder, jit)
  if not recorder.records and not recorder.skipped:
    raise ValueError(
      f"no attention layer found: searched {runner.searched} (none was called) and the "
      "variables for a `query/kernel` with a sibling `key/kernel` "
      f"({'found: ' + str(weight_paths) if weight_paths else 'none found'})"
    )


def _fits(runner, args, rows_full, t, lengths, kw, query_mask, fit_kw, jit):
  """Per path, `fits[tol][head]` from the needed k at every prefix length."""
  needed = {n: {} for n in lengths}
  for n in lengths:
    if n == t:
      needed[n] = {p: (r["needed_k"], r["num_keys"]) for p, r in rows_full.items()}
      continue
    rec = Recorder(**kw)
    _run(runner, _prefix(args, n), rec, jit)
    qm = None if query_mask is None else np.asarray(query_mask)[:, :n]
    needed[n] = {
      p: (r["needed_k"], r["num_keys"])
      for p, r in ((p, _layer_rows(v, qm)) for p, v in rec.records.items())
    }
  out = {}
  for path, full in rows_full.items():
    if not all(path in needed[n] for n in lengths):
      continue
    ntol, nheads = full["needed_k"].shape[:2]
    fits = []
    for i in range(ntol):
      per_head = []
      for h in range(nheads):
        rows = []
        for n in lengths:
          k, m = needed[n][path]
          keep = np.isfinite(k[i, h]) & (m[h] > n / 2)  # rows that see more than half the prefix
          rows.append(k[i, h][keep])
        per_head.append(fit_power_law(lengths, rows, **fit_kw))
      fits.append(per_head)
    out[path] = fits
  return out


def _spearman(layers: list[LayerAtlas]) -> dict[str, float]:
  measured = [x.support() for x in layers]
  out = {}
  for name, pred in (
    ("row_tau", [np.nanmean(x.predicted_row, -1) for x in layers]),
    ("weights", [x.predicted_weights for x in layers]),
  ):
    out[f"{name}_layers"] = spearman([np.mean(p) for p in pred], [np.mean(m) for m in measured])
    out[f"{name}_heads"] = spearman(np.concatenate(pred), np.concatenate(measured))
  return out


def measure_model(
  runner: ModelRunner,
  inputs,
  *,
  tolerances=(0.01, 0.05, 0.1),
  query_mask=None,
  lengths: tuple[int, ...] | None = None,
  certified_ks: tuple[int, ...] = (8, 16, 32, 64, 128, 256),
  chunk: int = 128,
  sigma: float = 1.0,
  num_bootstrap: int = 200,
  seed: int = 0,
  jit: bool = True,
) -> Atlas:
  """Measures the attention sparsity of every attention layer of a model.

  Args:
    runner: the model (`linen_runner`, `nnx_runner` or a `ModelRunner`).
    inputs: an array or a tuple of positional arrays, each `[B, T, ...]`.
    tolerances: tail-mass tolerances, each in (0, 1).
    query_mask: optional `[B, T]` boolean; False rows (padding) are ignored.
    lengths: prefix lengths of the n^C fits (default `default_lengths(T)`;
      `()` skips the fits).
    certified_ks: the candidate set of the `CertifiedK` whose choice is reported.
    chunk: query rows per chunk of the recording (bounds the memory).
    sigma: input scale of the weight-based prediction (1 after LayerNorm).
    num_bootstrap: bootstrap resamples of the fits' intervals.
    seed: seed of the bootstrap.
    jit: run the model under `jax.jit` (False: eagerly, e.g. for a model
      that cannot be jitted).

  Returns:
    An `Atlas`.

  Raises:
    ValueError: a tolerance outside (0, 1); inputs longer than
      `runner.max_len`; no attention layer found.
  """
  tolerances = check_tolerances(tolerances)
  args = _as_args(inputs)
  t = int(np.shape(args[0])[1])
  if runner.max_len is not None and t > runner.max_len:
    raise ValueError(f"inputs have length {t}, longer than the model's max_len={runner.max_len}")
  lengths = default_lengths(t) if lengths is None else tuple(int(n) for n in lengths)
  if any(not 2 <= n <= t for n in lengths):
    raise ValueError(f"lengths={lengths} must lie in [2, {t}]")
  weights = find_attention_layers(runner.variables)
  kw = dict(tolerances=tolerances, certified_ks=certified_ks, chunk=chunk)
  rec = Recorder(**kw)
  _record(runner, args, rec, list(weights), jit)
  rows = {p: _layer_rows(v, query_mask) for p, v in rec.records.items()}
  skipped = dict(rec.skipped)
  for path in weights:
    if path not in rows and path not in skipped:
      skipped[path] = "found in the variables, but its attention was never called"
  predicted = {
    r.path: r.predicted_support
    for r in rank_attention_layers(runner.variables, seq_len=t, sigma=sigma)
  }
  fits = {}
  if len(lengths) >= 2:
    fit_kw = dict(num_bootstrap=num_bootstrap, seed=seed)
    fits = _fits(runner, args, rows, t, lengths, kw, query_mask, fit_kw, jit)
  layers = [_layer_atlas(path, r, predicted.get(path), fits.get(path)) for path, r in rows.items()]
  return Atlas(tolerances, t, lengths, layers, skipped, _spearman(layers) if layers else {})


def _layer_atlas(path, r: dict, predicted, fit) -> LayerAtlas:
  """One layer's `LayerAtlas`: its measured rows and the two predictions.

  The per-row prediction comes from the row's measured tau (random-energy
  model); the per-head one from the weights (`predicted`; NaN if absent).
  """
  nheads = r["effective_support"].shape[0]
  pw = np.asarray(np.full(nheads, np.nan) if predicted is None else predicted, np.float64)
  if pw.shape != (nheads,):
    pw = np.full(nheads, np.nan)
  pred_row = np.asarray(
    bounds.predicted_effective_support(
      np.maximum(np.nan_to_num(r["num_keys"], nan=1.0), 1.0), np.nan_to_num(r["tau"])
    )
  )
  pred_row = np.where(np.isnan(r["num_keys"]), np.nan, pred_row)
  return LayerAtlas(
    path,
    r["effective_support"],
    r["num_keys"],
    r["tau"],
    r["needed_k"],
    r["certified_k"],
    pred_row,
    pw,
    fit,
  )
