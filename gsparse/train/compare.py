"""Runs every variant for several seeds and tabulates the comparison."""

from __future__ import annotations

import dataclasses
import json
import pathlib
import statistics
from collections.abc import Callable, Sequence

import numpy as np

from gsparse.train import data as data_lib
from gsparse.train.experiment import TrainConfig, run_training


def run_all(
  base: TrainConfig,
  variants: Sequence[str],
  seeds: Sequence[int],
  out_dir: str | pathlib.Path,
  *,
  progress: Callable[[str], None] | None = print,
) -> dict[str, list[dict]]:
  """Trains each variant for each seed in `out_dir/<variant>_seed<seed>`.

  Finished runs (a log.json with a "final" entry for the same config) are
  reused; interrupted ones resume from their checkpoint.

  Returns:
    `{variant: [log per seed]}`.
  """
  out_dir = pathlib.Path(out_dir)
  corpus = data_lib.load_stdlib_corpus(
    max_train_bytes=base.max_train_bytes, max_validation_bytes=base.max_validation_bytes
  )
  say = progress or (lambda s: None)
  logs: dict[str, list[dict]] = {}
  for v in variants:
    for seed in seeds:
      cfg = dataclasses.replace(base, variant=v, seed=seed)
      wd = out_dir / f"{v}_seed{seed}"
      done = wd / "log.json"
      want = json.loads(json.dumps(cfg.to_dict()))
      if done.exists():
        log = json.loads(done.read_text())
        if log.get("config") == want and "final" in log:
          say(f"== {v} seed {seed}: reusing {done}")
          logs.setdefault(v, []).append(log)
          continue
      say(f"== {v} seed {seed}")
      logs.setdefault(v, []).append(run_training(cfg, workdir=wd, corpus=corpus, progress=progress))
  return logs


def summarize(logs: dict[str, list[dict]]) -> dict:
  """Per-variant means over seeds of the end-of-training figures."""
  out = {"variants": {}}
  dense = logs.get("dense")
  dense_bpb = statistics.mean(lg["final"]["val_bpb"] for lg in dense) if dense else None
  dense_time = statistics.mean(lg["final"]["median_step_time_s"] for lg in dense) if dense else None
  all_layer_norms, all_layer_eff = [], []
  for v, runs in logs.items():
    fins = [lg["final"] for lg in runs]
    bpbs = [f["val_bpb"] for f in fins]
    times = [f["median_step_time_s"] for f in fins]
    sp = {
      name: np.mean([np.asarray(f["sparsity"][name]) for f in fins], axis=0)  # [L, heads]
      for name in fins[0]["sparsity"]
    }
    norms = np.mean([np.asarray(f["weight_norms"]) for f in fins], axis=0)
    for f in fins:
      all_layer_norms.append(np.asarray(f["weight_norms"]).mean(1))
      all_layer_eff.append(np.asarray(f["sparsity"]["effective_support"]).mean(1))
    row = {
      "runs": len(fins),
      "seeds": [lg["config"]["seed"] for lg in runs],
      "steps": fins[0]["step"],
      "seq_len": runs[0]["config"]["seq_len"],
      "val_bpb_mean": statistics.mean(bpbs),
      "val_bpb_per_seed": bpbs,
      "val_bpb_std": statistics.stdev(bpbs) if len(bpbs) > 1 else 0.0,
      "step_time_s_mean": statistics.mean(times),
      "step_cpu_s_mean": statistics.mean(f.get("median_step_cpu_s", float("nan")) for f in fins),
      "layer_specs": fins[0]["layer_specs"],
      "sparse_layers_per_seed": [lg.get("sparse_layers") for lg in runs],
      # Per layer, mean over heads and seeds.
      "per_layer": {name: val.mean(1).tolist() for name, val in sp.items()},
      "weight_norm_per_layer": norms.mean(1).tolist(),
      "spearman_layer_per_seed": [f["spearman_layer_norm_vs_neg_effective_support"] for f in fins],
      "spearman_head_per_seed": [f["spearman_head_norm_vs_neg_effective_support"] for f in fins],
    }
    if dense_bpb is not None:
      row["val_bpb_minus_dense"] = row["val_bpb_mean"] - dense_bpb
      row["val_bpb_rel_dense"] = row["val_bpb_mean"] / dense_bpb - 1.0
      row["step_time_ratio_dense"] = row["step_time_s_mean"] / dense_time
    out["variants"][v] = row
  return out


