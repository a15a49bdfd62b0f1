"""Where a training run's records go: the log stream, TensorBoard and checkpoints.

`Recorder(workdir)` is a context manager used by `run_training`; with
`workdir=None` every method is a no-op. See `gsparse.train.checkpoint` for
the workdir layout and the guarantees after a kill.
"""

from __future__ import annotations

import pathlib

from gsparse.train import checkpoint as ckpt
from gsparse.train import summary


class Recorder:
  """Appends records to `log.jsonl` and TensorBoard, and saves checkpoints.

  Args:
    workdir: the run directory (None: record nothing).
    keep: checkpoints to keep (the newest).
    tensorboard: also write TensorBoard scalars when a writer is installed.
  """

  def __init__(self, workdir: pathlib.Path | None, *, keep: int, tensorboard: bool):
    ckpt.check_keep(keep)
    self.workdir = workdir
    self._keep, self._tensorboard = keep, tensorboard
    self._manager = self._stream = self._writer = None

  def __enter__(self) -> Recorder:
    if self.workdir is not None:
      self.workdir.mkdir(parents=True, exist_ok=True)
      self._manager = ckpt.open_manager(self.workdir, keep=self._keep)
    return self

  def __exit__(self, *exc) -> None:
    for f in (self._stream, self._writer, self._manager):
      if f is not None:
        f.close()

  def start(self, log: dict, abstract_state, *, restart: bool):
    """Opens the run; returns `(state, log)` restored from the newest checkpoint,
    or `(None, log)` for a fresh start. Raises `CheckpointError` (see
    `checkpoint.check_workdir`) rather than start over a lost checkpoint."""
    if self.workdir is None:
      return None, log
    if restart:
      self._manager.close()
      ckpt.clear_workdir(self.workdir)
      self._manager = ckpt.open_manager(self.workdir, keep=self._keep)
    step, recorded = ckpt.check_workdir(self.workdir, self._manager)
    note = {}
    if step is not None and recorded is not None and recorded > step:
      note = {"newer_checkpoint_deleted": recorded}  # the user chose an older step
    state = None
    if step is not None:
      got = ckpt.restore(self._manager, step, abstract_state)
      if got["meta"]["config"] != log["config"]:
        raise ckpt.CheckpointError(
          f"checkpoint {self.workdir / ckpt.CHECKPOINT_DIR / str(step)} was written by a "
          f"different config; use another workdir or {ckpt.RESTART_HINT}"
        )
      state, log = got["state"], got["log"]
    self._stream = ckpt.LogStream(self.workdir / ckpt.LOG_STREAM)
    self._stream.write(
      "start", step=step or 0, resumed=step is not None, **note, config=log["config"]
    )
    if self._tensorboard:
      self._writer = summary.open_writer(self.workdir / ckpt.TENSORBOARD_DIR)
    return state, log

  def record(self, event: str, rec: dict, scalars: dict[str, float] | None = None) -> None:
    """Appends `rec` to the log stream and `scalars` (tag: value) to TensorBoard."""
    if self._stream is None:
      return
    self._stream.write(event, **rec)
    if self._writer is not None and scalars:
      for tag, value in scalars.items():
        self._writer.scalar(tag, value, rec["step"])

  def checkpoint(self, step: int, state, log: dict) -> None:
    """Saves `state` and `log` (of `step` steps) as one step, then records it."""
    if self._manager is None:
      return
    if self._writer is not None:
      self._writer.flush()
    self._stream.sync()
    ckpt.save(self._manager, step, state, config=log["config"], log=log)
    self.record("checkpoint", {"step": step})

  def finish(self, log: dict) -> None:
    """Records the final entry and writes the complete `log.json`."""
    if self.workdir is None:
      return
    self.record("final", log["final"])
    ckpt.write_point("final_log")
    ckpt.write_json_atomic(self.workdir / ckpt.FINAL_LOG, log)
    ckpt.write_point("final_log_written")
