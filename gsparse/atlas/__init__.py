"""Sparsity atlas of a model: which attention layers and heads can go top-k, with which k.

`import gsparse.atlas` (it is not imported by `import gsparse`):

* `linen_runner`, `nnx_runner`, `ModelRunner`: call a model with every
  attention layer's `attention_fn` replaced (here: by a recording one).
* `measure_model`: runs the model on a batch with a `Recorder` that computes
  the exact softmax chunk by chunk and keeps per-row statistics only; returns
  an `Atlas` (per layer and head: effective support, needed k per tolerance,
  `CertifiedK`'s choice, Gaussian predictions, n^C fits, Spearman).
* `fit_power_law`, `classify_phase`: `needed k ~ alpha n^C` with a bootstrap
  interval and the phase (collapsed / n^C / diffuse) of docs/theory.md section 6.
* `recommend`: a `{path: k or None}` config for `attention_fn_for` /
  `configure_nnx`; `validate`: its output, loss and speed change.
* `write_figures`, `markdown`: the report; `python -m gsparse.atlas` runs it
  on a training-experiment checkpoint.
"""

from gsparse.atlas.fit import PHASES, PowerLawFit, classify_phase, fit_power_law
from gsparse.atlas.measure import Atlas, LayerAtlas, default_lengths, measure_model
from gsparse.atlas.recommend import Validation, recommend, validate
from gsparse.atlas.record import ModelRunner, Recorder, linen_runner, nnx_runner
from gsparse.atlas.report import markdown, write_figures
from gsparse.atlas.stats import RowStats, needed_k, row_statistics

__all__ = [
  "PHASES",
  "Atlas",
  "LayerAtlas",
  "ModelRunner",
  "PowerLawFit",
  "Recorder",
  "RowStats",
  "Validation",
  "classify_phase",
  "default_lengths",
  "fit_power_law",
  "linen_runner",
  "markdown",
  "measure_model",
  "needed_k",
  "nnx_runner",
  "recommend",
  "row_statistics",
  "validate",
  "write_figures",
]
