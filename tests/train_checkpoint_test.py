"""Checkpoints, resumption and logs of the training experiment (gsparse.train).

A run is "killed" at each write point of its save sequence (log records,
checkpoint save, final log) by a hook that raises an exception no code
catches, and once for real by SIGKILL in a subprocess; the resumed run must
give the same losses, evaluations and final figures as an uninterrupted run,
and keep every log record written before the kill. Missing or corrupt
checkpoints must raise a CheckpointError naming the path and --restart.
Tiny dense model (2 layers, width 32), 6 steps: the compiled step is shared
by every run of this file. Everything is seeded and deterministic.
"""

import json
import os
import pathlib
import shutil
import signal
import subprocess
import sys
import textwrap

import jax
import numpy as np
import pytest

from gsparse.train import checkpoint as ckpt
from gsparse.train import compare, rank, summary
from gsparse.train import data as data_lib
from gsparse.train.experiment import (
  TrainConfig,
  checkpoint_log,
  layer_attention,
  load_params,
  run_training,
)
from gsparse.train.model import ModelConfig, TransformerLM
from tests.train_test import tiny_config

STEPS = 6
TIMING = (
  "step_time_s",
  "step_cpu_s",
  "load1",
  "mean_load1",
  "median_step_time_s",
  "median_step_cpu_s",
  "wall_time_s",
)


def config(**kw) -> TrainConfig:
  base = dict(steps=STEPS, eval_every=2, checkpoint_every=2, log_every=STEPS)
  base.update(kw)
  return tiny_config("dense", **base)


def run(wd, corpus, **kw):
  return run_training(config(), workdir=wd, corpus=corpus, progress=None, **kw)


def untimed(x):
  """`x` without its wall/CPU timings (the only figures that differ between runs)."""
  if isinstance(x, dict):
    return {k: untimed(v) for k, v in x.items() if k not in TIMING}
  if isinstance(x, list):
    return [untimed(v) for v in x]
  return x


@pytest.fixture(scope="module")
def corpus():
  return data_lib.load_stdlib_corpus(max_train_bytes=100_000, max_validation_bytes=10_000)


@pytest.fixture(scope="module")
def reference(corpus, tmp_path_factory):
  """An uninterrupted run: (log, workdir)."""
  wd = tmp_path_factory.mktemp("reference")
  return run(wd, corpus, keep_checkpoints=2), wd


@pytest.fixture(scope="module")
def partial(corpus, tmp_path_factory):
  """A run stopped after 4 of 6 steps (checkpoints at 2 and 4): its workdir."""
  wd = tmp_path_factory.mktemp("partial")
  run(wd, corpus, stop_at_step=4)
  return wd


class Killed(BaseException):
  """Raised by the fault hook: unwinds like a kill (no `except Exception` stops it)."""


def records(wd, event):
  return [r for r in ckpt.read_log_stream(wd / ckpt.LOG_STREAM) if r["event"] == event]


def check_same_as_reference(log, wd, reference):
  want, _ = reference
  assert [r["step"] for r in log["train"]] == list(range(STEPS))
  assert untimed(log) == untimed(want)  # losses, evaluations, final figures: bit-identical
  assert untimed(json.loads((wd / ckpt.FINAL_LOG).read_text())) == untimed(want)
  # The log stream has every step, and the last record of each step is the reference's.
  last = {r["step"]: r["loss"] for r in records(wd, "train")}
  assert last == {r["step"]: r["loss"] for r in want["train"]}


# (write point, occurrence, newest complete checkpoint after the kill): every
# place the run writes, each at least once. Evaluations and checkpoints are at
# steps 2, 4 and 6; checkpoint occurrence 3 is the final one, at step 6.
KILL_POINTS = [
  ("start_record", 1, None),
  ("train_record", 1, None),
  ("train_record", 4, 2),
  ("eval_record", 2, 2),
  ("checkpoint_save", 1, None),
  ("checkpoint_saved", 2, 4),
  ("checkpoint_record", 2, 4),
  ("checkpoint_save", 3, 4),
  ("checkpoint_saved", 3, 6),
  ("final_record", 1, 6),
  ("final_log", 1, 6),
  ("final_log_written", 1, 6),
]