def _fmt_list(xs, fmt="{:.2f}") -> str:
  return " / ".join(fmt.format(x) for x in xs)


def markdown(summary: dict, *, measure_eps: float, measure_k: int) -> str:
  """The results as Markdown tables."""
  rows = summary["variants"]
  first = next(iter(rows.values()))
  lines = [
    f"Steps {first['steps']}, sequence length {first['seq_len']}, "
    f"{first['runs']} seeds per variant ({', '.join(map(str, first['seeds']))}).",
    "",
    "| variant | attention per layer | val bits/byte (mean) | per seed | vs dense | "
    "step time (s) | vs dense | CPU s/step |",
    "|---|---|---|---|---|---|---|---|",
  ]
  for v, r in rows.items():
    delta = (
      f"{r['val_bpb_minus_dense']:+.4f} ({100 * r['val_bpb_rel_dense']:+.2f}%)"
      if "val_bpb_minus_dense" in r
      else "n/a"
    )
    tratio = f"{r['step_time_ratio_dense']:.2f}x" if "step_time_ratio_dense" in r else "n/a"
    specs = ", ".join(sorted(set(r["layer_specs"])))
    if v == "select":
      specs = "sparse layers " + "; ".join(str(s) for s in r["sparse_layers_per_seed"])
    lines.append(
      f"| {v} | {specs} | {r['val_bpb_mean']:.4f} | {_fmt_list(r['val_bpb_per_seed'], '{:.4f}')} "
      f"| {delta} | {r['step_time_s_mean']:.3f} | {tratio} | {r['step_cpu_s_mean']:.2f} |"
    )
  lines += [
    "",
    f"Measured per layer at the end of training (layers 0 / 1 / ..., mean over heads, "
    f"validation rows and seeds): `min_k` = entries of the dense softmax row above "
    f"eps={measure_eps}; `eff. support` = 1/sum p^2; `tail@{measure_k}` = exact softmax mass "
    f"outside the top {measure_k}; `cert@{measure_k}` = its a-posteriori certificate "
    f"(TopKStats.tail_mass_bound, mean); `kept` / `own cert` = keys the layer's policy kept "
    f"and the certified mass it dropped.",
    "",
    f"| variant | min_k | eff. support | tail@{measure_k} | cert@{measure_k} | kept | own cert | "
    "‖scale·W_Q W_K^T‖_F |",
    "|---|---|---|---|---|---|---|---|",
  ]
  for v, r in rows.items():
    pl = r["per_layer"]
    lines.append(
      f"| {v} | {_fmt_list(pl['min_k'], '{:.1f}')} | {_fmt_list(pl['effective_support'], '{:.1f}')}"
      f" | {_fmt_list(pl['tail_mass'], '{:.3f}')} | {_fmt_list(pl['tail_bound'], '{:.3f}')}"
      f" | {_fmt_list(pl['kept'], '{:.1f}')} | {_fmt_list(pl['own_tail_bound'], '{:.3f}')}"
      f" | {_fmt_list(r['weight_norm_per_layer'], '{:.2f}')} |"
    )
  lines += [
    "",
    "Weight-norm prediction vs measured sparsity: Spearman correlation between "
    "‖scale·W_Q W_K^T‖_F (LayerNorm scale folded in) and minus the effective support "
    "(+1: larger norm = sparser, as predicted), per seed.",
    "",
    "| variant | per layer | per head |",
    "|---|---|---|",
  ]
  for v, r in rows.items():
    lines.append(
      f"| {v} | {_fmt_list(r['spearman_layer_per_seed'], '{:+.2f}')} "
      f"| {_fmt_list(r['spearman_head_per_seed'], '{:+.2f}')} |"
    )
  return "\n".join(lines) + "\n"
