"""Figures and the Markdown summary of the default report (matplotlib).

matplotlib is an optional dependency (`pip install 'gsparse-jax[report]'`);
importing this module without it raises an `ImportError` that says so.
The figures are saved as PNG files and closed, so any backend works;
`gsparse-report` selects the non-interactive Agg backend.

Every figure function takes a `gsparse.sweep.SweepTable` (and the report's
part labels) and writes one PNG. Theory curves come from `gsparse._theory`;
when `gsparse.bounds` is missing they are left out and the figure says so.
"""

from __future__ import annotations

import os

import numpy as np

try:
  import matplotlib.pyplot as plt
except ImportError as e:  # an optional dependency: say how to get it
  raise ImportError(
    "gsparse.figures (the report's figures) needs matplotlib, an optional dependency of "
    "gsparse: pip install 'gsparse-jax[report]' (or pip install matplotlib)"
  ) from e

from gsparse import _theory

_COLORS = plt.rcParams["axes.prop_cycle"].by_key()["color"]


def _note_missing(ax, what="theory curves"):
  ax.text(
    0.02,
    0.02,
    f"no {what}: the table has no bound column",
    transform=ax.transAxes,
    fontsize=7,
    color="gray",
  )


def _sub(table, part, label):
  t = table.where(part == label)
  return t.sort_by("n", "weight_scale", "k")


def fig_sparsity_vs_tau(table, part, config, path):
  """Empirical min k at eps (mean, 99% quantile, max) and Theorem 1's k against tau."""
  t = _sub(table, part, "sparsity").sort_by("tau_mean")
  tau = t["tau_mean"]
  fig, ax = plt.subplots(figsize=(6.4, 4.4))
  ax.plot(tau, t["min_k_mean"], "o-", label="Monte Carlo: mean min k")
  ax.plot(tau, t["min_k_q99"], "s-", label="Monte Carlo: 99% quantile")
  ax.plot(tau, t["min_k_max"], "^-", label="Monte Carlo: max over rows")
  bound = t["bound_k"] if "bound_k" in t.names else None
  if bound is not None:
    ax.plot(tau, bound, "k--", lw=2, label=f"Theorem 1 bound (delta={config.delta:g})")
  else:
    _note_missing(ax, "Theorem 1 curve")
  ax.axhline(
    _theory.trivial_k(config.eps), color="gray", ls=":", label="trivial k = ceil(1/eps) - 1"
  )
  ax.set_yscale("symlog", linthresh=1)
  ax.set_xlabel("tau = sigma ||M^T x_i|| (measured mean)")
  ax.set_ylabel(f"smallest k with (eps={config.eps:g}, k)-sparse rows")
  rows = int(t["trials"][0] * t["rows"][0])
  ax.set_title(f"Sparsity vs tau (n={int(t['n'][0])}, d={config.d}, {rows} rows per point)")
  ax.grid(alpha=0.3, which="both")
  ax.legend(fontsize=8)
  fig.tight_layout()
  fig.savefig(path, dpi=90)
  plt.close(fig)
  return bound


def fig_error_vs_k(table, part, config, path):
  """Top-k output error vs k: Monte Carlo, the certificate and Theorem 2."""
  t = _sub(table, part, "error")
  fig, ax = plt.subplots(figsize=(6.4, 4.4))
  has_bound = "bound_error" in t.names
  for i, ws in enumerate(np.unique(t["weight_scale"])):
    sel = t["weight_scale"] == ws
    s = t.where(sel).sort_by("k")
    c = _COLORS[i % len(_COLORS)]
    tau = float(np.mean(s["tau_mean"]))
    ax.plot(s["k"], s["error_mean"], "o-", color=c, label=f"tau~{tau:.2g}: mean error")
    ax.plot(s["k"], s["error_max"], "s--", color=c, ms=4, label=f"tau~{tau:.2g}: max error")
    ax.plot(s["k"], s["cert_error_max"], "^:", color=c, label=f"tau~{tau:.2g}: certificate (max)")
    if has_bound:
      ax.plot(
        s["k"], s["bound_error"], "x-.", color=c, lw=1, label=f"tau~{tau:.2g}: Theorem 2 bound"
      )
  if not has_bound:
    _note_missing(ax, "Theorem 2 curve")
  ax.set_xscale("log", base=2)
  ax.set_yscale("log")
  ax.set_xlabel("k (keys kept per query)")
  ax.set_ylabel("||o - o_k||_2 (top-k output error)")
  ax.set_title(f"Top-k error vs k (n={int(t['n'][0])}, d={config.d})")
  ax.grid(alpha=0.3, which="both")
  ax.legend(fontsize=6, ncol=2)
  fig.tight_layout()
  fig.savefig(path, dpi=90)
  plt.close(fig)


