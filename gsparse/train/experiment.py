"""Training, evaluation, checkpointing and measurement of the byte-level LM.

`run_training(config, workdir=...)` trains one variant and returns (and
writes as JSON) its log: training loss and step time per step, validation
bits-per-byte at every evaluation, and at the end, per layer, the measured
attention sparsity, the certificate tail mass and the weight-norm ranking
with its Spearman correlation to the measured sparsity.

Data and head parallelism: a `gsparse.sharding.make_mesh` mesh over all local
devices, "data" x "heads" (`mesh_heads` devices on the heads axis, 1 by
default: pure data parallelism). The batch is split over "data"; the
attention projections (and their optimizer moments) are split by head over
"heads", every other parameter replicated. The same code runs on CPU, GPU and
TPU. The global batch must be divisible by the data axis.
"""

from __future__ import annotations

import contextlib
import dataclasses
import functools
import json
import math
import os
import pathlib
import statistics
import time
from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
import optax
from jax.sharding import Mesh, NamedSharding
from jax.sharding import PartitionSpec as P

from gsparse import sharding
from gsparse.train import checkpoint as ckpt
from gsparse.train import data as data_lib
from gsparse.train import measures, rank
from gsparse.train.model import AttentionSpec, MeasureSpec, ModelConfig, TransformerLM, layer_specs
from gsparse.train.recorder import Recorder

VARIANTS = ("dense", "topk", "power", "certified", "select")


@dataclasses.dataclass(frozen=True)
class TrainConfig:
  """One training run.

  Attributes:
    variant: "dense"; "topk" (fixed k everywhere); "power" (k = alpha n^C
      everywhere); "certified" (certified k everywhere); "select" (dense until
      `select_step`, then top-k with fixed k in the `select_layers` layers of
      largest weight norm, dense elsewhere).
    model: transformer size (`model.max_len` must be >= `seq_len`).
    sparse: the sparse policy's parameters (its `kind` is set by `variant`).
    measure: eps and k of the end-of-training sparsity measurement.
    seq_len: tokens (bytes) per sequence.
    batch_size: global batch (divisible by the mesh's data axis).
    steps: optimizer steps.
    learning_rate: peak AdamW learning rate (linear warmup, cosine decay).
    warmup_steps: warmup length.
    weight_decay: AdamW weight decay.
    grad_clip: global-norm gradient clip.
    seed: initialisation and data seed.
    select_layers: number of layers the "select" variant makes sparse.
    select_step: step at which "select" ranks the layers (-1: steps // 4).
    eval_every: steps between validation evaluations (the last step always).
    eval_batches: validation batches (of `batch_size`) per evaluation.
    checkpoint_every: steps between checkpoints (0: only at the end).
    log_every: steps between progress lines.
    max_train_bytes: cap on the training stream.
    max_validation_bytes: cap on the validation stream.
    mesh_heads: devices on the mesh's heads axis (head parallelism); must
      divide the local device count and `model.num_heads`.
  """

  variant: str = "dense"
  model: ModelConfig = ModelConfig()
  sparse: AttentionSpec = AttentionSpec("topk", k=32, alpha=2.0, power=0.5, tolerance=0.05)
  measure: MeasureSpec = MeasureSpec(eps=0.01, k=32)
  seq_len: int = 512
  batch_size: int = 4
  steps: int = 300
  learning_rate: float = 3e-3
  warmup_steps: int = 20
  weight_decay: float = 0.01
  grad_clip: float = 1.0
  seed: int = 0
  select_layers: int = 2
  select_step: int = -1
  eval_every: int = 50
  eval_batches: int = 4
  checkpoint_every: int = 50
  log_every: int = 10
  max_train_bytes: int = 4_000_000
  max_validation_bytes: int = 400_000
  mesh_heads: int = 1

  def __post_init__(self):
    if self.variant not in VARIANTS:
      raise ValueError(f"variant={self.variant!r} must be one of {VARIANTS}")
    for name in (
      "seq_len",
      "batch_size",
      "steps",
      "eval_every",
      "eval_batches",
      "log_every",
      "mesh_heads",
    ):
      v = getattr(self, name)
      if not isinstance(v, int) or v < 1:
        raise ValueError(f"{name}={v!r} must be an int >= 1")
    if self.seq_len > self.model.max_len:
      raise ValueError(f"seq_len={self.seq_len} exceeds model.max_len={self.model.max_len}")
    # Only "select" uses select_layers and select_step: other variants accept
    # any value (e.g. the default select_layers=2 with num_layers=1).
    if self.variant == "select" and not 0 <= self.select_layers <= self.model.num_layers:
      raise ValueError(
        f"select_layers={self.select_layers} must be in [0, {self.model.num_layers}]"
      )
    if self.variant == "select" and (self.select_step < -1 or self.select_step > self.steps):
      raise ValueError(f"select_step={self.select_step} must be -1 or in [0, steps={self.steps}]")
    if self.warmup_steps < 0:
      raise ValueError(f"warmup_steps={self.warmup_steps} must be >= 0")
    if self.checkpoint_every < 0:
      raise ValueError(f"checkpoint_every={self.checkpoint_every} must be >= 0")

  @property
  def resolved_select_step(self) -> int:
    return self.steps // 4 if self.select_step == -1 else self.select_step

  def sparse_spec(self) -> AttentionSpec:
    kind = {"topk": "topk", "power": "power", "certified": "certified", "select": "topk"}.get(
      self.variant, "dense"
    )
    return dataclasses.replace(self.sparse, kind=kind)

  def to_dict(self) -> dict[str, Any]:
    return dataclasses.asdict(self)

  @classmethod
  def from_dict(cls, d: dict[str, Any]) -> TrainConfig:
    d = dict(d)
    d["model"] = ModelConfig(**d["model"])
    sp = dict(d["sparse"])
    sp["candidate_ks"] = tuple(sp["candidate_ks"])
    d["sparse"] = AttentionSpec(**sp)
    d["measure"] = MeasureSpec(**d["measure"])
    return cls(**d)


