"""The default report: how sparse is attention on Gaussian input?

Library code of the `gsparse-report` command (`gsparse.cli.report`). It draws
the paper's Gaussian setting over a grid of (n, tau, k), measures every
attention row by Monte Carlo (`gsparse.sweep`), adds the bounds of
`gsparse.bounds` and writes figures (`gsparse.figures`, needs matplotlib) and
a Markdown summary.
"""

from __future__ import annotations

import dataclasses
import os
import sys
import time
from collections.abc import Callable

import jax
import numpy as np

from gsparse import _theory, sweep

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


# The parts whose figures and summary lines use each theorem: Theorem 1 (`bound_k`)
# is drawn against the sparsity points, Theorem 2 (`bound_error`, `bound_tail`)
# against the error-vs-k and n^C points. The phase diagram uses neither.
_THEOREM_1_PARTS = ("sparsity",)
_THEOREM_2_PARTS = ("error", "fixed", "power")


def measure(
  key: jax.Array,
  config: ReportConfig | None = None,
  *,
  progress: bool = True,
  on_phase: Callable[[str, str], None] | None = None,
) -> tuple[sweep.SweepTable, np.ndarray]:
  """The report's measurements: its sweep plus the bounds of Theorems 1 and 2.

  Args:
    key: PRNG key of the Monte Carlo draws.
    config: what to measure; default `ReportConfig()`.
    progress: print the sweep's progress line to stderr.
    on_phase: called as `on_phase(name, description)` when the "sweep" and
      the "bounds" phase start (the report prints them).

  Returns:
    `(table, part)`: a `SweepTable` with one row per point of
    `report_points(config)` and the `[P]` part labels. Besides the measured
    columns of `gsparse.sweep` it has `bound_k` (Theorem 1) at the
    "sparsity" points and `bound_error`, `bound_tail` (Theorem 2) at the
    "error", "fixed" and "power" points, NaN elsewhere: the bounds are
    evaluated where the report shows them. Without `gsparse.bounds` the
    bound columns are left out.
  """
  config = ReportConfig() if config is None else config
  on_phase = on_phase or (lambda name, description: None)
  points, part = report_points(config)
  on_phase(
    "sweep",
    f"sweep: {len(part)} points, {config.trials} draws x {config.rows} rows each, "
    f"n up to {max(points['n'])}",
  )
  one = np.isin(part, _THEOREM_1_PARTS)
  two = np.isin(part, _THEOREM_2_PARTS)
  table = sweep.run_sweep(
    points, key=key, trials=config.trials, rows=config.rows, progress=progress
  )
  on_phase(
    "bounds",
    f"bounds: Theorem 1 at {int(one.sum())} points, Theorem 2 at {int(two.sum())} points",
  )
  k = _theory.sparsity_k(table.where(one), delta=config.delta)
  err, tail = _theory.topk_error(table.where(two), delta=config.delta)
  cols = {c: np.full(len(table), np.nan) for c in ("bound_k", "bound_error", "bound_tail")}
  cols["bound_k"][one] = k
  cols["bound_error"][two], cols["bound_tail"][two] = err, tail
  return sweep.SweepTable({**table.columns, **cols}), part


class _Phases:
  """One progress line per phase of the report on stderr, with the time since the start."""

  def __init__(self, total: int, enabled: bool):
    self.total, self.enabled = total, enabled
    self.start = time.perf_counter()
    self.count = 0
    self.seconds: dict[str, float] = {}
    self._name, self._since = None, self.start

  def elapsed(self) -> float:
    return time.perf_counter() - self.start

  def _close(self) -> None:
    if self._name is not None:
      self.seconds[self._name] = time.perf_counter() - self._since

  def begin(self, name: str, what: str) -> None:
    """Ends the running phase and starts `name`; prints `what` is being done."""
    self._close()
    self.count += 1
    self._name, self._since = name, time.perf_counter()
    self._print(f"{self.count}/{self.total} {what}")

  def end(self, what: str) -> None:
    self._close()
    self._name = None
    self._print(what)

  def _print(self, text: str) -> None:
    if self.enabled:
      print(f"report [{self.elapsed():6.1f} s] {text}", file=sys.stderr, flush=True)


@dataclasses.dataclass(frozen=True)
class ReportResult:
  """What `build_report` wrote, and how long each phase took."""

  out_dir: str
  summary: str
  figures: tuple[str, ...]
  csv: str
  seconds: float
  phase_seconds: dict[str, float]


def build_report(
  key: jax.Array,
  out_dir: str,
  *,
  config: ReportConfig | None = None,
  progress: bool = True,
) -> ReportResult:
  """Runs the report's sweep and writes `summary.md`, `sweep.csv` and PNG figures.

  Needs matplotlib (`pip install 'gsparse-jax[report]'`).

  Args:
    key: PRNG key.
    out_dir: folder to write into (created).
    config: what to measure; default `ReportConfig()`.
    progress: print a line to stderr as each phase starts (with the time
      since the start) and the sweep's progress line.

  Returns:
    A `ReportResult` with the paths written and the seconds of each phase.
  """
  from gsparse import figures  # imports matplotlib

  config = ReportConfig() if config is None else config
  phases = _Phases(4, progress)
  table, part = measure(key, config, progress=progress, on_phase=phases.begin)
  os.makedirs(out_dir, exist_ok=True)
  csv_path = os.path.join(out_dir, "sweep.csv")
  sweep.SweepTable({**table.columns, "part": part}).to_csv(csv_path)
  phases.begin("figures", f"figures: 4 PNG files into {out_dir}")
  figs = figures.report_figures(table, part, config, out_dir)
  phases.begin("summary", "summary: summary.md")
  text = figures.summary_markdown(
    table,
    part,
    config,
    figs,
    phase_seconds=dict(phases.seconds),
    total_seconds=phases.elapsed(),
  )
  summary = os.path.join(out_dir, "summary.md")
  with open(summary, "w") as f:
    f.write(text)
  phases.end("done")
  return ReportResult(
    out_dir, summary, tuple(figs.values()), csv_path, phases.elapsed(), dict(phases.seconds)
  )
