"""Training experiment: does top-k attention train as well as dense attention?

`import gsparse.train` (not imported by `import gsparse`):

* `gsparse.train.data`: byte-level train/validation streams from the running
  interpreter's standard library, split by a hash of each file's path.
* `gsparse.train.model`: a decoder-only transformer LM whose attention per
  layer is an `AttentionSpec` (dense, fixed k, k = alpha n^C, certified k),
  built on `gsparse.flax.topk_attention_fn`, with per-layer sparsity
  measurement.
* `gsparse.train.experiment`: `TrainConfig`, `run_training` (data-parallel
  training, resumption, evaluation) and `load_params` (a trained LM's config
  and parameters from a training workdir).
* `gsparse.train.checkpoint`: atomic step-indexed orbax checkpoints (state,
  metadata and log as one step), the append-only `log.jsonl`, and
  `CheckpointError`; `gsparse.train.recorder` and `gsparse.train.summary`
  route a run's records to them and to TensorBoard (when installed).
* `gsparse.train.measures`: validation bits/byte, per-layer sparsity and the
  end-of-training summary.
* `gsparse.train.rank`: weight-norm ranking of layers and Spearman correlation.
* `gsparse.train.compare`: runs all variants x seeds and writes the tables.

Scripts: `scripts/train.py`, `scripts/train_compare.py`.
"""
