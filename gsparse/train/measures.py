"""Validation measurements and the end-of-training summary of the byte-level LM.

`evaluate` gives validation bits per byte and the per-layer sparsity measures
(`MEASURES`) that the model sows; `final_entry` assembles the log's "final"
entry from them and the weight-norm ranking.
"""

from __future__ import annotations

import math
import statistics

import jax
import numpy as np

from gsparse.train import rank

MEASURES = (
  "min_k",
  "effective_support",
  "tail_mass",
  "tail_bound",
  "tail_bound_max",
  "kept",
  "own_tail_bound",
)


def evaluate(eval_step, params, val: np.ndarray, batch_sharding, num_layers: int) -> tuple:
  """Validation bits per byte and per-layer sparsity over the fixed batches.

  Returns:
    `(bpb, sparsity)` where sparsity maps each name in `MEASURES` to a
    `[num_layers, num_heads]` list, averaged over the batches
    (`tail_bound_max` is the maximum).
  """
  total, count = 0.0, 0
  acc = {name: [] for name in MEASURES}
  for b in val:
    nats, n, inter = eval_step(params, jax.device_put(b, batch_sharding))
    total += float(nats)
    count += int(n)
    inter = jax.device_get(inter)
    for name in MEASURES:
      acc[name].append(
        [
          np.asarray(inter[f"block_{i}"]["attention"][name][0], np.float64)
          for i in range(num_layers)
        ]
      )
  sparsity = {}
  for name, vals in acc.items():
    arr = np.asarray(vals)  # [batches, layers, heads]
    sparsity[name] = (arr.max(0) if name == "tail_bound_max" else arr.mean(0)).tolist()
  return total / count / math.log(2.0), sparsity


def final_entry(
  log: dict, params, *, num_layers: int, layer_specs: list[str], wall_time_s: float
) -> dict:
  """The log's "final" entry: last evaluation, timings, weight norms and rankings.

  Args:
    log: the run's log (its "train" and "eval" entries).
    params: the final parameters (host arrays).
    num_layers: transformer blocks.
    layer_specs: the label of each layer's attention.
    wall_time_s: the run's wall time.
  """
  measured = log["eval"][-1]["sparsity"]
  norms = rank.attention_weight_norms(params, num_layers)
  eff = np.asarray(measured["effective_support"])
  mink = np.asarray(measured["min_k"])
  times = [r["step_time_s"] for r in log["train"]]
  return {
    "step": len(log["train"]),
    "val_bpb": log["eval"][-1]["val_bpb"],
    "final_train_loss": log["train"][-1]["loss"],
    # Median over steps after the first (the first includes compilation).
    "median_step_time_s": statistics.median(times[1:] if len(times) > 1 else times),
    # Process CPU seconds per step (all threads): on a loaded machine, CPU
    # time / cores estimates the wall time the step would take on a quiet one.
    "median_step_cpu_s": statistics.median(
      [r.get("step_cpu_s", float("nan")) for r in log["train"][1:]] or [float("nan")]
    ),
    "mean_load1": mean_load(log["train"][1:]),
    "wall_time_s": wall_time_s,
    "layer_specs": layer_specs,
    "sparsity": measured,
    "weight_norms": norms.tolist(),
    # Larger norm is predicted sparser: smaller effective support / min_k.
    "spearman_layer_norm_vs_neg_effective_support": rank.spearman(norms.mean(1), -eff.mean(1)),
    "spearman_layer_norm_vs_neg_min_k": rank.spearman(norms.mean(1), -mink.mean(1)),
    "spearman_head_norm_vs_neg_effective_support": rank.spearman(norms.ravel(), -eff.ravel()),
  }


def mean_load(train: list[dict]) -> float:
  """Mean 1-minute load average over the `train` entries (NaN where none logged it)."""
  loads = [r["load1"] for r in train if "load1" in r]
  return statistics.mean(loads) if loads else float("nan")
