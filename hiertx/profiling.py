r"""Profiles of training steps, and a summary of where their time goes.

`--config.train.profile_steps=N,M` traces steps N to M (inclusive) with
`jax.profiler` into `<workdir>/profile/`: an XPlane trace TensorBoard's
profile plugin reads, and a Perfetto trace (`perfetto_trace.json.gz`,
ui.perfetto.dev). Then

  python -m hiertx.profiling --workdir=W [--top=5]

prints the ops that took the most time in the traced steps, summed over
every occurrence and (by default) over every instance of a kind of op:
XLA:CPU names ops after the fusions it emitted (`ynn_fusion` is a matmul run
by YNNPACK, `loop_fusion` an elementwise loop, `copy_*` a layout change).
"""

import collections
import gzip
import json
import os
import re
import shutil
import tempfile

import jax
from absl import flags

from hiertx import cli
from hiertx import config as config_lib
from hiertx import storage
from hiertx.errors import HiertxError


class StepTrace:
  """Starts a trace before step N and stops it after step M has finished. A
  workdir on object storage gets the trace files once the trace stops (the
  profiler writes them to a local directory)."""

  def __init__(self, spec, workdir: str, active: bool = True):
    self.steps = config_lib.profile_steps(spec) if active else None
    self.dir = storage.join(workdir, "profile")
    self.on = False
    self._local = None

  def before(self, step: int) -> None:
    if self.steps and step == self.steps[0] and not self.on:
      self._local = tempfile.mkdtemp(prefix="hiertx-profile-") if storage.is_url(
          self.dir) else self.dir
      jax.profiler.start_trace(self._local, create_perfetto_trace=True)
      self.on = True

  def after(self, step: int, outputs) -> None:
    if self.on and step >= self.steps[1]:
      jax.block_until_ready(outputs)
      self.close()
      print(f"profile of steps {self.steps[0]}-{step} written to {self.dir}; summary: "
            f"python -m hiertx.profiling --workdir={os.path.dirname(self.dir)}", flush=True)

  def close(self) -> None:
    if self.on:
      jax.profiler.stop_trace()
      self.on = False
      if self._local != self.dir:
        storage.upload_tree(self._local, self.dir)
        shutil.rmtree(self._local, ignore_errors=True)


def newest_trace(workdir: str) -> str:
  """The newest Perfetto trace under `<workdir>/profile` (the profiler names
  its runs by start time, so the name orders them)."""
  paths = storage.glob(storage.join(storage.check(workdir, "--workdir"), "profile", "**",
                                    "*perfetto_trace.json.gz"))
  if not paths:
    raise HiertxError(f"no profile under {workdir}/profile; train with "
                      "--config.train.profile_steps=N,M first")
  return max(paths, key=lambda p: (p.split("/profile/", 1)[-1], p))


def top_ops(path: str, top: int = 5, group: bool = True
            ) -> tuple[list[tuple[str, float, int]], float]:
  """[(op name, total ms, count)] of the `top` ops by total time, and the
  total ms of all ops, from a Perfetto trace. Only ops count: events on an
  accelerator's streams, or on XLA:CPU's execution threads, less the
  executor's own wrappers; Python and runtime bookkeeping do not. With
  `group`, instances of one kind (`loop_fusion.12`, `loop_fusion.40`) are
  summed under the kind's name."""
  trace = json.loads(gzip.decompress(storage.read_bytes(path)))
  events = trace["traceEvents"] if isinstance(trace, dict) else trace
  process = {e["pid"]: e["args"].get("name", "") for e in events
             if e.get("ph") == "M" and e.get("name") == "process_name"}
  thread = {(e["pid"], e.get("tid")): e["args"].get("name", "") for e in events
            if e.get("ph") == "M" and e.get("name") == "thread_name"}

  def is_op(e) -> bool:
    where = thread.get((e["pid"], e.get("tid")), "")
    on_device = "/device:" in process.get(e["pid"], "")
    return (on_device or "XLA" in where) and not e.get("name", "").startswith(_WRAPPERS)

  totals, counts = collections.Counter(), collections.Counter()
  for e in events:
    if e.get("ph") == "X" and "dur" in e and is_op(e):
      name = re.sub(r"\.\d+$", "", e["name"]) if group else e["name"]
      totals[name] += e["dur"] / 1000.0
      counts[name] += 1
  return ([(n, ms, counts[n]) for n, ms in totals.most_common(top)],
          sum(totals.values()))


_WRAPPERS = ("ThunkExecutor", "PjRt", "PjitFunction", "np.asarray", "Thunk::")


def define_flags() -> None:
  flags.DEFINE_string("workdir", None, "A workdir trained with train.profile_steps.",
                      required=True)
  flags.DEFINE_integer("top", 5, "How many ops to list.", lower_bound=1)
  flags.DEFINE_bool("group", True, "Sum the instances of each kind of op (fusion.1, "
                    "fusion.2, ...) under one name.")


def main(argv):
  del argv
  path = cli.run(newest_trace, flags.FLAGS.workdir)
  ops, total = top_ops(path, flags.FLAGS.top, flags.FLAGS.group)
  print(f"{path}\n{total:,.1f} ms of ops in the traced steps; the top {len(ops)}:")
  for name, ms, n in ops:
    print(f"  {ms:10,.1f} ms  {ms / max(total, 1e-9):6.1%}  x{n:<5d} {name}")


def run() -> None:
  """The `hiertx-profiling` console script."""
  cli.command(define_flags, main)


if __name__ == "__main__":
  run()
