"""Renders a `gsparse-verify-bounds` run's JSON: the per-setting row, the summary figures,
the Markdown page and the plot (split from verify_bounds.py to keep each module small)."""

from __future__ import annotations

import math

import numpy as np

HEADER = (
  "| d | n | tau | rows | k bound | k emp | k ratio | viol k | "
  "err bound (k=8/32) | err emp | err ratio | 2V bound | 2V ratio | tail bound / 1-k/n | "
  "slack single/multi/band | viol err / 2V | cert viol | logESS emp/pred |"
)


def fmt_row(r: dict) -> str:
  eb = "/".join(f"{v:.3g}" for v in r["error_bound"])
  ee = "/".join(f"{v:.3g}" for v in r["error_empirical_max"])
  er = "/".join(f"{v:.3g}" for v in r["error_ratio"])
  eb2 = "/".join(f"{v:.3g}" for v in r.get("error_bound_2v", [])) or "-"
  er2 = "/".join(f"{v:.3g}" for v in r.get("error_ratio_2v", [])) or "-"
  v2 = sum(r.get("violations_error_2v", [0]))
  k_b = f"{r['k_bound']:.0f}" + ("" if r["informative"] else "*")
  tb = "/".join(
    f"{b:.3g}/{1 - k / r['n']:.3g}" for b, k in zip(r["tail_bound"], r["ks"], strict=True)
  )
  extra = [r.get(f) for f in ("multi_tail_max_slack", "band_tail_max_slack")]
  sl = "/".join(
    [f"{r['cert_tail_max_slack']:.3g}"] + ["-" if v is None else f"{v:.3g}" for v in extra]
  )
  return (
    f"| {r['d']} | {r['n']} | {r['tau_target']:g} | {r['rows']} | {k_b} | "
    f"{r['k_empirical_max']} | {r['k_ratio']:.2f} | {r['violations_k']} | {eb} | {ee} | {er} | "
    f"{eb2} | {er2} | {tb} | {sl} | "
    f"{sum(r['violations_error'])} / {v2} | {r['cert_violations']} | "
    f"{r['median_log_ess']:.2f}/{r['predicted_log_ess_at_median_tau']:.2f} |"
  )


def _quantiles(v) -> str:
  v = np.asarray(v, np.float64)
  if v.size == 0:
    return "n/a"
  return f"{v.min():.3g} / {np.median(v):.3g} / {v.max():.3g}"


# The three tail-mass certificates: (label in the summary, column of a row).
# Older runs' JSON lacks the multi-gap and band-count columns.
_CERTIFICATES = (
  ("single-gap", "cert_tail_max_slack"),
  ("multi-gap", "multi_tail_max_slack"),
  ("band-count", "band_tail_max_slack"),
)


def summary_figures(res: dict) -> dict:
  """The figures that docs quote, computed from a run's JSON (one place, never typed by hand)."""
  rows = res["rows"]
  big = [r for r in rows if r["tau_target"] >= 1]
  kr = [r["k_ratio"] for r in big]
  er = [v for r in rows for v in r["error_ratio"]]
  pairs = [(r, i) for r in rows for i in range(len(r["ks"]))]
  tail_vs_trivial = [r["tail_bound"][i] >= 1 - r["ks"][i] / r["n"] for r, i in pairs]
  low = lambda r, i: r["tail_empirical_max"][i] <= 0.5  # noqa: E731
  tf = [r["tail_bound"][i] / max(r["tail_empirical_max"][i], 1e-30) for r, i in pairs]
  collapsed = [r for r in rows if r["tau_target"] >= math.sqrt(2 * math.log(r["n"]))]
  out = {
    "settings": len(rows),
    "k_ratio_tau_ge_1 (min/median/max)": _quantiles(kr),
    "k_ratio_tau_ge_1 within 2x": f"{sum(v <= 2 for v in kr)} of {len(kr)}",
    "k_ratio_tau_ge_1 within 3x": f"{sum(v <= 3 for v in kr)} of {len(kr)}",
    "k_ratio all (min/median/max)": _quantiles([r["k_ratio"] for r in rows]),
    "k bound / trivial k (min/median/max)": _quantiles(
      [r["k_bound"] / r["k_trivial"] for r in rows]
    ),
    "tail bound (min/median/max)": _quantiles([r["tail_bound"][i] for r, i in pairs]),
    "tail bound >= trivial 1 - k/n": f"{sum(tail_vs_trivial)} of {len(pairs)} (setting, k) pairs",
    "tail bound < 1 - k/n where the worst observed tail <= 0.5": (
      f"{sum(not v for v, (r, i) in zip(tail_vs_trivial, pairs, strict=True) if low(r, i))}"
      f" of {sum(low(r, i) for r, i in pairs)} (setting, k) pairs"
    ),
    "error ratio (min/median/max)": _quantiles(er),
    "tail factor: tail bound / worst observed tail (min/median/max)": _quantiles(tf),
    "value factor: error ratio / tail factor (min/median/max)": _quantiles(
      [e / t for e, t in zip(er, tf, strict=True)]
    ),
    "value factor 2 V / observed max ||v|| (min/median/max)": _quantiles(
      [2 * r["value_norm_bound"] / r["value_norm_empirical_max"] for r in rows]
    ),
    "tau_lo bound / target tau (min/median/max)": _quantiles(
      [r["tau_lo_bound"] / r["tau_target"] for r in rows]
    ),
    "tau_hi bound / target tau (min/median/max)": _quantiles(
      [r["tau_hi_bound"] / r["tau_target"] for r in rows]
    ),
    "observed row tau / target tau (min..max)": (
      f"{min(r['tau_row_min'] / r['tau_target'] for r in rows):.3g}.."
      f"{max(r['tau_row_max'] / r['tau_target'] for r in rows):.3g}"
    ),
  }
  out.update(_isotropic_figures(rows, er, tf))
  for label, column in _CERTIFICATES:
    if all(column in r for r in rows):
      out[f"{label} certificate slack, max per setting (min/median/max)"] = _quantiles(
        [r[column] for r in rows]
      )
      if collapsed:
        out[f"{label} slack, collapsed settings (min/median/max)"] = _quantiles(
          [r[column] for r in collapsed]
        )
  s = res["summary"]
  out["violations (Thm 1 / Thm 2 error / Thm 2 tail / certificates)"] = (
    f"{s['violations_k']} / {s['violations_error']} / {s['violations_tail']} / "
    f"{s['cert_violations'] + s.get('multi_violations', 0)}"
  )
  if "violations_error_2v" in s:
    out["violations, Theorem 2V error"] = str(s["violations_error_2v"])
  return out