def layer_attention(config: TrainConfig, sparse_layers: list[int] | None) -> tuple:
  """Per-layer specs of `config` given the "select" variant's chosen layers."""
  n = config.model.num_layers
  if config.variant == "dense":
    return layer_specs(AttentionSpec("dense"), n, [])
  if config.variant == "select":
    return layer_specs(config.sparse_spec(), n, sparse_layers or [])
  return layer_specs(config.sparse_spec(), n)


def make_optimizer(
  *, learning_rate: float, warmup_steps: int, steps: int, weight_decay: float, grad_clip: float
) -> optax.GradientTransformation:
  """AdamW with linear warmup and cosine decay, after global-norm clipping."""
  warmup = min(warmup_steps, steps - 1)  # the cosine part needs at least one step
  if warmup < 1:
    schedule = optax.constant_schedule(learning_rate)
  else:
    schedule = optax.warmup_cosine_decay_schedule(0.0, learning_rate, warmup, steps)
  return optax.chain(
    optax.clip_by_global_norm(grad_clip),
    optax.adamw(schedule, b1=0.9, b2=0.95, weight_decay=weight_decay),
  )


def cross_entropy(logits: jax.Array, targets: jax.Array) -> jax.Array:
  """Mean next-byte cross entropy in nats."""
  return jnp.mean(
    optax.softmax_cross_entropy_with_integer_labels(logits.astype(jnp.float32), targets)
  )


def make_steps(model: TransformerLM, optimizer, mesh: Mesh):
  """Jitted `(train_step, eval_step)` with the batch sharded over `mesh`.

  `eval_step(params, batch)` returns the summed cross entropy (nats), the
  number of predicted bytes and the sown sparsity measures of every layer.
  """
  repl = NamedSharding(mesh, P())
  batch_sh = NamedSharding(mesh, P("data"))
  state_sh = None  # the state keeps the sharding it is placed with (run_training)

  def loss_fn(params, batch):
    logits = model.apply(params, batch[:, :-1])
    return cross_entropy(logits, batch[:, 1:])

  def train_step(state, batch):
    loss, grads = jax.value_and_grad(loss_fn)(state["params"], batch)
    updates, opt_state = optimizer.update(grads, state["opt_state"], state["params"])
    params = optax.apply_updates(state["params"], updates)
    return {"params": params, "opt_state": opt_state, "step": state["step"] + 1}, loss

  def eval_step(params, batch):
    logits, inter = model.apply(params, batch[:, :-1], True, mutable=["intermediates"])
    nats = optax.softmax_cross_entropy_with_integer_labels(logits.astype(jnp.float32), batch[:, 1:])
    return jnp.sum(nats), nats.size, inter["intermediates"]

  train = jax.jit(
    train_step, in_shardings=(state_sh, batch_sh), out_shardings=(state_sh, repl), donate_argnums=0
  )
  evaluate = jax.jit(eval_step, in_shardings=(state_sh, batch_sh), out_shardings=repl)
  return train, evaluate