@pytest.mark.parametrize(("point", "occurrence", "resume_from"), KILL_POINTS)
def test_kill_at_write_point_resumes_identically(
  point, occurrence, resume_from, reference, corpus, tmp_path, monkeypatch
):
  seen = []

  def hook(name):
    seen.append(name)
    if name == point and seen.count(name) == occurrence:
      raise Killed(name)

  monkeypatch.setattr(ckpt, "fault_hook", hook)
  with pytest.raises(Killed):
    run(tmp_path, corpus, keep_checkpoints=2)
  before = (
    (tmp_path / ckpt.LOG_STREAM).read_bytes() if (tmp_path / ckpt.LOG_STREAM).exists() else b""
  )
  monkeypatch.setattr(ckpt, "fault_hook", None)
  assert ckpt.latest_step(tmp_path) == resume_from
  log = run(tmp_path, corpus, keep_checkpoints=2)
  check_same_as_reference(log, tmp_path, reference)
  # Nothing written before the kill is lost: the old stream is a prefix of the new one.
  assert (tmp_path / ckpt.LOG_STREAM).read_bytes().startswith(before)
  starts = records(tmp_path, "start")
  assert starts[-1]["step"] == (resume_from or 0)
  assert starts[-1]["resumed"] == (resume_from is not None)


@pytest.mark.slow  # a second process: imports jax and compiles the model again
def test_sigkill_mid_save_resumes_identically(reference, corpus, tmp_path):
  # A real SIGKILL, a few milliseconds into the second checkpoint save (inside
  # orbax, before or after its atomic rename: either way the resume is exact).
  script = textwrap.dedent(
    f"""
    import os, signal, threading, time
    from gsparse.train import checkpoint as ckpt
    from gsparse.train import data as data_lib
    from tests.train_checkpoint_test import config
    from gsparse.train.experiment import run_training
    saves = []
    def hook(name):
      if name == "checkpoint_save":
        saves.append(name)
        if len(saves) == 2:
          threading.Timer(0.005, os.kill, (os.getpid(), signal.SIGKILL)).start()
    ckpt.fault_hook = hook
    corpus = data_lib.load_stdlib_corpus(max_train_bytes=100_000, max_validation_bytes=10_000)
    run_training(config(), workdir={str(tmp_path)!r}, corpus=corpus, progress=None,
                 keep_checkpoints=2)
    """
  )
  root = str(pathlib.Path(__file__).resolve().parents[1])
  env = dict(os.environ, PYTHONPATH=os.pathsep.join([root, *sys.path]))
  proc = subprocess.run(
    [sys.executable, "-c", script], env=env, cwd=root, capture_output=True, timeout=300
  )
  assert proc.returncode == -signal.SIGKILL, proc.stderr.decode()[-2000:]
  assert not (tmp_path / ckpt.FINAL_LOG).exists()
  before = (tmp_path / ckpt.LOG_STREAM).read_bytes()
  log = run(tmp_path, corpus, keep_checkpoints=2)
  check_same_as_reference(log, tmp_path, reference)
  assert (tmp_path / ckpt.LOG_STREAM).read_bytes().startswith(before)
  # No temporary directory of the cut save is left behind.
  assert sorted(p.name for p in (tmp_path / ckpt.CHECKPOINT_DIR).iterdir()) == ["4", "6"]


def test_keeps_newest_checkpoints_and_log_is_streamed(reference):
  log, wd = reference
  with ckpt.open_manager(wd, keep=1, read_only=True) as manager:
    assert manager.all_steps() == [4, 6]  # keep_checkpoints=2 of 2, 4, 6
  assert [r["step"] for r in records(wd, "checkpoint")] == [2, 4, 6]
  assert [r["loss"] for r in records(wd, "train")] == [r["loss"] for r in log["train"]]
  assert [r["val_bpb"] for r in records(wd, "eval")] == [e["val_bpb"] for e in log["eval"]]
  assert untimed(records(wd, "final")[0]) == {"event": "final", **untimed(log["final"])}
  assert untimed(checkpoint_log(wd)) == untimed(log)
  # A finished run, run again, is returned as it is.
  again = run_training(config(), workdir=wd, progress=None, keep_checkpoints=2)
  assert again == log


