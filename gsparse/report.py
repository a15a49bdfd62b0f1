"""The default report: how sparse is attention on Gaussian input?

Library code for `scripts/report.py`. It draws the paper's setting at a few
(n, d, sigma), measures the empirical (eps, k)-sparsity of every attention row
and the error of top-k attention, and returns the rows of a table.
"""

from __future__ import annotations

import dataclasses
import functools

import jax
import jax.numpy as jnp
import numpy as np

from gsparse.attention import attention_weights
from gsparse.gaussian import project, sample_inputs, sample_weights
from gsparse.sparsity import min_sparse_k, topk_error_decomposition
from gsparse.topk import topk_attention


@dataclasses.dataclass(frozen=True)
class SparsityRow:
  """One line of the sparsity table (means over all rows and trials)."""

  n: int
  d: int
  sigma: float
  eps: float
  trivial_k: int
  mean_min_k: float
  max_min_k: int
  k: int
  mean_tail_mass: float
  mean_error: float
  max_error: float
  max_certified_error: float


@functools.partial(jax.jit, static_argnames=("n", "d", "eps", "k", "trials"))
def _measure(key, sigma, *, n, d, eps, k, trials):
  def one(key):
    kx, kw = jax.random.split(key)
    x = sample_inputs(kx, n=n, d=d, sigma=sigma)
    w = sample_weights(kw, d=d, head_dim=d)
    q, kk, v = project(x, w)
    p = attention_weights(q, kk)[0]  # [n, n], one head
    mk = min_sparse_k(p, eps=eps)
    dec = topk_error_decomposition(p, v[:, 0, :], k=k)
    _, stats = topk_attention(q, kk, v, k=k, return_stats=True)
    return mk, dec.tail_mass, dec.error, stats.error_bound[:, 0]

  mk, t, err, cert = jax.vmap(one)(jax.random.split(key, trials))
  return (jnp.mean(mk), jnp.max(mk), jnp.mean(t), jnp.mean(err), jnp.max(err), jnp.max(cert))


def sparsity_table(
  key: jax.Array,
  *,
  ns=(256, 1024),
  ds=(16, 64),
  sigmas=(1.0, 2.0, 3.0),
  eps: float = 0.01,
  k: int = 32,
  trials: int = 4,
) -> list[SparsityRow]:
  """Measures sparsity and top-k error on fresh Gaussian draws at each grid point."""
  rows = []
  for n in ns:
    for d in ds:
      for sigma in sigmas:
        key, sub = jax.random.split(key)
        mean_k, max_k, t, err, max_err, cert = _measure(
          sub, sigma, n=n, d=d, eps=eps, k=k, trials=trials
        )
        rows.append(
          SparsityRow(
            n,
            d,
            sigma,
            eps,
            int(1 / eps),
            float(mean_k),
            int(max_k),
            k,
            float(t),
            float(err),
            float(max_err),
            float(cert),
          )
        )
  return rows


def format_table(rows: list[SparsityRow]) -> str:
  """Markdown table of `sparsity_table` rows."""
  head = (
    "| n | d | sigma | eps | trivial k | mean min k | max min k | k | mean tail mass "
    "| mean error | max error | max certified error |"
  )
  sep = "|" + "---|" * 12
  lines = [head, sep]
  for r in rows:
    lines.append(
      f"| {r.n} | {r.d} | {r.sigma:g} | {r.eps:g} | {r.trivial_k} | {r.mean_min_k:.1f} "
      f"| {r.max_min_k} | {r.k} | {r.mean_tail_mass:.3g} | {r.mean_error:.3g} "
      f"| {r.max_error:.3g} | {r.max_certified_error:.3g} |"
    )
  return "\n".join(lines)


# ----------------------------------------------------------------------------
# The default report: one sweep, four figures, a Markdown summary.


@dataclasses.dataclass(frozen=True)
class ReportConfig:
  """What the default report measures (all sizes static).

  Attributes:
    d: input (and head) dimension.
    trials: Monte Carlo draws of X per point.
    rows: query rows measured per draw.
    eps: sparsity threshold for Theorem 1 and the min-k measure.
    delta: failure probability of the bounds.
    n_main: sequence length of the sparsity and error-vs-k figures.
    taus: target score scales tau of the sparsity figure.
    error_taus: the tau of each curve of the error-vs-k figure.
    ks: the k of the error-vs-k figure (also the k of the sparsity figure is `k`).
    k: k used where a single k is needed.
    phase_ns: sequence lengths of the phase diagram and of the n^C figure.
    phase_taus: target taus of the phase diagram.
    growth_a: the n^C figure uses tau = growth_a * sqrt(2 ln n).
    fixed_k: the fixed window of the n^C figure.
    alpha, C: the adaptive window k = alpha n^C.
    table_trials, table_ns, table_ds: trials and grid of the sparsity table
      (fresh weights per draw, sigma in {1, 2}).
  """

  d: int = 32
  trials: int = 8
  rows: int = 64
  eps: float = 0.01
  delta: float = 1e-2
  n_main: int = 1024
  taus: tuple[float, ...] = (0.25, 0.5, 0.75, 1.0, 1.5, 2.0, 2.5, 3.0, 3.5, 4.0, 5.0, 6.0)
  error_taus: tuple[float, ...] = (1.0, 2.5, 4.0)
  ks: tuple[int, ...] = (1, 2, 4, 8, 16, 32, 64, 128, 256)
  k: int = 32
  phase_ns: tuple[int, ...] = (64, 128, 256, 512, 1024, 2048, 4096)
  phase_taus: tuple[float, ...] = (
    0.25,
    0.5,
    0.75,
    1.0,
    1.25,
    1.5,
    1.75,
    2.0,
    2.5,
    3.0,
    3.5,
    4.0,
    4.5,
    5.0,
    6.0,
  )
  growth_a: float = 0.8
  fixed_k: int = 8
  alpha: float = 1.0
  C: float = 0.5
  table_trials: int = 4
  table_ns: tuple[int, ...] = (256,)
  table_ds: tuple[int, ...] = (16,)

  @classmethod
  def small(cls) -> ReportConfig:
    """A quick configuration for tests and notebooks (small sizes, few points)."""
    return cls(
      d=8,
      trials=2,
      rows=16,
      n_main=128,
      taus=(0.5, 1.5, 3.0),
      error_taus=(1.0, 3.0),
      ks=(1, 4, 16),
      k=4,
      phase_ns=(32, 128),
      phase_taus=(0.5, 2.0, 4.0),
      fixed_k=2,
      table_trials=1,
      table_ns=(64,),
      table_ds=(8,),
    )


