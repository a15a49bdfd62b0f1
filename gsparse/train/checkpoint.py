"""Step-indexed, atomic training checkpoints and the append-only run log.

A training workdir holds:

* `checkpoints/<step>/`: one orbax `CheckpointManager` step per checkpoint,
  with three items saved together as one composite: `state` (parameters,
  optimizer state, step counter), `meta` (format tag, step, config) and `log`
  (the run's log up to that step). orbax writes the step into a temporary
  directory and renames it when every item is complete, so a step directory
  is either whole or absent; a kill mid-save leaves the previous step intact.
  The newest `keep` steps are kept.
* `log.jsonl`: one JSON record per line (`event` = "start", "train", "eval",
  "select", "checkpoint", "final"), appended and flushed as the run goes.
  Nothing in it is ever rewritten: after a kill, the resumed run appends a
  "start" record naming the step it resumed from, and re-logs the steps after
  that checkpoint.
* `log.json`: the complete log, written (atomically) when the run finishes.

A workdir whose checkpoint is missing or unreadable raises `CheckpointError`
naming the file or directory; `clear_workdir` (the `--restart` flag) is the
deliberate way to start over. Nothing here restarts silently.
"""

from __future__ import annotations

import json
import os
import pathlib
import shutil
from collections.abc import Callable
from typing import Any

import orbax.checkpoint as ocp

CHECKPOINT_DIR = "checkpoints"
LOG_STREAM = "log.jsonl"
FINAL_LOG = "log.json"
TENSORBOARD_DIR = "tensorboard"
LEGACY_FILES = ("state.msgpack", "meta.json")  # msgpack checkpoints from before orbax
FORMAT = "gsparse.train.checkpoint/1"
ITEMS = ("state", "meta", "log")
RESTART_HINT = (
  "pass --restart (run_training(..., restart=True)) to discard the run in this workdir "
  "and start over"
)

# Test hook: called with the name of each write point just before (or, for
# "*_saved"/"*_written", just after) it happens; a test raises from it to
# simulate a kill at that point.
fault_hook: Callable[[str], None] | None = None


def write_point(name: str) -> None:
  if fault_hook is not None:
    fault_hook(name)


class CheckpointError(ValueError):
  """A workdir's checkpoint is missing, incomplete or unreadable."""


def check_keep(keep) -> None:
  if isinstance(keep, bool) or not isinstance(keep, int) or keep < 1:
    raise ValueError(f"keep_checkpoints={keep!r} must be an int >= 1")


def open_manager(workdir: pathlib.Path, *, keep: int, read_only: bool = False):
  """The orbax `CheckpointManager` of `workdir` (synchronous saves, newest `keep`).

  `read_only` managers are for restoring: they create nothing and must not
  save (orbax's own `read_only` option is not used only because it logs a
  warning on every open).
  """
  check_keep(keep)
  options = ocp.CheckpointManagerOptions(
    max_to_keep=None if read_only else keep,
    create=not read_only,
    cleanup_tmp_directories=not read_only,  # a save cut short by a kill
    enable_async_checkpointing=False,
  )
  return ocp.CheckpointManager(workdir / CHECKPOINT_DIR, options=options)


def save(manager, step: int, state, *, config: dict, log: dict) -> None:
  """Saves state, metadata and log as one atomic step (a no-op if it exists)."""
  if step in manager.all_steps():
    return
  write_point("checkpoint_save")
  meta = {"format": FORMAT, "step": step, "config": config}
  manager.save(
    step,
    args=ocp.args.Composite(
      state=ocp.args.StandardSave(state),
      meta=ocp.args.JsonSave(meta),
      log=ocp.args.JsonSave(log),
    ),
  )
  write_point("checkpoint_saved")


def restore(manager, step: int, abstract_state, *, items: tuple = ITEMS) -> dict[str, Any]:
  """Restores `items` of `step`, checking them; raises `CheckpointError` naming the path.

  Args:
    manager: from `open_manager`.
    step: a step in `manager.all_steps()`.
    abstract_state: the state's pytree of `jax.ShapeDtypeStruct` (with
      shardings), which fixes the restored structure, dtypes and placement.
    items: the items to restore ("state" needs `abstract_state`).

  Returns:
    `{item: value}`.
  """
  step_dir = pathlib.Path(manager.directory) / str(step)
  for item in items:
    if not (step_dir / item).is_dir():
      raise CheckpointError(
        f"checkpoint {step_dir} is incomplete: {step_dir / item} is missing; "
        f"{_older(manager, step)}"
      )
  args = {
    "state": ocp.args.StandardRestore(abstract_state),
    "meta": ocp.args.JsonRestore(),
    "log": ocp.args.JsonRestore(),
  }
  try:
    out = manager.restore(step, args=ocp.args.Composite(**{i: args[i] for i in items}))
  except Exception as e:  # orbax/tensorstore/json errors, whatever the damage
    raise CheckpointError(
      f"checkpoint {step_dir} is unreadable ({type(e).__name__}: {_first_line(e)}); "
      f"{_older(manager, step)}"
    ) from e
  got = {i: out[i] for i in items}
  meta = got.get("meta")
  if meta is not None and (
    not isinstance(meta, dict) or meta.get("format") != FORMAT or meta.get("step") != step
  ):
    raise CheckpointError(
      f"checkpoint {step_dir / 'meta'} is not a gsparse.train checkpoint of step {step} "
      f"(got {str(meta)[:200]}); {_older(manager, step)}"
    )
  state = got.get("state")
  if state is not None and int(state["step"]) != step:
    raise CheckpointError(
      f"checkpoint {step_dir / 'state'} holds the state of step {int(state['step'])}, "
      f"not {step}; {_older(manager, step)}"
    )
  log = got.get("log")
  if log is not None and (not isinstance(log, dict) or len(log.get("train", ())) != step):
    raise CheckpointError(
      f"checkpoint {step_dir / 'log'} does not hold the log of steps 0..{step - 1}; "
      f"{_older(manager, step)}"
    )
  return got


