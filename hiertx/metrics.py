"""What a run reports (docs/design.md section 6): JSONL + TensorBoard writers, the
XLA memory/cost analysis of a compiled step, parameter counts, run facts."""

import gzip
import importlib.metadata
import json
import lzma
import math
import os
import platform
import subprocess
import time

import flax
import jax
import jax.numpy as jnp
import numpy as np
import optax
import orbax.checkpoint
from absl import logging

import hiertx
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


def compressor_bits_per_byte(text: bytes) -> dict[str, float]:
  """What general-purpose compressors spend on `text`: `gzip -9` and `xz -9`
  (Python's gzip and lzma at those presets), in bits per byte. A language
  model's bits per byte on the same text reads against them."""
  n = max(len(text), 1)
  return {"gzip_bits_per_byte": 8 * len(gzip.compress(text, compresslevel=9, mtime=0)) / n,
          "xz_bits_per_byte": 8 * len(lzma.compress(text, preset=9)) / n}


def xla_memory(compiled) -> dict[str, int]:
  """Bytes from XLA's buffer assignment of a compiled function.

  peak = argument + output + temp - alias (donated inputs reuse their buffers).
  """
  m = compiled.memory_analysis()
  if m is None:
    return {}
  out = {
      "memory/xla_argument_bytes": m.argument_size_in_bytes,
      "memory/xla_output_bytes": m.output_size_in_bytes,
      "memory/xla_temp_bytes": m.temp_size_in_bytes,
      "memory/xla_alias_bytes": m.alias_size_in_bytes,
      "memory/xla_generated_code_bytes": m.generated_code_size_in_bytes,
  }
  out["memory/xla_peak_bytes"] = (out["memory/xla_argument_bytes"] + out["memory/xla_output_bytes"]
                                  + out["memory/xla_temp_bytes"] - out["memory/xla_alias_bytes"])
  return out


def xla_flops(compiled) -> float | None:
  cost = compiled.cost_analysis()
  if isinstance(cost, (list, tuple)):
    cost = cost[0] if cost else None
  if not cost or "flops" not in cost:
    return None
  return float(cost["flops"])


def device_peak_bytes() -> int | None:
  """Allocator peak on device 0, where the backend reports it (GPU/TPU)."""
  try:
    stats = jax.local_devices()[0].memory_stats()
  except Exception:  # noqa: BLE001  (backends without stats raise various errors)
    return None
  return None if not stats or "peak_bytes_in_use" not in stats else int(stats["peak_bytes_in_use"])


def param_counts(params) -> dict[str, int]:
  """Total parameters and per top-level module (e.g. scale_0, pool_1, post)."""
  counts = {"params/total": 0}
  for key, sub in params.items():
    n = sum(int(np.prod(x.shape)) for x in jax.tree_util.tree_leaves(sub))
    counts[f"params/{key}"] = n
    counts["params/total"] += n
  return counts


def git_sha() -> str:
  try:
    here = os.path.dirname(os.path.abspath(__file__))
    return subprocess.run(["git", "rev-parse", "HEAD"], cwd=here, capture_output=True,
                          text=True, timeout=5).stdout.strip() or "unknown"
  except (OSError, subprocess.SubprocessError):
    return "unknown"


def versions() -> dict[str, str]:
  return {"python": platform.python_version(), "jax": jax.__version__,
          "flax": flax.__version__, "optax": optax.__version__,
          "orbax": getattr(orbax.checkpoint, "__version__", "?"),
          "seqio": _installed("seqio"), "tensorflow": _installed("tensorflow"),
          "hiertx": hiertx.__version__}


def _installed(package: str) -> str:
  """A package's version without importing it; 'absent' when not installed."""
  try:
    return importlib.metadata.version(package)
  except importlib.metadata.PackageNotFoundError:
    return "absent"


# Dense matmul peaks per chip in FLOP/s, (float32, bfloat16), from the vendors'
# data sheets. GPUs run float32 matmuls as TF32 by default, hence the TF32 figure;
# TPUs run them as bfloat16 passes.
DEVICE_PEAK_FLOPS = {
    "H100": (494.7e12, 989.4e12),
    "H200": (494.7e12, 989.4e12),
    "A100": (156e12, 312e12),
    "TPU v4": (275e12, 275e12),
    "TPU v5 lite": (197e12, 197e12),
    "TPU v5e": (197e12, 197e12),
    "TPU v5p": (459e12, 459e12),
    "TPU v6 lite": (918e12, 918e12),
    "TPU v6e": (918e12, 918e12),
}


def measured_matmul_peak(dtype: str = "float32", n: int = 1024, seconds: float = 0.2) -> float:
  """FLOP/s of a square matmul on this host's default device, best of several runs."""
  a = jnp.ones((n, n), dtype)
  mm = jax.jit(lambda x, y: x @ y)
  mm(a, a).block_until_ready()
  best, t_end = float("inf"), time.time() + seconds
  while time.time() < t_end or best == float("inf"):
    t0 = time.perf_counter()
    mm(a, a).block_until_ready()
    best = min(best, time.perf_counter() - t0)
  return 2 * n ** 3 / best


_MEASURED: dict = {}


def peak_flops(dtype: str = "float32") -> tuple[float, str]:
  """Peak matmul FLOP/s of all devices in the job and where the number comes from.

  Accelerators: the data-sheet figure per chip times the device count. CPU:
  a matmul measured on this host (all its cores) times the process count;
  simulated CPU devices share the same cores, so they do not multiply it.
  """
  dev = jax.devices()[0]
  column = 1 if dtype in ("bfloat16", "float16") else 0
  if dev.platform != "cpu":
    for name, peaks in DEVICE_PEAK_FLOPS.items():
      if name.lower() in dev.device_kind.lower():
        return peaks[column] * jax.device_count(), f"data sheet ({dev.device_kind})"
    return float("nan"), f"unknown device {dev.device_kind!r}"
  if dtype not in _MEASURED:
    _MEASURED[dtype] = measured_matmul_peak(dtype)
  return _MEASURED[dtype] * jax.process_count(), "measured 1024x1024 matmul on this host"