def test_load_params(reference, partial):
  log, wd = reference
  cfg, params = load_params(wd)
  assert cfg == config()
  norms = rank.attention_weight_norms(jax.device_get(params), cfg.model.num_layers)
  np.testing.assert_array_equal(norms, np.asarray(log["final"]["weight_norms"]))
  # The tree is what the model takes (checked by tracing `init`, not by a slow eager apply).
  model = TransformerLM(cfg.model, layer_attention(cfg, log["sparse_layers"]))
  want = jax.eval_shape(model.init, jax.random.key(0), np.zeros((1, 8), np.int32))
  assert jax.tree.map(lambda a: (a.shape, a.dtype), params) == jax.tree.map(
    lambda a: (a.shape, a.dtype), want
  )
  _, p4 = load_params(wd, step=4)
  _, q4 = load_params(partial, step=4)  # the same run, stopped at step 4
  jax.tree.map(np.testing.assert_array_equal, p4, q4)
  with pytest.raises(ckpt.CheckpointError, match=r"step=2 .*steps: \[4, 6\]"):
    load_params(wd, step=2)  # deleted (keep_checkpoints=2)
  with pytest.raises(ckpt.CheckpointError, match="no checkpoints in workdir"):
    load_params(wd / "nothing")


def test_compare_reads_checkpoints(reference, partial, tmp_path):
  log, wd = reference
  norms = compare._checkpoint_norms(wd, 2, STEPS)
  np.testing.assert_array_equal(norms, np.asarray(log["final"]["weight_norms"]))
  assert compare._checkpoint_norms(wd, 2, 2) is None  # not kept
  shutil.copytree(partial, tmp_path / "dense_seed0")
  step, logs = compare.logs_at_step(tmp_path)
  assert step == 4
  got = logs["dense"][0]
  assert got["final"]["val_bpb"] == log["eval"][1]["val_bpb"]  # step 4 of the same run
  assert np.all(np.isfinite(got["final"]["weight_norms"]))


def test_interleaved_comparison_trains_the_uninterrupted_run(reference, tmp_path):
  """`run_all(interleave_every=4)` stops the run at step 4, resumes it (also
  with `restart=True`, which applies to the first turn only) and ends with the
  reference's losses, evaluations and final figures."""
  said = []
  cfg = config(max_train_bytes=100_000, max_validation_bytes=10_000)  # the `corpus` fixture's
  logs = compare.run_all(
    cfg, ["dense"], [0], tmp_path, progress=said.append, restart=True, interleave_every=4
  )
  assert "== dense seed 0 (to step 4)" in said and any("resumed from" in s for s in said)
  want, _ = reference
  got = logs["dense"][0]
  for part in ("train", "eval", "final"):
    assert untimed(got[part]) == untimed(want[part])


def damaged_copy(partial, tmp_path, damage) -> pathlib.Path:
  wd = tmp_path / "run"
  shutil.copytree(partial, wd)
  damage(wd, wd / ckpt.CHECKPOINT_DIR / "4")
  return wd


def _truncate_state(wd, step_dir):
  for p in (step_dir / "state").rglob("*"):
    if p.is_file() and p.parent.name == "d":
      p.write_bytes(p.read_bytes()[:8])


DAMAGE = {
  "missing state": (lambda wd, d: shutil.rmtree(d / "state"), r"4/state is missing"),
  "missing meta": (lambda wd, d: shutil.rmtree(d / "meta"), r"4/meta is missing"),
  "missing log": (lambda wd, d: shutil.rmtree(d / "log"), r"4/log is missing"),
  "truncated state": (_truncate_state, r"checkpoints/4 is unreadable"),
  "garbage meta": (
    lambda wd, d: (d / "meta" / "metadata").write_bytes(b"\x00\xffgarbage"),
    r"checkpoints/4 is unreadable",
  ),
  "truncated log": (
    lambda wd, d: (d / "log" / "metadata").write_text('{"train": [{"st'),
    r"checkpoints/4 is unreadable",
  ),
  "meta of another step": (
    lambda wd, d: (d / "meta" / "metadata").write_text('{"format": "x", "step": 2}'),
    r"4/meta is not a gsparse.train checkpoint of step 4",
  ),
  "log of another step": (
    lambda wd, d: (d / "log" / "metadata").write_text('{"train": []}'),
    r"4/log does not hold the log of steps 0..3",
  ),
  "state of another step": (
    lambda wd, d: (
      shutil.rmtree(d / "state"),
      shutil.copytree(d.parent / "2" / "state", d / "state"),
    ),
    r"4/state holds the state of step 2, not 4",
  ),
  "checkpoints deleted": (
    lambda wd, d: shutil.rmtree(wd / ckpt.CHECKPOINT_DIR),
    r"log.jsonl records a checkpoint at step 4, but .*checkpoints holds no complete step",
  ),
  "checkpoints emptied": (
    lambda wd, d: [shutil.rmtree(p) for p in (wd / ckpt.CHECKPOINT_DIR).iterdir()],
    r"log.jsonl records a checkpoint at step 4, but .*checkpoints holds no complete step",
  ),
  "finished log without checkpoints": (
    lambda wd, d: (
      shutil.rmtree(wd / ckpt.CHECKPOINT_DIR),
      (wd / ckpt.LOG_STREAM).unlink(),
      (wd / ckpt.FINAL_LOG).write_text("{}"),
    ),
    r"log.json shows a finished run",
  ),
  "legacy msgpack": (
    lambda wd, d: (wd / "state.msgpack").write_bytes(b"x"),
    r"state.msgpack is a checkpoint of an older gsparse",
  ),
  "garbage log stream": (
    lambda wd, d: (wd / ckpt.LOG_STREAM).write_bytes(b"garbage\n" + b'{"event": "x"}\n'),
    r"log.jsonl line 1 is not a JSON record",
  ),
}


