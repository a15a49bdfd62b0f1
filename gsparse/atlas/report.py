"""Figures (PNG, matplotlib imported lazily) and the Markdown report of an atlas."""

from __future__ import annotations

import os
from collections.abc import Mapping

import numpy as np

from gsparse.atlas.measure import Atlas
from gsparse.atlas.recommend import Validation


def _plt():
  import matplotlib

  if not os.environ.get("MPLBACKEND"):
    matplotlib.use("Agg")
  import matplotlib.pyplot as plt

  return plt


def fig_needed_k_heatmap(atlas: Atlas, tol_index: int, path: str, *, quantile: float = 0.9):
  """Layers x heads heatmap of the `quantile` of the needed k (log colour scale)."""
  plt = _plt()
  from matplotlib.colors import LogNorm

  nh = max(x.num_heads for x in atlas.layers)
  grid = np.full((len(atlas.layers), nh), np.nan)
  for i, layer in enumerate(atlas.layers):
    grid[i, : layer.num_heads] = layer.needed_quantile(tol_index, quantile)
  fig, ax = plt.subplots(figsize=(max(5.5, 2.5 + 0.7 * nh), 1.4 + 0.45 * len(atlas.layers)))
  im = ax.imshow(np.maximum(grid, 1), norm=LogNorm(vmin=1, vmax=atlas.seq_len), aspect="auto")
  for (i, j), v in np.ndenumerate(grid):
    if np.isfinite(v):
      ax.text(j, i, f"{v:.0f}", ha="center", va="center", fontsize=7, color="w")
  ax.set_yticks(range(len(atlas.layers)), [x.path for x in atlas.layers], fontsize=7)
  ax.set_xticks(range(nh))
  ax.set_xlabel("head")
  tol = atlas.tolerances[tol_index]
  ax.set_title(
    f"needed k ({quantile:.0%} of rows), tail <= {tol:g}, n = {atlas.seq_len}", fontsize=9
  )
  fig.colorbar(im, ax=ax, label="k")
  fig.tight_layout()
  fig.savefig(path, dpi=110)
  plt.close(fig)


def fig_needed_k_distributions(atlas: Atlas, path: str):
  """Per layer, the distribution over rows and heads of the needed k, one box per tolerance."""
  plt = _plt()
  fig, ax = plt.subplots(figsize=(max(5.0, 1.1 * len(atlas.layers) * len(atlas.tolerances)), 4))
  width = 0.8 / len(atlas.tolerances)
  for ti, tol in enumerate(atlas.tolerances):
    data = [x.needed_k[ti][np.isfinite(x.needed_k[ti])] for x in atlas.layers]
    pos = np.arange(len(atlas.layers)) + (ti - (len(atlas.tolerances) - 1) / 2) * width
    bp = ax.boxplot(data, positions=pos, widths=width * 0.9, whis=(1, 99), showfliers=False)
    for line in bp["boxes"]:
      line.set_color(f"C{ti}")
    ax.plot([], [], color=f"C{ti}", label=f"tol {tol:g}")
  ax.set_yscale("log")
  ax.set_xticks(range(len(atlas.layers)), [x.path for x in atlas.layers], rotation=30, fontsize=7)
  ax.set_ylabel("needed k (box: quartiles, whiskers: 1%-99%)")
  ax.set_title(f"needed k per layer over rows and heads, n = {atlas.seq_len}")
  ax.legend(fontsize=7)
  fig.tight_layout()
  fig.savefig(path, dpi=110)
  plt.close(fig)


