"""Optional TensorBoard scalar summaries of a training run.

The JSON logs (`log.jsonl`, `log.json`) are always written; this adds a
TensorBoard event file when a writer is installed. Tried in order:
`tensorboardX.SummaryWriter`, then `flax.metrics.tensorboard.SummaryWriter`
(which needs TensorFlow). Neither is a dependency of gsparse.
"""

from __future__ import annotations

import pathlib


class ScalarWriter:
  """`scalar(tag, value, step)`, `flush()`, `close()` over an installed writer."""

  def __init__(self, writer, kind: str):
    self._w = writer
    self.kind = kind

  def scalar(self, tag: str, value: float, step: int) -> None:
    if self.kind == "tensorboardX":
      self._w.add_scalar(tag, value, global_step=step)
    else:
      self._w.scalar(tag, value, step)

  def flush(self) -> None:
    self._w.flush()

  def close(self) -> None:
    self._w.close()


def open_writer(logdir: pathlib.Path) -> ScalarWriter | None:
  """A writer of event files under `logdir`, or None when none is installed."""
  try:
    import tensorboardX  # noqa: PLC0415 (optional dependency)
  except ImportError:
    pass
  else:
    return ScalarWriter(tensorboardX.SummaryWriter(str(logdir)), "tensorboardX")
  try:
    from flax.metrics import tensorboard  # noqa: PLC0415 (imports tensorflow)
  except ImportError:
    return None
  return ScalarWriter(tensorboard.SummaryWriter(str(logdir)), "flax")