# orbax leaves an asyncio callback behind after a failed tensorstore read
# ("Event loop is closed", raised in its thread, not ours).
@pytest.mark.filterwarnings("ignore::pytest.PytestUnraisableExceptionWarning")
@pytest.mark.parametrize("case", list(DAMAGE))
def test_damaged_checkpoint_is_an_error_not_a_restart(case, partial, corpus, tmp_path):
  damage, message = DAMAGE[case]
  wd = damaged_copy(partial, tmp_path, damage)
  snapshot = sorted((str(p), p.stat().st_size) for p in wd.rglob("*") if p.is_file())
  with pytest.raises(ckpt.CheckpointError, match=message) as err:
    run(wd, corpus)
  assert str(wd) in str(err.value) and "--restart" in str(err.value)
  # The survivor is untouched.
  assert sorted((str(p), p.stat().st_size) for p in wd.rglob("*") if p.is_file()) == snapshot


def test_damaged_newest_step_names_older_steps(partial, corpus, tmp_path):
  wd = damaged_copy(partial, tmp_path, lambda wd, d: shutil.rmtree(d / "meta"))
  with pytest.raises(ckpt.CheckpointError, match=r"older step \(\[2\]\) instead, delete .*/4"):
    run(wd, corpus)


def test_deleting_the_newest_step_resumes_from_an_older_one(partial, reference, corpus, tmp_path):
  # What the error for a damaged newest step suggests, done: resume from step 2.
  wd = damaged_copy(partial, tmp_path, lambda wd, d: shutil.rmtree(d))
  log = run(wd, corpus, keep_checkpoints=2)
  check_same_as_reference(log, wd, reference)
  start = records(wd, "start")[-1]
  assert (start["step"], start["resumed"], start["newer_checkpoint_deleted"]) == (2, True, 4)


def test_restart_starts_over(partial, reference, corpus, tmp_path):
  wd = damaged_copy(partial, tmp_path, _truncate_state)
  (wd / "notes.txt").write_text("mine")
  log = run(wd, corpus, restart=True, keep_checkpoints=2)
  check_same_as_reference(log, wd, reference)
  assert len(records(wd, "start")) == 1  # the old stream was deleted with the run
  assert (wd / "notes.txt").read_text() == "mine"  # other files are kept


def test_fresh_and_other_config(reference, corpus, tmp_path):
  (tmp_path / "empty").mkdir()
  log = run(tmp_path / "empty", corpus, stop_at_step=1)
  assert len(log["train"]) == 1
  _, wd = reference
  with pytest.raises(ckpt.CheckpointError, match="different config.*--restart"):
    run_training(config(seed=1), workdir=wd, corpus=corpus, progress=None)
  with pytest.raises(ValueError, match="keep_checkpoints=0"):
    run(tmp_path / "k", corpus, keep_checkpoints=0)
  with pytest.raises(ValueError, match="keep_checkpoints=1.5"):
    run(None, corpus, keep_checkpoints=1.5)