def fig_power_law_fits(atlas: Atlas, tol_index: int, path: str):
  """Per layer, needed k (geometric mean over rows) against n per head, with the fits."""
  plt = _plt()
  layers = [x for x in atlas.layers if x.fits is not None]
  cols = min(4, max(1, len(layers)))
  rows = -(-max(1, len(layers)) // cols)
  fig, axes = plt.subplots(rows, cols, figsize=(3.2 * cols, 2.8 * rows), squeeze=False)
  for ax, layer in zip(axes.ravel(), layers, strict=False):
    for h, fit in enumerate(layer.fits[tol_index]):
      n = fit.lengths
      ax.plot(n, fit.k, "o", color=f"C{h}", ms=3)
      label = f"h{h}: C={fit.c:.2f} [{fit.c_low:.2f},{fit.c_high:.2f}]"
      ax.plot(n, fit.alpha * n**fit.c, "-", color=f"C{h}", lw=1, label=label)
    ax.set_xscale("log", base=2)
    ax.set_yscale("log")
    ax.set_title(layer.path, fontsize=8)
    ax.legend(fontsize=5)
  for ax in axes.ravel()[len(layers) :]:
    ax.axis("off")
  fig.suptitle(f"needed k ~ alpha n^C, tail mass <= {atlas.tolerances[tol_index]:g}", fontsize=9)
  fig.supxlabel("context length n", fontsize=8)
  fig.tight_layout()
  fig.savefig(path, dpi=110)
  plt.close(fig)


def fig_predicted_vs_measured(atlas: Atlas, path: str):
  """Per head: Gaussian predictions of the effective support against the measured one."""
  plt = _plt()
  measured = np.concatenate([x.support() for x in atlas.layers])
  row = np.concatenate([np.nanmean(x.predicted_row, -1) for x in atlas.layers])
  wts = np.concatenate([x.predicted_weights for x in atlas.layers])
  fig, ax = plt.subplots(figsize=(5, 4.4))
  sp = atlas.spearman
  ax.loglog(measured, row, "o", ms=4, label=f"from row logit scale (rho={sp['row_tau_heads']:.2f})")
  ax.loglog(
    measured, wts, "s", ms=4, mfc="none", label=f"from weights (rho={sp['weights_heads']:.2f})"
  )
  lim = [1, atlas.seq_len]
  ax.plot(lim, lim, "k:", lw=1, label="y = x")
  ax.set_xlabel("measured mean effective support")
  ax.set_ylabel("predicted effective support")
  ax.set_title("Gaussian predictions per head (rho: Spearman)", fontsize=9)
  ax.legend(fontsize=7)
  fig.tight_layout()
  fig.savefig(path, dpi=110)
  plt.close(fig)


def write_figures(atlas: Atlas, out_dir: str, *, tolerance: float) -> dict[str, str]:
  """Writes the four figures to `out_dir`; returns name -> file name."""
  os.makedirs(out_dir, exist_ok=True)
  i = atlas.tol_index(tolerance)
  names = {
    "heatmap": "needed_k_heatmap.png",
    "distributions": "needed_k_distributions.png",
    "fits": "power_law_fits.png",
    "predicted": "predicted_vs_measured.png",
  }
  fig_needed_k_heatmap(atlas, i, os.path.join(out_dir, names["heatmap"]))
  fig_needed_k_distributions(atlas, os.path.join(out_dir, names["distributions"]))
  if any(x.fits is not None for x in atlas.layers):
    fig_power_law_fits(atlas, i, os.path.join(out_dir, names["fits"]))
  else:
    del names["fits"]
  fig_predicted_vs_measured(atlas, os.path.join(out_dir, names["predicted"]))
  return names


def _f(x: float, fmt: str = ".3g") -> str:
  return "n/a" if x is None or not np.isfinite(x) else format(x, fmt)


def _head_table(atlas: Atlas, i: int) -> list[str]:
  tol = atlas.tolerances[i]
  lines = [
    f"| layer | head | support | pred. (row tau) | pred. (weights) | median tau | "
    f"needed k q50/q90/q99 (tol {tol:g}) | certified k - needed k | C [90% CI] | phase |",
    "|---|---|---|---|---|---|---|---|---|---|",
  ]
  for layer in atlas.layers:
    sup, gap = layer.support(), layer.certified_gap(i)
    row = np.nanmean(layer.predicted_row, -1)
    tau = np.nanmedian(layer.tau, -1)
    qs = [layer.needed_quantile(i, q) for q in (0.5, 0.9, 0.99)]
    phases = layer.phases(i)
    for h in range(layer.num_heads):
      fit = None if layer.fits is None else layer.fits[i][h]
      c = "n/a" if fit is None else f"{fit.c:.2f} [{fit.c_low:.2f}, {fit.c_high:.2f}]"
      lines.append(
        f"| {layer.path} | {h} | {_f(sup[h])} | {_f(row[h])} | {_f(layer.predicted_weights[h])} "
        f"| {_f(tau[h])} | {'/'.join(_f(q[h], '.0f') for q in qs)} | {_f(gap[h], '.1f')} "
        f"| {c} | {phases[h]} |"
      )
  return lines


def markdown(
  atlas: Atlas,
  *,
  tolerance: float,
  config: Mapping[str, int | None] | None = None,
  validation: Validation | None = None,
  figures: Mapping[str, str] | None = None,
  header: str = "",
) -> str:
  """The atlas as a Markdown report (tables; figure links when given)."""
  i = atlas.tol_index(tolerance)
  out = ["# Sparsity atlas", ""]
  if header:
    out += [header, ""]
  out += [
    f"Input length n = {atlas.seq_len}; prefixes for the n^C fits: {list(atlas.lengths)}; "
    f"tolerances {list(atlas.tolerances)} (tables at tol = {tolerance:g}). "
    "Support: mean over rows of 1 / sum_j p_j^2. Needed k: smallest k whose exact top-k tail "
    "mass is <= tol. Certified k: what `CertifiedK` (exact top-k selection) keeps for the row. "
    "C: exponent of needed k ~ alpha n^C (geometric mean over rows that see more than half "
    "the prefix), 90% bootstrap interval over rows.",
    "",
  ]
  out += _head_table(atlas, i) + [""]
  sp = atlas.spearman
  out += [
    "## How well the Gaussian predictions rank the support (Spearman)",
    "",
    "| prediction | over layers | over heads |",
    "|---|---|---|",
    f"| per-row logit scale (`predicted_effective_support`) | {_f(sp.get('row_tau_layers'), '.2f')}"
    f" | {_f(sp.get('row_tau_heads'), '.2f')} |",
    f"| weights (`rank_attention_layers`) | {_f(sp.get('weights_layers'), '.2f')} "
    f"| {_f(sp.get('weights_heads'), '.2f')} |",
    "",
  ]
  if atlas.skipped:
    out += ["## Layers not recorded", "", "| layer | reason |", "|---|---|"]
    out += [f"| {p} | {r} |" for p, r in atlas.skipped.items()] + [""]
  if config is not None:
    out += [f"## Recommended config (tol = {tolerance:g})", "", "```python", repr(dict(config))]
    out += ["```", ""]
  if validation is not None:
    v = validation
    out += [
      "## Validation on held-aside inputs",
      "",
      "| output change (rel. L2) | max abs change | loss dense | loss config | loss change "
      "| time dense (s) | time config (s) | speed-up |",
      "|---|---|---|---|---|---|---|---|",
      f"| {_f(v.output_change)} | {_f(v.max_abs_change)} | {_f(v.loss_dense, '.4f')} "
      f"| {_f(v.loss_sparse, '.4f')} | {_f(v.loss_change, '+.4f')} | {_f(v.time_dense_s, '.4f')} "
      f"| {_f(v.time_sparse_s, '.4f')} | {_f(v.speedup, '.2f')} |",
      "",
      f"Times: median of {v.repeats} interleaved jitted calls after a warm-up.",
      "",
    ]
  for name, fname in (figures or {}).items():
    out += [f"![{name}]({fname})", ""]
  return "\n".join(out)
