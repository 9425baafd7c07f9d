"""What a run reports (docs/design.md section 6): JSONL + TensorBoard writers,
evaluation summaries, parameter counts. XLA's and the devices' numbers are in
hiertx.device_stats, compressor baselines in hiertx.baselines, versions and
the commit in hiertx.provenance."""

import json
import math
import os
import platform
import time

import jax
import numpy as np
from absl import logging

from hiertx import storage


class _EventFile:
  """A TensorBoard event file: the `tensorboard` package's record framing
  over a hiertx.storage.Appender, so it works on a local disk and on object
  storage alike. (`EventFileWriter` opens files through
  `tensorboard.compat.tf`, which imports TensorFlow wherever it is installed:
  5 s of every run's start-up.)"""

  def __init__(self, logdir: str, event_cls):
    from tensorboard.summary.writer.record_writer import RecordWriter
    storage.makedirs(logdir)
    name = f"events.out.tfevents.{time.time():010.0f}.{platform.node()}.{os.getpid()}.hiertx"
    self._file = storage.Appender(storage.join(logdir, name), keep_existing=False)
    self._records = RecordWriter(self._file)
    self.add_event(event_cls(wall_time=time.time(), file_version="brain.Event:2"))

  def add_event(self, event) -> None:
    self._records.write(event.SerializeToString())

  def flush(self):
    self._file.flush()

  def close(self):
    self._file.close()


class _EventWriter:
  """Scalars as TensorBoard events, through the `tensorboard` package's own
  record writer and protos: no TensorFlow needed."""

  def __init__(self, logdir: str):
    from tensorboard.compat.proto import event_pb2, summary_pb2
    self._event, self._summary = event_pb2.Event, summary_pb2.Summary
    self._file = _EventFile(logdir, event_pb2.Event)

  def write_scalars(self, step: int, scalars: dict) -> None:
    values = [self._summary.Value(tag=k, simple_value=v) for k, v in scalars.items()]
    self._file.add_event(self._event(wall_time=time.time(), step=step,
                                     summary=self._summary(value=values)))

  def flush(self):
    self._file.flush()

  def close(self):
    self._file.close()


def event_writer(logdir: str):
  """A TensorBoard event writer, or None (said once) without `tensorboard`."""
  try:
    return _EventWriter(logdir)
  except ImportError as e:
    print(f"no TensorBoard events ({e}; pip install tensorboard): metrics.jsonl has "
          "every scalar", flush=True)
    logging.warning("tensorboard unavailable: %s", e)
    return None


class Writer:
  """Scalars to `<workdir>/metrics.jsonl` and TensorBoard; no-op off process 0.

  On a local disk every line is written at once; on object storage, which
  cannot append, the files are uploaded again on `flush()` (the trainer
  flushes at evaluations, checkpoints and the end) and at least every
  `upload_every_s` seconds."""

  def __init__(self, workdir: str, active: bool = True, upload_every_s: float = 60.0):
    self.active = active
    self.path = storage.join(workdir, "metrics.jsonl")
    self._lines = storage.Appender(self.path) if active else None
    self._tb = event_writer(storage.join(workdir, "tensorboard")) if active else None
    self._upload_every_s, self._uploaded = upload_every_s, time.time()

  def write(self, step: int, scalars: dict) -> None:
    if not self.active:
      return
    clean = {k: float(v) for k, v in scalars.items()}
    self._lines.write(json.dumps({"step": int(step), "time": time.time(), **clean}) + "\n")
    finite = {k: v for k, v in clean.items() if math.isfinite(v)}
    if self._tb:
      self._tb.write_scalars(int(step), finite)
    if not self._lines.remote:
      self._lines.flush()
    elif time.time() - self._uploaded > self._upload_every_s:
      self.flush()

  def flush(self):
    if self._lines:
      self._lines.flush()
      self._uploaded = time.time()
    if self._tb:
      self._tb.flush()

  def close(self):
    if self._lines:
      self._lines.close()
    if self._tb:
      self._tb.close()


def read_jsonl(path: str) -> list[dict]:
  return [json.loads(line) for line in storage.read_text(path).splitlines() if line.strip()]


def groups_text(result: dict) -> str:
  """' | mean group ... bytes, dropped closes ...%, forced ...%' for an
  evaluation of content groups (hiertx.boundaries); '' otherwise."""
  if "eval/mean_group_length" not in result:
    return ""
  return (f" | mean group {result['eval/mean_group_length']:.2f} bytes, dropped closes "
          f"{result['eval/dropped_closes']:.2%}, forced "
          f"{result.get('eval/forced_closes', 0.0):.2%}"
          + (f"; second stage {result['eval/mean_group_length_1']:.2f} chunks per chunk"
             if "eval/mean_group_length_1" in result else ""))


def summarize_eval(sums: dict) -> dict:
  """Evaluation sums (nats, tokens, bytes; content-group counts) as the
  reported loss, perplexity and bits per byte."""
  loss = sums["nll"] / max(sums["tokens"], 1.0)
  out = {"eval/loss": loss, "eval/perplexity": math.exp(min(loss, 80.0)),
         "eval/bits_per_byte": sums["nll"] / (math.log(2) * max(sums["bytes"], 1.0)),
         "eval/tokens": sums["tokens"]}
  if "positions" in sums:  # content groups
    out["eval/mean_group_length"] = sums["positions"] / max(sums["closes"], 1.0)
    out["eval/dropped_closes"] = sums["dropped"] / max(sums["positions"], 1.0)
    out["eval/forced_closes"] = sums.get("forced", 0.0) / max(sums["positions"], 1.0)
  if "positions_1" in sums:  # H-Net's second stage, in first-stage chunks
    out["eval/mean_group_length_1"] = sums["positions_1"] / max(sums["closes_1"], 1.0)
  return out


def param_counts(params) -> dict[str, int]:
  """Total parameters and per top-level module (e.g. scale_0, pool_1, post)."""
  counts = {"params/total": 0}
  for key, sub in params.items():
    n = sum(int(np.prod(x.shape)) for x in jax.tree_util.tree_leaves(sub))
    counts[f"params/{key}"] = n
    counts["params/total"] += n
  return counts