def test_log_stream_tolerates_a_record_cut_by_a_kill(tmp_path):
  path = tmp_path / "log.jsonl"
  path.write_bytes(b'{"event": "train", "step": 0}\n{"event": "tr')
  assert ckpt.read_log_stream(path) == [{"event": "train", "step": 0}]
  stream = ckpt.LogStream(path)  # ends the cut record before appending
  stream.write("start", step=0)
  stream.close()
  assert [r["event"] for r in ckpt.read_log_stream(path)] == ["train", "start"]
  path.write_bytes(path.read_bytes() + b'{"event": "tr\n{"event": "train", "step": 1}\n')
  with pytest.raises(ckpt.CheckpointError, match="line 4 is not a JSON record"):
    ckpt.read_log_stream(path)


def test_tensorboard_not_installed_writes_json_only(corpus, tmp_path, monkeypatch):
  monkeypatch.setitem(sys.modules, "tensorboardX", None)  # import raises ImportError
  monkeypatch.setitem(sys.modules, "tensorflow", None)
  monkeypatch.setitem(sys.modules, "flax.metrics.tensorboard", None)
  assert summary.open_writer(tmp_path / "tb") is None
  wd = tmp_path / "run"
  log = run(wd, corpus, stop_at_step=2)
  assert len(records(wd, "train")) == len(log["train"]) == 2
  assert not (wd / ckpt.TENSORBOARD_DIR).exists()


def test_tensorboard_scalars_are_routed(partial, corpus, tmp_path, monkeypatch):
  got = []

  class Fake:
    def add_scalar(self, tag, value, global_step):
      got.append((tag, global_step, value))

    def flush(self):
      got.append("flush")

    def close(self):
      pass

  monkeypatch.setattr(
    summary, "open_writer", lambda logdir: summary.ScalarWriter(Fake(), "tensorboardX")
  )
  wd = tmp_path / "run"
  shutil.copytree(partial, wd)
  log = run(wd, corpus)
  scalars = [g for g in got if g != "flush"]
  assert [(s, v) for t, s, v in scalars if t == "train/loss"] == [
    (r["step"], r["loss"]) for r in log["train"][4:]
  ]
  assert [(s, v) for t, s, v in scalars if t == "eval/val_bpb"] == [(6, log["eval"][-1]["val_bpb"])]
  assert "flush" in got  # before the final checkpoint


def test_tensorboardx_event_file(partial, corpus, tmp_path):
  tbx = pytest.importorskip("tensorboardX")
  from tensorboardX.proto import event_pb2

  wd = tmp_path / "run"
  shutil.copytree(partial, wd)
  log = run(wd, corpus)
  assert summary.open_writer(tmp_path / "probe").kind == "tensorboardX", tbx.__version__
  values = {}
  for path in (wd / ckpt.TENSORBOARD_DIR).glob("events.out.tfevents.*"):
    data = path.read_bytes()
    while data:  # TFRecord framing: length (8), crc (4), payload, crc (4)
      n = int.from_bytes(data[:8], "little")
      event = event_pb2.Event.FromString(data[12 : 12 + n])
      data = data[16 + n :]
      for v in event.summary.value:
        values[(v.tag, event.step)] = v.simple_value
  for r in log["train"][4:]:
    assert values[("train/loss", r["step"])] == pytest.approx(r["loss"], rel=1e-6)
  assert values[("eval/val_bpb", 6)] == pytest.approx(log["eval"][-1]["val_bpb"], rel=1e-6)


def test_select_layers_checked_only_for_select():
  one = ModelConfig(d_model=32, num_layers=1, num_heads=2, max_len=32)
  for variant in ("dense", "topk", "power", "certified"):
    cfg = tiny_config(variant, model=one, select_layers=2, select_step=-1)
    assert cfg.model.num_layers == 1
  with pytest.raises(ValueError, match=r"select_layers=2 must be in \[0, 1\]"):
    tiny_config("select", model=one, select_layers=2)


def test_train_flags_topk_one_layer(tmp_path):
  # The CLI path of the report: --variant=topk --num_layers=1 (default --select_layers=2).
  from absl import flags

  from gsparse.train import cli

  fv = flags.FlagValues()
  cli.define_flags(flag_values=fv)
  fv(["train", "--variant=topk", "--num_layers=1", "--seq_len=32", f"--workdir={tmp_path}"])
  cfg = cli.config_from_flags(fv)
  assert (cfg.variant, cfg.model.num_layers, cfg.select_layers) == ("topk", 1, 2)
  assert fv.keep_checkpoints == 3 and fv.restart is False