def _optimizer_key(config: TrainConfig) -> tuple:
  names = ("learning_rate", "warmup_steps", "steps", "weight_decay", "grad_clip")
  return tuple((n, getattr(config, n)) for n in names)


@functools.lru_cache(maxsize=32)
def _compiled_steps(model_cfg, specs, measure, opt_key, mesh):
  """(model, train_step, eval_step), cached so that repeated runs of one
  configuration (resumption, several seeds) reuse the compiled functions."""
  model = TransformerLM(model_cfg, specs, measure)
  return model, *make_steps(model, make_optimizer(**dict(opt_key)), mesh)


def init_state(config: TrainConfig) -> dict:
  """The training state at step 0: `{"params", "opt_state", "step"}`."""
  # Attention functions have no parameters: initialise through the dense model.
  num_layers = config.model.num_layers
  init_model = TransformerLM(config.model, layer_specs(AttentionSpec("dense"), num_layers, []))
  params = init_model.init(jax.random.key(config.seed), jnp.zeros((1, config.seq_len), jnp.int32))
  optimizer = make_optimizer(**dict(_optimizer_key(config)))
  return {"params": params, "opt_state": optimizer.init(params), "step": jnp.zeros((), jnp.int32)}


def _abstract_state(config: TrainConfig, placement) -> dict:
  """`init_state(config)` as `jax.ShapeDtypeStruct`s placed with `placement`.

  `placement` is one `jax.sharding.Sharding` for every leaf, or a pytree of
  them with the state's structure (`sharding.head_parallel_shardings`).
  """
  shapes = jax.eval_shape(lambda: init_state(config))
  if isinstance(placement, jax.sharding.Sharding):
    placement = jax.tree.map(lambda _: placement, shapes)
  return jax.tree.map(
    lambda s, sh: jax.ShapeDtypeStruct(s.shape, s.dtype, sharding=sh), shapes, placement
  )


def load_params(workdir: str | os.PathLike, step: int | None = None) -> tuple[TrainConfig, Any]:
  """Loads a trained LM's config and parameters from a training workdir.

  Example (apply the model with the attention it was trained with):

      config, params = load_params("/tmp/lm_dense")
      log = checkpoint_log("/tmp/lm_dense")  # for the "select" variant's layers
      model = TransformerLM(config.model, layer_attention(config, log["sparse_layers"]))
      logits = model.apply(params, tokens)  # tokens: int32 [batch, <= config.seq_len]

  Args:
    workdir: a `run_training` workdir (its `checkpoints/` directory).
    step: the checkpoint step (None: the newest).

  Returns:
    `(config, params)`: the run's `TrainConfig` and its flax parameter tree
    (`{"params": ...}`, arrays on the default device).

  Raises:
    CheckpointError (a ValueError): no checkpoint, no checkpoint at `step`,
      or an unreadable one; the message names the directory.
  """
  with _read_manager(workdir, step) as (manager, step):
    meta = ckpt.restore(manager, step, None, items=("meta",))["meta"]
    config = TrainConfig.from_dict(meta["config"])
    abstract = _abstract_state(config, jax.sharding.SingleDeviceSharding(jax.devices()[0]))
    state = ckpt.restore(manager, step, abstract, items=("state",))["state"]
  return config, state["params"]


def checkpoint_log(workdir: str | os.PathLike, step: int | None = None) -> dict:
  """The run log saved with a workdir's checkpoint (`step` None: the newest)."""
  with _read_manager(workdir, step) as (manager, step):
    return ckpt.restore(manager, step, None, items=("log",))["log"]


@contextlib.contextmanager
def _read_manager(workdir, step):
  wd = pathlib.Path(workdir)
  if not (wd / ckpt.CHECKPOINT_DIR).is_dir():
    raise ckpt.CheckpointError(f"no checkpoints in workdir={str(wd)!r} (no {ckpt.CHECKPOINT_DIR}/)")
  with ckpt.open_manager(wd, keep=1, read_only=True) as manager:
    steps = manager.all_steps()
    if step is None:
      step = manager.latest_step()
    if step is None or step not in steps:
      raise ckpt.CheckpointError(
        f"no checkpoint at step={step} in {wd / ckpt.CHECKPOINT_DIR} (steps: {sorted(steps)})"
      )
    yield manager, step