def fig_phase_diagram(table, part, config, path):
  """Effective support in (n, tau): measured exponent C, predicted regime boundaries."""
  t = _sub(table, part, "phase")
  n = t["n"].astype(np.float64)
  c_hat = np.log(np.maximum(t["support_mean"], 1.0)) / np.log(n)
  fig, (ax, ax2) = plt.subplots(1, 2, figsize=(11, 4.4))
  sc = ax.scatter(t["tau_mean"], n, c=c_hat, cmap="viridis", vmin=0, vmax=1, s=90, marker="s")
  fig.colorbar(sc, ax=ax, label="measured C = ln(effective support) / ln n")
  ng = np.unique(np.round(np.geomspace(n.min(), n.max(), 100)))
  b = _theory.boundaries(ng)
  ax.plot(b[0], ng, "w--", lw=2)
  ax.plot(b[0], ng, "k--", lw=1, label="diffuse | n^C: tau = sqrt(ln n / 2) (predicted)")
  ax.plot(b[1], ng, "r-", lw=2, label="n^C | collapsed: tau = sqrt(2 ln n) (predicted)")
  ax.legend(fontsize=7, loc="lower right", framealpha=0.9)
  ax.set_yscale("log", base=2)
  ax.set_xlabel("tau (measured mean)")
  ax.set_ylabel("n (sequence length)")
  ax.set_title("Phase diagram: diffuse (left), n^C (middle), collapsed (right)", fontsize=10)
  for i, nn in enumerate(np.unique(t["n"])):
    s = t.where(t["n"] == nn).sort_by("tau_mean")
    col = _COLORS[i % len(_COLORS)]
    ax2.plot(s["tau_mean"], s["support_mean"], "o", color=col, label=f"n={nn} measured")
    grid = np.linspace(0, s["tau_mean"].max(), 100)
    pred = _theory.predicted_support(np.full(100, nn), grid)
    ax2.plot(grid, pred, "-", color=col, lw=1, label=f"n={nn} predicted")
  ax2.set_yscale("log")
  ax2.set_xlabel("tau (measured mean)")
  ax2.set_ylabel("effective support 1 / sum_j p_j^2 (mean over rows)")
  ax2.set_title("Effective support: Monte Carlo vs prediction")
  ax2.grid(alpha=0.3, which="both")
  ax2.legend(fontsize=6, ncol=2)
  fig.tight_layout()
  fig.savefig(path, dpi=90)
  plt.close(fig)
  return c_hat


def fig_power_law_vs_fixed(table, part, config, path):
  """Tail mass and error of k = alpha n^C against a fixed k as n grows."""
  fixed = _sub(table, part, "fixed").sort_by("n")
  power = _sub(table, part, "power").sort_by("n")
  fig, (ax, ax2) = plt.subplots(1, 2, figsize=(11, 4.4))
  labels = (f"fixed k = {config.fixed_k}", f"k = {config.alpha:g} n^{config.C:g}")
  for i, (t, lab) in enumerate(zip((fixed, power), labels, strict=True)):
    c = _COLORS[i]
    n = t["n"]
    ax.plot(n, t["tail_mean"], "o-", color=c, label=f"{lab}: measured mean tail")
    pred = _theory.predicted_tail(n, t["tau_mean"], t["k"])
    ax.plot(n, pred, "--", color=c, label=f"{lab}: REM prediction")
    ax2.plot(n, t["error_mean"], "o-", color=c, label=f"{lab}: mean error")
    ax2.plot(n, t["error_max"], "s:", color=c, ms=4, label=f"{lab}: max error")
    if "bound_error" in t.names:
      ax2.plot(n, t["bound_error"], "x-.", color=c, label=f"{lab}: Theorem 2 bound")
  for a in (ax, ax2):
    a.set_xscale("log", base=2)
    a.set_yscale("log")
    a.set_xlabel("n (sequence length)")
    a.grid(alpha=0.3, which="both")
    a.legend(fontsize=7)
  ax.set_ylabel("tail mass outside the top-k")
  ax2.set_ylabel("||o - o_k||_2")
  title = f"tau = {config.growth_a:g} sqrt(2 ln n), d={config.d}"
  ax.set_title(f"Adaptive vs fixed window: tail mass ({title})", fontsize=9)
  ax2.set_title("Adaptive vs fixed window: output error", fontsize=9)
  fig.tight_layout()
  fig.savefig(path, dpi=90)
  plt.close(fig)