def _first_line(e: BaseException) -> str:
  return (str(e).strip().splitlines() or [""])[0][:300]


def _older(manager, step: int) -> str:
  older = [s for s in manager.all_steps() if s < step]
  if not older:
    return RESTART_HINT
  step_dir = pathlib.Path(manager.directory) / str(step)
  return f"to resume from an older step ({older}) instead, delete {step_dir}; or {RESTART_HINT}"


def latest_step(workdir: pathlib.Path) -> int | None:
  """The newest complete checkpoint step of `workdir` (None: none)."""
  if not (workdir / CHECKPOINT_DIR).is_dir():
    return None
  with open_manager(workdir, keep=1, read_only=True) as manager:
    return manager.latest_step()


def check_workdir(workdir: pathlib.Path, manager) -> tuple[int | None, int | None]:
  """`(step to resume from, newest checkpoint step recorded in log.jsonl)`.

  The first is None when there is nothing to resume (start fresh). The
  second is larger than the first when newer step directories were deleted
  (deliberately, to resume from an older step): the caller notes it.

  Raises `CheckpointError` when the workdir shows a run but no checkpoint is
  left to resume it from: legacy msgpack files, a finished `log.json`, or
  checkpoints recorded in `log.jsonl`.
  """
  for name in LEGACY_FILES:
    if (workdir / name).exists():
      raise CheckpointError(
        f"{workdir / name} is a checkpoint of an older gsparse (msgpack), which this version "
        f"does not read; {RESTART_HINT}"
      )
  latest = manager.latest_step()
  records = read_log_stream(workdir / LOG_STREAM)
  recorded = max((r["step"] for r in records if r["event"] == "checkpoint"), default=None)
  if latest is None and recorded is not None:
    raise CheckpointError(
      f"{workdir / LOG_STREAM} records a checkpoint at step {recorded}, but "
      f"{workdir / CHECKPOINT_DIR} holds no complete step: the checkpoints were lost; "
      f"{RESTART_HINT}"
    )
  if latest is None and (workdir / FINAL_LOG).exists():
    raise CheckpointError(
      f"{workdir / FINAL_LOG} shows a finished run, but {workdir / CHECKPOINT_DIR} holds no "
      f"complete checkpoint; {RESTART_HINT}"
    )
  return latest, recorded


def clear_workdir(workdir: pathlib.Path) -> None:
  """Deletes the run files of `workdir` (checkpoints, logs, summaries); keeps other files."""
  for name in (CHECKPOINT_DIR, TENSORBOARD_DIR):
    shutil.rmtree(workdir / name, ignore_errors=True)
  for name in (LOG_STREAM, FINAL_LOG, *LEGACY_FILES):
    (workdir / name).unlink(missing_ok=True)


def write_json_atomic(path: pathlib.Path, obj) -> None:
  tmp = path.with_name(path.name + ".tmp")
  tmp.write_text(json.dumps(obj, indent=1))
  os.replace(tmp, path)


class LogStream:
  """Appends one JSON record per line to `path`, flushed after each record."""

  def __init__(self, path: pathlib.Path):
    self.path = path
    path.parent.mkdir(parents=True, exist_ok=True)
    self._f = open(path, "a+b")  # noqa: SIM115 (closed by close())
    self._f.seek(0, os.SEEK_END)
    if self._f.tell():  # a kill mid-line leaves a partial record: end it
      self._f.seek(-1, os.SEEK_END)
      if self._f.read(1) != b"\n":
        self._f.write(b"\n")

  def write(self, event: str, **record) -> None:
    write_point(f"{event}_record")
    self._f.write((json.dumps({"event": event, **record}) + "\n").encode())
    self._f.flush()

  def sync(self) -> None:
    os.fsync(self._f.fileno())

  def close(self) -> None:
    self._f.close()


def read_log_stream(path: pathlib.Path) -> list[dict]:
  """The records of a `log.jsonl` ([] if absent).

  A line that does not parse is skipped when it is the last one or the next
  record is a "start" record (a kill cut it short); anywhere else it is a
  `CheckpointError` naming the file and line.
  """
  if not path.exists():
    return []
  lines = [(i, line) for i, line in enumerate(path.read_bytes().split(b"\n"), 1) if line.strip()]
  recs = [_parse(line) for _, line in lines]
  for j, rec in enumerate(recs):
    cut_short = j + 1 == len(recs) or (recs[j + 1] or {}).get("event") == "start"
    if rec is None and not cut_short:
      raise CheckpointError(f"{path} line {lines[j][0]} is not a JSON record; {RESTART_HINT}")
  return [r for r in recs if r is not None]


def _parse(line: bytes) -> dict | None:
  try:
    rec = json.loads(line)
  except ValueError:
    return None
  return rec if isinstance(rec, dict) and "event" in rec else None