def _isotropic_figures(rows: list[dict], er: list[float], tf: list[float]) -> dict:
  """Theorem 2V against Theorem 2 and the observed error, and where its factor sits."""
  if not all("error_ratio_2v" in r for r in rows):
    return {}
  er2 = [v for r in rows for v in r["error_ratio_2v"]]
  split = [s for r in rows for s in r["split_2v"]]
  share = lambda j: [s[j] / max(sum(s), 1e-30) for s in split]  # noqa: E731
  return {
    "Theorem 2V error ratio (min/median/max)": _quantiles(er2),
    "Theorem 2 / Theorem 2V (min/median/max)": _quantiles(
      [a / b for a, b in zip(er, er2, strict=True)]
    ),
    "Theorem 2V value factor: 2V ratio / tail factor (min/median/max)": _quantiles(
      [e / t for e, t in zip(er2, tf, strict=True)]
    ),
    "Theorem 2V split, share of diagonal term (min/median/max)": _quantiles(share(0)),
    "Theorem 2V split, share of along-u mean term (min/median/max)": _quantiles(share(1)),
    "Theorem 2V split, share of Gaussian term (min/median/max)": _quantiles(share(2)),
  }


def markdown(res: dict, before: dict | None = None) -> str:
  """The run as a Markdown page: how it was made, the summary figures, the tables."""
  lines = _markdown_intro(res)
  lines += _summary_table(summary_figures(res), summary_figures(before) if before else None)
  if before:
    lines += ["", f"Before: `{before['summary']['command']}` (an earlier commit)."]
    nb, na = before["summary"]["total_matrices"], res["summary"]["total_matrices"]
    if nb != na:
      lines += [
        "",
        f"The two runs drew {nb} and {na} matrices: the worst observed k, tail and error",
        "come from different sample sizes, so ratios to them (k ratio, error ratio, tail",
        "factor) are not comparable one to one; the bounds themselves are.",
      ]
  if res.get("fixed_tau"):
    lines += _fixed_tau_tables(res["fixed_tau"])
  lines += ["", "## Per setting", "", HEADER, "|" + "---|" * (HEADER.count("|") - 1)]
  lines += [fmt_row(r) for r in res["rows"]]
  return "\n".join(lines) + "\n"