def report_figures(table, part, config, out_dir) -> dict[str, str]:
  """Writes the four figures; returns name -> path."""
  paths = {
    "sparsity_vs_tau": os.path.join(out_dir, "sparsity_vs_tau.png"),
    "error_vs_k": os.path.join(out_dir, "error_vs_k.png"),
    "phase_diagram": os.path.join(out_dir, "phase_diagram.png"),
    "power_law_vs_fixed": os.path.join(out_dir, "power_law_vs_fixed.png"),
  }
  fig_sparsity_vs_tau(table, part, config, paths["sparsity_vs_tau"])
  fig_error_vs_k(table, part, config, paths["error_vs_k"])
  fig_phase_diagram(table, part, config, paths["phase_diagram"])
  fig_power_law_vs_fixed(table, part, config, paths["power_law_vs_fixed"])
  return paths


def _fmt(x):
  return f"{x:.3g}"


def summary_markdown(table, part, config, figs, *, phase_seconds, total_seconds) -> str:
  """The report's Markdown text: what was run, the checks with counts, the figures."""
  draws = int(table["trials"][0])
  rows = table["rows"]
  phases = ", ".join(f"{name} {s:.1f} s" for name, s in phase_seconds.items())
  lines = [
    "# gsparse report: how sparse is attention on Gaussian input?",
    "",
    f"Sweep of {len(table)} parameter points, {draws} draws of X per point, "
    f"{int(rows.min())}-{int(rows.max())} query rows measured per draw (d = {config.d}, "
    f"one head, h = d, sigma = 1, weight scale set for a target tau). "
    f"Time: {phases}; whole report {total_seconds:.1f} s. Raw numbers: `sweep.csv`.",
    "",
  ]
  lines += _sparsity_section(table, part, config, figs)
  lines += _error_section(table, part, config, figs)
  lines += _phase_section(table, part, figs)
  lines += _power_law_section(table, part, config, figs)
  return "\n".join(lines)


def _figure(figs, name: str, alt: str) -> list[str]:
  return [f"![{alt}]({os.path.basename(figs[name])})", ""]


def _sparsity_section(table, part, config, figs) -> list[str]:
  """Theorem 1 against the measured minimal k."""
  sp = np.isin(part, ["sparsity"])
  t = table.where(sp)
  lines = ["## Sparsity vs tau", "", *_figure(figs, "sparsity_vs_tau", "sparsity vs tau")]
  if "bound_k" in table.names:
    lines += _theorem1_lines(table, sp, config)
  return lines + [
    f"- Measured mean min k ranges from {_fmt(t['min_k_mean'].min())} (tau ~ "
    f"{_fmt(t['tau_mean'][np.argmin(t['min_k_mean'])])}) to {_fmt(t['min_k_mean'].max())} "
    f"(tau ~ {_fmt(t['tau_mean'][np.argmax(t['min_k_mean'])])}).",
    "",
  ]


def _theorem1_lines(table, sp, config) -> list[str]:
  """Theorem 1's violations and tightness (`sp`: the sparsity points)."""
  kb = table["bound_k"]
  has = ~np.isnan(kb)  # the report evaluates Theorem 1 at the sparsity points
  viol = (table["min_k_max"] > kb) & has
  draws_all = int(np.sum(table["trials"][has]))
  q99 = table["min_k_q99"]
  ok = (q99 > 0) & sp
  ratio = kb[ok] / q99[ok]
  informative = int(np.sum(kb[sp] < _theory.trivial_k(config.eps)))
  return [
    f"- Theorem 1 (delta = {config.delta:g}): over the {int(np.sum(has))} points with the bound "
    f"({draws_all} draws), {int(np.sum(viol))} points have a measured row with more than "
    f"k entries above eps (a violation of the theorem's event in that draw; at most "
    f"delta x draws = {config.delta * draws_all:.2g} violating draws are allowed on average).",
    f"- Tightness on the sparsity points: bound k / measured 99% quantile of min k: "
    f"median {_fmt(np.median(ratio)) if ratio.size else 'n/a'}, range "
    f"[{_fmt(ratio.min()) if ratio.size else 'n/a'}, "
    f"{_fmt(ratio.max()) if ratio.size else 'n/a'}]"
    f"; the bound beats the trivial ceil(1/eps) - 1 = {_theory.trivial_k(config.eps)} at "
    f"{informative} of {int(np.sum(sp))} points.",
  ]