def _weight_scale_for_tau(tau, d, sigma=1.0):
  """Weight entry scale that makes `E tau_i^2 ~ tau^2` (`tau ~ sigma^2 ws^2 d`)."""
  return np.sqrt(np.asarray(tau, np.float64) / (sigma**2 * d))


def report_points(config: ReportConfig):
  """The parameter points of the report, with a `part` label per point.

  Returns:
    `(points, part)`: sweep parameter columns and a `[P]` array of labels
    "sparsity", "error", "phase", "fixed" or "power".
  """
  from gsparse import _theory

  c = config
  cols = {p: [] for p in ("n", "d", "sigma", "weight_scale", "k", "eps")}
  part = []

  def add(label, n, tau, k):
    cols["n"].append(n)
    cols["d"].append(c.d)
    cols["sigma"].append(1.0)
    cols["weight_scale"].append(float(_weight_scale_for_tau(tau, c.d)))
    cols["k"].append(int(min(k, n)))
    cols["eps"].append(c.eps)
    part.append(label)

  for tau in c.taus:
    add("sparsity", c.n_main, tau, c.k)
  for tau in c.error_taus:
    for k in c.ks:
      add("error", c.n_main, tau, k)
  for n in c.phase_ns:
    for tau in c.phase_taus:
      add("phase", n, tau, 1)
  ns = np.asarray(c.phase_ns)
  growth_tau = c.growth_a * np.sqrt(2 * np.log(ns))
  power_k = _theory.power_law_k(ns, alpha=c.alpha, C=c.C)
  for n, tau, kp in zip(c.phase_ns, growth_tau, power_k, strict=True):
    add("fixed", n, tau, c.fixed_k)
    add("power", n, tau, int(kp))
  return cols, np.asarray(part)


@dataclasses.dataclass(frozen=True)
class ReportResult:
  """What `build_report` wrote."""

  out_dir: str
  summary: str
  figures: tuple[str, ...]
  csv: str
  seconds: float


def build_report(
  key: jax.Array,
  out_dir: str,
  *,
  config: ReportConfig | None = None,
  progress: bool = True,
) -> ReportResult:
  """Runs the report's sweep and writes `summary.md`, `sweep.csv` and PNG figures.

  Args:
    key: PRNG key.
    out_dir: folder to write into (created).
    config: what to measure; default `ReportConfig()` (the full default sweep).
    progress: print progress to stderr.

  Returns:
    A `ReportResult` with the paths written.
  """
  import os
  import time

  from gsparse import _theory, figures, sweep

  config = ReportConfig() if config is None else config
  os.makedirs(out_dir, exist_ok=True)
  start = time.perf_counter()
  points, part = report_points(config)
  k_sweep, k_table = jax.random.split(key)
  table = sweep.run_sweep(
    points, key=k_sweep, trials=config.trials, rows=config.rows, progress=progress
  )
  sweep_s = time.perf_counter() - start
  table = _theory.with_bound_columns(table, delta=config.delta)
  csv_path = os.path.join(out_dir, "sweep.csv")
  sweep.SweepTable({**table.columns, "part": part}).to_csv(csv_path)
  figs = figures.report_figures(table, part, config, out_dir)
  legacy = sparsity_table(
    k_table,
    ns=(256,),
    ds=(16,),
    sigmas=(1.0, 2.0),
    eps=config.eps,
    k=config.k,
    trials=config.table_trials,
  )
  seconds = time.perf_counter() - start
  text = figures.summary_markdown(
    table,
    part,
    config,
    figs,
    legacy_table=format_table(legacy),
    sweep_seconds=sweep_s,
    total_seconds=seconds,
  )
  summary = os.path.join(out_dir, "summary.md")
  with open(summary, "w") as f:
    f.write(text)
  return ReportResult(out_dir, summary, tuple(figs.values()), csv_path, seconds)