def _markdown_intro(res: dict) -> list[str]:
  s = res["summary"]
  return [
    "# Monte Carlo verification of gsparse.bounds",
    "",
    "Produced by `gsparse-verify-bounds` (gsparse/cli/verify_bounds.py; its docstring "
    "gives the design); every number",
    "below is rendered from the run's JSON by `summary_figures`, none is typed by hand.",
    "",
    f"Command: `{s['command']}`",
    "",
    f"- {s['total_rows']} attention rows in {s['total_matrices']} matrices "
    f"({s['settings']} settings), backend {s['backend']}, {s['seconds']:.0f} s.",
    f"- eps = {res['rows'][0]['eps']}, delta = {res['rows'][0]['delta']}; unit of failure = "
    "one matrix (all its rows); expected failures allowed by delta over all matrices: "
    f"{s['expected_violations_allowed']:.3f}.",
    f"- Theorem 1 violations: {s['violations_k']}; Theorem 2 error violations: "
    f"{s['violations_error']} (tail-mass: {s['violations_tail']}; Theorem 2V: "
    f"{s.get('violations_error_2v', 'not run')}); certificate "
    f"violations beyond float32 rounding: {s['cert_violations']} (multi-gap: "
    f"{s.get('multi_violations', 'not run')}).",
    f"- Theorem 1 beat the trivial ceil(1/eps) - 1 in {s['informative_settings']} of "
    f"{s['settings']} settings (`*` marks the others: the bound returned the trivial k).",
    "- k ratio = Theorem-1 k / worst observed minimal k; err ratio = Theorem-2 error / worst",
    "  observed error; slack = certificate / true tail, the worst row; collapsed settings are",
    "  those with tau >= sqrt(2 ln n); 2V = Theorem 2V (`isotropic_error_bound`, docs/theory.md",
    "  4.2), its split = diagonal / along-u mean / Gaussian terms at its own worst case.",
    "",
  ]


def _summary_table(fig: dict, old: dict | None) -> list[str]:
  """The summary figures, with a before column when `old` (an earlier run's) is given."""
  lines = [
    "## Summary",
    "",
    "| figure | " + ("before | after |" if old is not None else "value |"),
    "|---|---|" + ("---|" if old is not None else ""),
  ]
  for name, v in fig.items():
    lines.append(
      f"| {name} | " + (f"{old.get(name, 'n/a')} | {v} |" if old is not None else f"{v} |")
    )
  return lines


def _fixed_tau_tables(ft: list[dict]) -> list[str]:
  """Theorems 1/1R (and 2/2R when present) at a known row scale, against the observed worst."""
  lines = [
    "",
    f"## Known row scale (n = {ft[0]['n']}, per-row level delta / (2n) = "
    f"{ft[0]['delta_row']:.3g}, {ft[0]['rows']} Monte Carlo rows per tau)",
    "",
    "| tau | Theorem 1 core at [tau, tau] | Theorem 1R | worst observed | 1R / observed |",
    "|---|---|---|---|---|",
  ]
  lines += [
    f"| {r['tau']:g} | {r['k_theorem1_core']:.0f} | {r['k_theorem1r']:.0f} | "
    f"{r['k_worst_observed']} | {r['k_theorem1r'] / r['k_worst_observed']:.2f} |"
    for r in ft
  ]
  if "tail_theorem2r" not in ft[0]:
    return lines
  lines += [
    "",
    "| tau | k | Theorem 2 core tail at [tau, tau] | Theorem 2R tail | worst observed | 1 - k/n |",
    "|---|---|---|---|---|---|",
  ]
  return lines + [
    f"| {r['tau']:g} | {k} | {a:.3g} | {b:.3g} | {c:.3g} | {1 - k / r['n']:.3g} |"
    for r in ft
    for k, a, b, c in zip(
      r["ks"], r["tail_theorem2_core"], r["tail_theorem2r"], r["tail_worst_observed"], strict=True
    )
  ]


def plot(res: dict, path: str) -> None:
  import matplotlib.pyplot as plt  # the Agg backend was selected by main()

  rows = res["rows"]
  ds = sorted({r["d"] for r in rows})
  fig, axes = plt.subplots(1, len(ds), figsize=(4.5 * len(ds), 3.6), squeeze=False)
  for ax, d in zip(axes[0], ds, strict=True):
    for n in sorted({r["n"] for r in rows}):
      sel = sorted((r for r in rows if r["d"] == d and r["n"] == n), key=lambda r: r["tau_target"])
      x = [r["tau_target"] for r in sel]
      (line,) = ax.plot(x, [r["k_bound"] for r in sel], "-o", label=f"bound n={n}")
      ax.plot(x, [r["k_empirical_max"] for r in sel], "--x", color=line.get_color(), label="emp.")
    triv = math.ceil(1 / rows[0]["eps"]) - 1
    ax.axhline(triv, color="k", lw=0.8, ls=":", label="ceil(1/eps) - 1")
    ax.set_xscale("log")
    ax.set_xlabel("sqrt(E tau^2)")
    ax.set_ylabel(f"k at eps={rows[0]['eps']}")
    ax.set_title(f"d={d}")
  axes[0][0].legend(fontsize=6, ncol=2)
  fig.tight_layout()
  fig.savefig(path, dpi=120)
