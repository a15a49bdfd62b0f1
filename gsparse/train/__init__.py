"""Training experiment: does top-k attention train as well as dense attention?

`import gsparse.train` (not imported by `import gsparse`):

* `gsparse.train.data`: byte-level train/validation streams from the running
  interpreter's standard library, split by a hash of each file's path.
* `gsparse.train.model`: a decoder-only transformer LM whose attention per
  layer is an `AttentionSpec` (dense, fixed k, k = alpha n^C, certified k),
  built on `gsparse.flax.topk_attention_fn`, with per-layer sparsity
  measurement.
* `gsparse.train.experiment`: `TrainConfig`, `run_training` (data-parallel
  training, msgpack checkpoints and resumption, JSON log, evaluation).
* `gsparse.train.rank`: weight-norm ranking of layers and Spearman correlation.
* `gsparse.train.compare`: runs all variants x seeds and writes the tables.

Scripts: `scripts/train.py`, `scripts/train_compare.py`.
"""