def run_training(
  config: TrainConfig,
  *,
  workdir: str | os.PathLike | None = None,
  restart: bool = False,
  keep_checkpoints: int = 3,
  tensorboard: bool = True,
  stop_at_step: int | None = None,
  corpus: data_lib.ByteCorpus | None = None,
  progress: Callable[[str], None] | None = print,
) -> dict:
  """Trains one variant, resuming from `workdir`'s newest checkpoint; returns its log.

  With a workdir, the run appends every record to `workdir/log.jsonl` as it
  goes (and TensorBoard scalars to `workdir/tensorboard/` when a writer is
  installed), saves a checkpoint (state + metadata + log as one atomic orbax
  step, see `gsparse.train.checkpoint`) every `config.checkpoint_every` steps
  and at the end, and writes the complete log to `workdir/log.json` when it
  finishes. Killed at any point and run again, it resumes from the newest
  complete checkpoint and gives the same losses as an uninterrupted run.

  Args:
    config: the run.
    workdir: checkpoint and log directory (None: no checkpoints, no files).
    restart: delete `workdir`'s run files (checkpoints, logs) and start over.
      Without it, a workdir whose checkpoint is missing or unreadable raises
      `CheckpointError` instead of being overwritten.
    keep_checkpoints: how many of the newest checkpoints to keep (>= 1).
    tensorboard: also write TensorBoard scalars when a writer is installed.
    stop_at_step: checkpoint and return after this many steps (to exercise
      resumption); the log then has no "final" entry.
    corpus: a preloaded corpus (default: the stdlib with `config`'s caps).
    progress: called with one progress line at a time (None: silent).

  Returns:
    The log: {"config", "devices", "backend", "sparse_layers", "train":
    [{step, loss, step_time_s, step_cpu_s, load1}], "eval": [{step, val_bpb,
    sparsity}], "final": {...}}.

  Raises:
    CheckpointError (a ValueError): `workdir` holds a run whose checkpoint is
      missing, unreadable or of another config (the message names the path).
  """
  say = progress or (lambda s: None)
  wd = pathlib.Path(workdir) if workdir is not None else None
  devices = jax.local_devices()
  sharding.check_heads(config.mesh_heads, config.model.num_heads, name="mesh_heads")
  mesh = sharding.make_mesh(heads=config.mesh_heads, devices=devices)
  if config.batch_size % mesh.devices.shape[0]:
    raise ValueError(
      f"batch_size={config.batch_size} must be divisible by the mesh's data axis, "
      f"{mesh.devices.shape[0]} of the {len(devices)} local devices"
    )
  # The state's placement: attention projections (and their Adam moments) split by
  # head over the mesh's heads axis, everything else replicated.
  state_sh = sharding.head_parallel_shardings(jax.eval_shape(lambda: init_state(config)), mesh)
  log = {
    "config": json.loads(json.dumps(config.to_dict())),
    "devices": [str(d) for d in devices],
    "backend": jax.default_backend(),
    "sparse_layers": None,
    "train": [],
    "eval": [],
  }
  with Recorder(wd, keep=keep_checkpoints, tensorboard=tensorboard) as rec:
    state, log = rec.start(log, _abstract_state(config, state_sh), restart=restart)
    if state is None:
      state = init_state(config)
    else:
      say(f"resumed from {wd / ckpt.CHECKPOINT_DIR / str(len(log['train']))}")
    if "final" in log:  # killed after the final checkpoint, before log.json
      rec.finish(log)
      return log
    if corpus is None:
      corpus = data_lib.load_stdlib_corpus(
        max_train_bytes=config.max_train_bytes, max_validation_bytes=config.max_validation_bytes
      )
    end = config.steps if stop_at_step is None else min(stop_at_step, config.steps)
    return _train_loop(config, jax.device_put(state, state_sh), log, rec, corpus, mesh, end, say)


