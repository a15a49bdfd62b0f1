"""Runs every variant for several seeds and tabulates the comparison."""

from __future__ import annotations

import dataclasses
import json
import pathlib
import statistics
from collections.abc import Callable, Sequence

import jax
import numpy as np

from gsparse.train import data as data_lib
from gsparse.train import measures
from gsparse.train.experiment import TrainConfig, run_training


def run_all(
  base: TrainConfig,
  variants: Sequence[str],
  seeds: Sequence[int],
  out_dir: str | pathlib.Path,
  *,
  progress: Callable[[str], None] | None = print,
  restart: bool = False,
  keep_checkpoints: int = 3,
  tensorboard: bool = True,
  interleave_every: int = 0,
) -> dict[str, list[dict]]:
  """Trains each variant for each seed in `out_dir/<variant>_seed<seed>`.

  Finished runs (a log.json with a "final" entry for the same config) are
  reused; interrupted ones resume from their checkpoint. `restart` starts
  every run over; `keep_checkpoints` and `tensorboard` go to `run_training`.

  With `interleave_every` > 0 the runs take turns: each trains that many
  steps (then checkpoints), the next one continues, round after round, so
  that a change of machine load during the comparison falls on every
  variant and seed alike. Resumption is exact, so the trained models are
  those of uninterrupted runs; only the timings differ.

  Returns:
    `{variant: [log per seed]}`.
  """
  if not isinstance(interleave_every, int) or interleave_every < 0:
    raise ValueError(f"interleave_every={interleave_every!r} must be an int >= 0")
  out_dir = pathlib.Path(out_dir)
  corpus = data_lib.load_stdlib_corpus(
    max_train_bytes=base.max_train_bytes, max_validation_bytes=base.max_validation_bytes
  )
  say = progress or (lambda s: None)
  if interleave_every:
    ends = [*range(interleave_every, base.steps, interleave_every), base.steps]
  else:
    ends = [base.steps]
  logs: dict[tuple[str, int], dict] = {}
  for round_, end in enumerate(ends):
    for v in variants:
      for seed in seeds:
        cfg = dataclasses.replace(base, variant=v, seed=seed)
        wd = out_dir / f"{v}_seed{seed}"
        if round_ == 0 and not restart:
          log = _finished_log(wd, cfg)
          if log is not None:
            say(f"== {v} seed {seed}: reusing {wd / 'log.json'}")
            logs[v, seed] = log
        if (v, seed) in logs and "final" in logs[v, seed]:
          continue
        say(f"== {v} seed {seed}" + (f" (to step {end})" if end < base.steps else ""))
        logs[v, seed] = run_training(
          cfg,
          workdir=wd,
          corpus=corpus,
          progress=progress,
          restart=restart and round_ == 0,
          keep_checkpoints=keep_checkpoints,
          tensorboard=tensorboard,
          stop_at_step=end,
        )
  return {v: [logs[v, seed] for seed in seeds] for v in variants}


def _finished_log(wd: pathlib.Path, cfg: TrainConfig) -> dict | None:
  """The finished run's log in `wd` when it is of `cfg` (else None)."""
  done = wd / "log.json"
  if not done.exists():
    return None
  log = json.loads(done.read_text())
  if log.get("config") == json.loads(json.dumps(cfg.to_dict())) and "final" in log:
    return log
  return None


def summarize(logs: dict[str, list[dict]]) -> dict:
  """Per-variant means over seeds of the end-of-training figures."""
  out = {"variants": {}}
  dense = logs.get("dense")
  dense_bpb = statistics.mean(lg["final"]["val_bpb"] for lg in dense) if dense else None
  dense_time = statistics.mean(lg["final"]["median_step_time_s"] for lg in dense) if dense else None
  dense_cpu = _mean_cpu([lg["final"] for lg in dense]) if dense else None
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
      "step_cpu_s_mean": _mean_cpu(fins),
      "load1_mean": statistics.mean(f.get("mean_load1", float("nan")) for f in fins),
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
      row["step_cpu_ratio_dense"] = row["step_cpu_s_mean"] / dense_cpu
    out["variants"][v] = row
  return out


def _mean_cpu(fins: list[dict]) -> float:
  return statistics.mean(f.get("median_step_cpu_s", float("nan")) for f in fins)


def _fmt_list(xs, fmt="{:.2f}") -> str:
  return " / ".join(fmt.format(x) for x in xs)


def markdown(summary: dict, *, measure_eps: float, measure_k: int) -> str:
  """The results as Markdown tables."""
  rows = summary["variants"]
  first = next(iter(rows.values()))
  seeds = {v: r["seeds"] for v, r in rows.items()}
  lines = [
    f"Steps {first['steps']}, sequence length {first['seq_len']}, seeds per variant: "
    + "; ".join(f"{v} {s}" for v, s in seeds.items())
    + ".",
    "",
  ]
  lines += _quality_table(rows)
  lines += _sparsity_table(rows, measure_eps=measure_eps, measure_k=measure_k)
  lines += _spearman_table(rows)
  return "\n".join(lines) + "\n"