def _error_section(table, part, config, figs) -> list[str]:
  """The certificate (deterministic) and Theorem 2 against the measured top-k error."""
  lines = ["## Top-k error vs k", "", *_figure(figs, "error_vs_k", "error vs k")]
  cert_bad = int(np.sum(table["cert_error_max"] < table["error_max"] * (1 - 1e-4)))
  cert_mean_bad = int(np.sum(table["cert_error_mean"] < table["error_mean"] * (1 - 1e-4)))
  er = table.where(part == "error")
  lines += [
    f"- Certificate (deterministic): max certified error below max observed error at "
    f"{cert_bad} of {len(table)} points; mean certified below mean observed at {cert_mean_bad} "
    "(both must be 0).",
    f"- Certificate over observed error (max/max) on the error points: median "
    f"{_fmt(np.median(er['cert_error_max'] / np.maximum(er['error_max'], 1e-30)))}.",
  ]
  if "bound_error" in table.names:
    eb = table["bound_error"]
    has = ~np.isnan(eb)  # the report evaluates Theorem 2 at the error and n^C points
    viol = int(np.sum((table["error_max"] > eb) & has))
    ratio = eb[part == "error"] / np.maximum(er["error_max"], 1e-30)
    lines += [
      f"- Theorem 2 (delta = {config.delta:g}): {viol} of the {int(np.sum(has))} points with the "
      f"bound have a measured "
      f"error above the bound; bound / max observed error on the error points: median "
      f"{_fmt(np.median(ratio))}.",
    ]
  return lines + [""]


def _phase_section(table, part, figs) -> list[str]:
  """The measured exponent C = ln(ESS) / ln n against the random-energy-model prediction."""
  ph = table.where(part == "phase")
  c_hat = np.log(np.maximum(ph["support_mean"], 1.0)) / np.log(ph["n"])
  pred = _theory.predicted_support(ph["n"], ph["tau_mean"])
  c_pred = np.log(np.maximum(pred, 1.0)) / np.log(ph["n"])
  return [
    "## Phase diagram in (n, tau)",
    "",
    *_figure(figs, "phase_diagram", "phase diagram"),
    f"- Measured exponent C = ln(ESS)/ln n against the random-energy-model prediction at "
    f"the measured tau: mean |difference| {_fmt(np.mean(np.abs(c_hat - c_pred)))}, max "
    f"{_fmt(np.max(np.abs(c_hat - c_pred)))} over {len(ph)} points (the prediction is "
    "exact at exponential scale only: sub-exponential factors and the spread of tau over "
    "rows are not modelled).",
    f"- Measured C ranges from {_fmt(c_hat.min())} to {_fmt(c_hat.max())}.",
    "",
  ]


def _power_law_section(table, part, config, figs) -> list[str]:
  """Tail mass and error of the adaptive window k = alpha n^C against a fixed k."""
  fx = table.where(part == "fixed").sort_by("n")
  pw = table.where(part == "power").sort_by("n")
  lines = [
    "## k = alpha n^C vs fixed k",
    "",
    *_figure(figs, "power_law_vs_fixed", "power law vs fixed"),
    f"tau = {config.growth_a:g} sqrt(2 ln n) grows with n. Mean tail mass:",
    "",
    "| n | fixed k | tail (fixed) | k = alpha n^C | tail (adaptive) | error (fixed) "
    "| error (adaptive) |",
    "|---|---|---|---|---|---|---|",
  ]
  for i in range(len(fx)):
    lines.append(
      f"| {int(fx['n'][i])} | {int(fx['k'][i])} | {_fmt(fx['tail_mean'][i])} | "
      f"{int(pw['k'][i])} | {_fmt(pw['tail_mean'][i])} | {_fmt(fx['error_mean'][i])} | "
      f"{_fmt(pw['error_mean'][i])} |"
    )
  return lines + [""]