def _train_loop(config, state, log, rec, corpus, mesh, end, say) -> dict:
  """The steps of `run_training` from `state` to `end`, then the final entry."""
  batch_sh = NamedSharding(mesh, P("data"))
  num_layers = config.model.num_layers
  step = start = int(jax.device_get(state["step"]))
  select_at = config.resolved_select_step if config.variant == "select" else None
  sparse_layers = log["sparse_layers"]

  def build(sparse_layers):
    return _compiled_steps(
      config.model,
      layer_attention(config, sparse_layers),
      config.measure,
      _optimizer_key(config),
      mesh,
    )

  model, train_step, eval_step = build(sparse_layers)
  val = data_lib.validation_batches(
    corpus.validation,
    num_batches=config.eval_batches,
    batch_size=config.batch_size,
    seq_len=config.seq_len,
  )
  t_start = time.perf_counter()
  while step < end:
    if select_at is not None and step == select_at and sparse_layers is None:
      norms, sparse_layers = _rank_layers(config, state)
      log["sparse_layers"] = sparse_layers
      log["select_norms"] = norms.tolist()
      rec.record("select", {"step": step, "sparse_layers": sparse_layers, "norms": norms.tolist()})
      say(f"step {step}: weight-norm ranking picks sparse layers {sparse_layers}")
      model, train_step, eval_step = build(sparse_layers)
    state, loss = _train_step(config, state, log, rec, corpus, train_step, batch_sh, step)
    step += 1
    if not math.isfinite(loss):
      say(f"step {step}: non-finite loss {loss}; stopping")
      break
    if step % config.log_every == 0 or step == end:
      _say_progress(config, log, step, loss, say)
    if step % config.eval_every == 0 or step == config.steps:
      _evaluate(eval_step, state, val, batch_sh, num_layers, log, rec, step, say)
    if config.checkpoint_every and step % config.checkpoint_every == 0 and step < end:
      rec.checkpoint(step, state, log)
  if step < config.steps:  # stopped early (stop_at_step or non-finite loss)
    if step > start:  # else the newest checkpoint already holds this step
      rec.checkpoint(step, state, log)
    return log
  if sparse_layers is None and config.variant == "select":  # select_step == steps
    log["sparse_layers"] = sparse_layers = _rank_layers(config, state)[1]
  log["final"] = measures.final_entry(
    log,
    jax.device_get(state["params"]),
    num_layers=num_layers,
    layer_specs=[s.label() for s in layer_attention(config, sparse_layers)],
    wall_time_s=time.perf_counter() - t_start,
  )
  rec.checkpoint(step, state, log)
  rec.finish(log)
  return log


def _rank_layers(config, state):
  """The "select" variant's choice: weight norms per layer and the layers made sparse."""
  norms = rank.attention_weight_norms(jax.device_get(state["params"]), config.model.num_layers)
  return norms, rank.rank_layers(norms, config.select_layers, seq_len=config.seq_len)


def _train_step(config, state, log, rec, corpus, train_step, batch_sh, step):
  """One optimizer step on the step's training batch, logged with its wall and CPU time."""
  batch = data_lib.train_batch(
    corpus.train,
    seed=config.seed,
    step=step,
    batch_size=config.batch_size,
    seq_len=config.seq_len,
  )
  t0, c0 = time.perf_counter(), time.process_time()
  state, loss = train_step(state, jax.device_put(batch, batch_sh))
  loss = float(loss)
  dt, dc = time.perf_counter() - t0, time.process_time() - c0
  # The 1-minute load average: other processes on the machine slow the step.
  load1 = os.getloadavg()[0] if hasattr(os, "getloadavg") else float("nan")
  entry = {"step": step, "loss": loss, "step_time_s": dt, "step_cpu_s": dc, "load1": load1}
  log["train"].append(entry)
  rec.record("train", entry, {"train/loss": loss, "train/step_time_s": dt})
  return state, loss


def _evaluate(eval_step, state, val, batch_sh, num_layers, log, rec, step, say) -> None:
  """Validation bits per byte and the per-layer sparsity measures, logged."""
  bpb, measured = measures.evaluate(eval_step, state["params"], val, batch_sh, num_layers)
  entry = {"step": step, "val_bpb": bpb, "sparsity": measured}
  log["eval"].append(entry)
  rec.record("eval", entry, {"eval/val_bpb": bpb})
  say(f"step {step}: validation {bpb:.4f} bits/byte")


def _say_progress(config, log, step, loss, say) -> None:
  """The progress line: loss, median seconds per step of the last `log_every`, ETA."""
  recent = [r["step_time_s"] for r in log["train"][-config.log_every :]]
  med = statistics.median(recent)
  eta = med * (config.steps - step)
  say(f"step {step}/{config.steps} loss {loss:.4f} {med:.3f} s/step eta {eta:.0f} s")