def _quality_table(rows: dict) -> list[str]:
  """Validation bits per byte and step time per variant, against dense."""
  lines = [
    "| variant | attention per layer | val bits/byte (mean) | per seed | vs dense | "
    "step time (s) | vs dense | CPU s/step | vs dense | load |",
    "|---|---|---|---|---|---|---|---|---|---|",
  ]
  for v, r in rows.items():
    delta = (
      f"{r['val_bpb_minus_dense']:+.4f} ({100 * r['val_bpb_rel_dense']:+.2f}%)"
      if "val_bpb_minus_dense" in r
      else "n/a"
    )
    tratio = f"{r['step_time_ratio_dense']:.2f}x" if "step_time_ratio_dense" in r else "n/a"
    cratio = f"{r['step_cpu_ratio_dense']:.2f}x" if "step_cpu_ratio_dense" in r else "n/a"
    specs = ", ".join(sorted(set(r["layer_specs"])))
    if v == "select":
      specs = "sparse layers " + "; ".join(str(s) for s in r["sparse_layers_per_seed"])
    lines.append(
      f"| {v} | {specs} | {r['val_bpb_mean']:.4f} | {_fmt_list(r['val_bpb_per_seed'], '{:.4f}')} "
      f"| {delta} | {r['step_time_s_mean']:.3f} | {tratio} | {r['step_cpu_s_mean']:.2f} "
      f"| {cratio} | {r.get('load1_mean', float('nan')):.1f} |"
    )
  return lines


def _sparsity_table(rows: dict, *, measure_eps: float, measure_k: int) -> list[str]:
  """The sparsity measured per layer at the end of training, per variant."""
  lines = [
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
  return lines


def _spearman_table(rows: dict) -> list[str]:
  """How well the weight norm predicted the measured sparsity, per variant."""
  lines = [
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
  return lines


def _checkpoint_norms(run_dir: pathlib.Path, num_layers: int, step: int) -> np.ndarray | None:
  """Weight norms from the run's checkpoint of `step` (None if it has none of that step)."""
  from gsparse.train import checkpoint as ckpt
  from gsparse.train import rank
  from gsparse.train.experiment import load_params

  with ckpt.open_manager(run_dir, keep=1, read_only=True) as manager:
    if step not in manager.all_steps():  # kept steps only (the newest `keep_checkpoints`)
      return None
  _, params = load_params(run_dir, step)
  return rank.attention_weight_norms(jax.device_get(params), num_layers)


def logs_at_step(out_dir: str | pathlib.Path, step: int | None = None) -> tuple[int, dict]:
  """Collects the runs under `out_dir` (finished or not) as of one common step.

  Each run's log is read from `log.json` (finished) or from its newest
  checkpoint (unfinished; a run directory with neither is skipped, one with an
  unreadable checkpoint raises `CheckpointError`). `step` defaults to the
  largest step at which every run has an evaluation. Each returned log gets a
  "final" entry describing the run at that step: validation bits/byte and
  sparsity of that evaluation, median step time over the steps before it, and
  the weight norms and their Spearman correlation when a kept checkpoint of
  that step is on disk (NaN otherwise).

  Returns:
    `(step, {variant: [log per seed]})`.
  """
  from gsparse.train import checkpoint as ckpt
  from gsparse.train import rank
  from gsparse.train.experiment import TrainConfig, checkpoint_log, layer_attention

  out_dir = pathlib.Path(out_dir)
  runs = []
  for d in sorted(p for p in out_dir.iterdir() if p.is_dir()):
    if (d / "log.json").exists():
      runs.append((d, json.loads((d / "log.json").read_text())))
    elif ckpt.latest_step(d) is not None:
      runs.append((d, checkpoint_log(d)))
  if not runs:
    raise ValueError(f"no runs under out_dir={str(out_dir)!r}")
  if step is None:
    step = min(max((e["step"] for e in lg["eval"]), default=0) for _, lg in runs)
  logs: dict[str, list[dict]] = {}
  for d, lg in runs:
    ev = [e for e in lg["eval"] if e["step"] == step]
    if not ev:
      continue
    cfg = TrainConfig.from_dict(lg["config"])
    nl = cfg.model.num_layers
    if "final" in lg and lg["final"]["step"] == step:
      norms = np.asarray(lg["final"]["weight_norms"])
    else:
      norms = _checkpoint_norms(d, nl, step)
    eff = np.asarray(ev[0]["sparsity"]["effective_support"])
    nan = float("nan")
    times = [r["step_time_s"] for r in lg["train"][1:step]]
    cpus = [r.get("step_cpu_s", nan) for r in lg["train"][1:step]]
    fin = {
      "step": step,
      "val_bpb": ev[0]["val_bpb"],
      "median_step_time_s": statistics.median(times) if times else nan,
      "median_step_cpu_s": statistics.median(cpus) if cpus else nan,
      "mean_load1": measures.mean_load(lg["train"][1:step]),
      "layer_specs": [s.label() for s in layer_attention(cfg, lg.get("sparse_layers"))],
      "sparsity": ev[0]["sparsity"],
      "weight_norms": (np.full(eff.shape, nan) if norms is None else norms).tolist(),
      "spearman_layer_norm_vs_neg_effective_support": (
        nan if norms is None else rank.spearman(norms.mean(1), -eff.mean(1))
      ),
      "spearman_head_norm_vs_neg_effective_support": (
        nan if norms is None else rank.spearman(norms.ravel(), -eff.ravel())
      ),
    }
    logs.setdefault(cfg.variant, []).append({**lg, "final": fin})
  from gsparse.train.experiment import VARIANTS

  return step, {
    v: sorted(logs[v], key=lambda g: g["config"]["seed"]) for v in VARIANTS if v in logs
  }
