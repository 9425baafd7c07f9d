# ruff: noqa: E402  (the signal handler below comes before the imports, which take seconds)
r"""Trains a hiertx model: `python -m hiertx.train --config=... --workdir=...`.

  python -m hiertx.train --config=configs/vanilla.py --workdir=/tmp/run
  python -m hiertx.train --config=configs/bottom_up.py:size=tiny \
      --config.train.steps=200 --workdir=/tmp/bu

The workdir may be a local path or a URL (`--workdir=gs://bucket/run`).
Re-running the same command resumes from the newest checkpoint in the
workdir. SIGTERM / Ctrl-C finish the current step, save, and exit (0);
SIGUSR1 does the same and exits with 75 (EX_TEMPFAIL), which the SLURM
scripts of `launch/` ask for before a job's time limit and answer by
requeueing the job. While it runs the trainer holds the workdir's lease
(hiertx.lease): a second trainer on the same workdir stops with one line.
"""

import signal
import threading

# SIGUSR1 asks for a save and a requeue (SLURM sends it before a job's time
# limit, up to a minute early), and may come while this process is still
# importing or compiling, which it would otherwise not survive: remembered
# from the first moment, and acted on after the first step.
_EARLY_SIGNALS: list[str] = []


def _remember(signum, frame) -> None:
  del frame
  _EARLY_SIGNALS.append(signal.Signals(signum).name)


if (threading.current_thread() is threading.main_thread()
    and signal.getsignal(signal.SIGUSR1) == signal.SIG_DFL):
  signal.signal(signal.SIGUSR1, _remember)

import json
import math
import os
import sys
import time

import jax
import numpy as np
from absl import flags, logging
from jax.experimental import multihost_utils
from ml_collections import config_flags

from hiertx import baselines, checkpoint, device_stats, provenance
from hiertx import cli
from hiertx import config as config_lib
from hiertx import data
from hiertx import distributed
from hiertx import lease as lease_lib
from hiertx import metrics
from hiertx import optimizer
from hiertx import profiling
from hiertx import steps
from hiertx import storage
from hiertx.errors import HiertxError


class TrainingError(HiertxError):
  """Training cannot go on (e.g. a non-finite loss)."""


def train_and_evaluate(config, workdir: str, allow_config_change: bool = False,
                       restart_from_scratch: bool = False) -> dict:
  """Trains to `config.train.steps`, resuming from `workdir` (a local path or
  a URL); returns the last metrics, with 'step', 'wall_time_s' and
  'requeue' (stopped by SIGUSR1). `restart_from_scratch`: start from step 0
  where every checkpoint of the workdir was set aside as unreadable
  (otherwise such a workdir is refused).

  The trainer holds the workdir's lease while it runs (hiertx.lease): a
  workdir another live process holds is refused before anything is
  written. The run's state goes to `<workdir>/status.json` (running,
  finished, interrupted or failed with the error), which sweeps and
  reports read.
  """
  lead = jax.process_index() == 0
  config = config_lib.resolved(config)
  workdir = storage.check(workdir, "--workdir")
  checkpoint.ensure_writable(workdir)
  lease = _take_lease(workdir, config.train.lease_timeout_s, lead)
  try:
    try:
      # Build and check everything before touching the workdir's checkpoints.
      run = steps.build_run(config)
      out = _train(run, config, workdir, allow_config_change, restart_from_scratch, lease)
    except BaseException as e:
      if lead and not isinstance(e, lease_lib.LeaseLost):
        checkpoint.write_status(workdir, "failed", error=f"{type(e).__name__}: {e}"[:2000],
                                time=time.time())
      raise
    if lead:
      state = "finished" if out["step"] >= config.train.steps else "interrupted"
      checkpoint.write_status(workdir, state, step=out["step"], time=time.time(),
                              wall_time_s=out["wall_time_s"])
  finally:
    if lease is not None:
      lease.release()
  return out


def _take_lease(workdir: str, timeout_s: float, lead: bool):
  """Process 0 takes the workdir's lease (None elsewhere); every process
  stops when it could not."""
  lease, error = None, None
  if lead:
    try:
      lease = lease_lib.acquire(workdir, timeout_s)
    except (HiertxError, OSError) as e:  # the others wait to hear, so none may escape
      error = e
  if jax.process_count() > 1:
    ok = multihost_utils.broadcast_one_to_all(np.int32(error is None))
    if not ok and error is None:
      error = lease_lib.WorkdirHeld(f"process 0 could not take the lease of {workdir} "
                                    "(its output says why)")
  if error is not None:
    raise error
  return lease


def _train(run, config, workdir: str, allow_config_change: bool, restart_from_scratch: bool,
           lease) -> dict:
  lead = jax.process_index() == 0
  checkpoint.prepare_workdir(workdir, config, allow_config_change, write=lead)
  if lead:
    checkpoint.write_status(workdir, "running", pid=os.getpid(), time=time.time(),
                            lease_epoch=lease.epoch)
  mngr = checkpoint.manager(workdir, config.train.keep_checkpoints)
  try:
    return _train_in(run, config, workdir, mngr, lead, restart_from_scratch, lease)
  finally:
    mngr.close()  # also when restoring or a step fails: no save may be left dangling


def _train_in(run, config, workdir: str, mngr, lead: bool, restart_from_scratch: bool,
              lease) -> dict:
  writer = metrics.Writer(workdir, active=lead)
  total = config.train.steps

  # Resume, or start from step 0.
  start, state = checkpoint.restore_latest(mngr, run.abstract_state, set_aside=lead,
                                           restart_from_scratch=restart_from_scratch)
  if start is not None:
    logging.info("resumed from checkpoint at step %d in %s", start, workdir)
    print(f"resumed at step {start}", flush=True)
  else:
    start = 0
    state = run.init(jax.random.PRNGKey(config.train.seed))
  if start >= total:
    print(f"already trained to step {start} (train.steps={total}); nothing to do", flush=True)

  # Compile once, ahead of time; report memory and FLOPs before the first step.
  step_fn, facts = steps.compile_train_step(run, config)
  facts.update(metrics.param_counts(state.params))
  peak, peak_source = device_stats.peak_flops(config.model.dtype)
  facts["mfu/peak_flops_per_s"] = peak
  facts["mfu/peak_source"] = peak_source
  if lead:
    _write_run_info(workdir, config, run, facts)
  writer.write(start, {k: v for k, v in facts.items() if not isinstance(v, str)})
  print(f"model {config.model.name}: {facts['params/total']:,} params, XLA peak train-step "
        f"memory {facts.get('memory/xla_peak_bytes', 0) / 2**20:.1f} MiB (analytic "
        f"{facts['memory/analytic_peak_bytes'] / 2**20:.1f} MiB)", flush=True)
  print("attention sites:\n  " + facts["attention/sites"].replace("\n", "\n  "), flush=True)

  # Data from the batch of the step we resume at: computed, not replayed.
  shard = run.data_shard
  batches = data.train_batches(config.data, config.data.batch_size, start, shard, run.align)
  eval_data = data.eval_batches(config.data, config.eval.split, config.eval.batch_size,
                                config.eval.batches, shard, run.align)
  compressors = baselines.compressor_bits_per_byte(data.scored_text(eval_data, run.vocab))
  progress = _Progress(config, workdir, writer, start, facts["flops/step_model"],
                       facts["flops/step_analytic"], peak, compressors)
  profiler = profiling.StepTrace(config.train.profile_steps, workdir, active=lead)

  def save(step):
    progress.flush()  # a non-finite step must be caught before it is saved
    if lease is not None:
      lease.check()  # a workdir taken over by another process is not written to
    if mngr.latest_step() != step:
      checkpoint.save(mngr, step, state)
      if lead:
        checkpoint.write_manifests(mngr, below=step)
    writer.flush()

  step, requeue = start, False
  try:
    with _StopRequest(config.train.stop_check_every, lease) as stop:
      while step < total:
        profiler.before(step + 1)
        state, step_metrics = step_fn(state, run.put_batch(next(batches)))
        step += 1
        profiler.after(step, step_metrics)
        progress.step_dispatched(step, step_metrics)
        is_last = step == total
        if step % config.eval.every == 0 or is_last:
          progress.flush()
          t_eval = time.time()
          result = run.evaluate(state.params, eval_data)
          progress.evaluated(step, result, seconds=time.time() - t_eval)
        if step % config.train.checkpoint_every == 0 or is_last:
          save(step)
        kind = stop.agreed(step)  # every process stops at this same step
        if kind == _StopRequest.LEASE_LOST:
          if lease is not None:
            lease.check()  # raises, naming the process that took over
          raise lease_lib.LeaseLost(f"process 0 lost the lease of {workdir}; stopped "
                                    "without saving")
        if kind and not is_last:
          save(step)
          requeue = kind == _StopRequest.REQUEUE
          print(f"{stop.signal or 'a stop request on another process'}: saved a checkpoint "
                f"at step {step}; run the same command to resume"
                + (f" (exit {cli.EXIT_REQUEUE}: requeue)" if requeue else ""), flush=True)
          break
      progress.flush()
  finally:
    # An exception (or a second Ctrl-C) must not drop a save already under way.
    profiler.close()
    checkpoint.wait(mngr)
    writer.flush()
  if lead:
    checkpoint.write_manifests(mngr)
  peak = device_stats.device_peak_bytes()
  if peak is not None:
    writer.write(step, {"memory/device_peak_bytes": peak})
  writer.close()
  return {**progress.last, "step": step, "wall_time_s": time.time() - progress.t_start,
          "requeue": requeue}


# ----------------------------------------------------------------------------
# What the loop uses.


class _StopRequest:
  """Turns SIGTERM/SIGINT into 'finish this step, save, exit' (SIGUSR1: the
  same, then exit for a requeue), agreed by every process: a signal may reach
  one host of a job, or reach hosts at different steps, and a checkpoint is
  saved by all processes together. So every `check_every` steps the
  processes share what they know (a tiny all-gather), and all stop at the
  first such step after any of them was signalled, or after process 0 lost
  the workdir's lease (then without saving)."""

  STOP, REQUEUE, LEASE_LOST = 1, 2, 3  # the largest of the processes' wins

  def __init__(self, check_every: int, lease=None):
    self.signal = None
    self.check_every = check_every
    self.lease = lease
    self._old = {}

  def __enter__(self):
    if _EARLY_SIGNALS:
      self.signal = _EARLY_SIGNALS[0]
    for sig in (signal.SIGTERM, signal.SIGINT, signal.SIGUSR1):
      try:
        self._old[sig] = signal.signal(sig, self._handle)
      except ValueError:  # not the main thread: signals stay as they were
        pass
    return self

  def _handle(self, signum, frame):
    del frame
    name = signal.Signals(signum).name
    if self.signal is not None:
      # A second Ctrl-C stops now. A scheduler's SIGTERM may come twice at
      # once (SLURM signals the step's processes and srun passes it on too):
      # the save under way goes on.
      if name == "SIGINT":
        raise KeyboardInterrupt
      return
    self.signal = name

  def _mine(self) -> int:
    if self.lease is not None and self.lease.lost_to is not None:
      return self.LEASE_LOST
    if self.signal is None:
      return 0
    return self.REQUEUE if self.signal == "SIGUSR1" else self.STOP

  def agreed(self, step: int) -> int:
    """0, or why every process stops after `step` (STOP, REQUEUE or
    LEASE_LOST); called by all processes at every step."""
    if jax.process_count() == 1:
      return self._mine()
    if step % self.check_every:
      return 0
    kinds_P = multihost_utils.process_allgather(np.int32(self._mine()))
    return int(np.asarray(kinds_P).max())

  def __exit__(self, *exc):
    for sig, handler in self._old.items():
      signal.signal(sig, handler)


def _fmt_time(s: float) -> str:
  s = int(s)
  return f"{s // 3600}h{s % 3600 // 60:02d}m" if s >= 3600 else f"{s // 60}m{s % 60:02d}s"


class _Progress:
  """Step metrics, fetched one step late so logging never stalls the device;
  prints progress, writes metrics, and stops on a non-finite loss."""

  def __init__(self, config, workdir: str, writer: metrics.Writer, start: int,
               flops_per_step: float, hardware_flops_per_step: float, peak_flops: float,
               baselines: dict):
    self.config, self.workdir, self.writer = config, workdir, writer
    self.baselines = {f"eval/{k}": v for k, v in baselines.items()}
    self.total = config.train.steps
    self.tokens_per_step = config.data.batch_size * config.data.seq_len
    # Model FLOPs (MFU) count the model's work once; hardware FLOPs (HFU) add
    # what the step recomputes (rematerialised blocks, attention scores).
    self.flops_per_step = flops_per_step
    self.hardware_flops_per_step = hardware_flops_per_step
    self.peak_flops = peak_flops
    self.lr = jax.jit(optimizer.schedule(config.train))  # one compile, not one per op
    self.pending = None  # (step, metrics still on device)
    self.start, self.t_start = start, time.time()
    # The log window: its clock and the last step it has timed. Metrics are
    # fetched one step late, so when step k is reported (its metrics on the
    # host) steps t_log_step+1..k have run since t_log.
    self.t_log, self.t_log_step = self.t_start, start
    self.skipped = 0
    self.last: dict = {}

  def step_dispatched(self, step: int, device_metrics) -> None:
    if step == self.start + 1:  # the first call compiled; time from here on
      self.t_log = time.time()
    self.flush()
    self.pending = (step, device_metrics)

  def flush(self) -> None:
    if self.pending is not None:
      step, device_metrics = self.pending
      self.pending = None
      self._report(step, {k: float(v) for k, v in jax.device_get(device_metrics).items()})

  def _report(self, step: int, m: dict) -> None:
    train_cfg = self.config.train
    if not (math.isfinite(m["train/loss"]) and math.isfinite(m["train/grad_norm"])):
      if self.skipped < train_cfg.max_nonfinite_skips:
        self.skipped += 1
        print(f"warning: non-finite loss at step {step}; update skipped ({self.skipped} of "
              f"train.max_nonfinite_skips={train_cfg.max_nonfinite_skips})", flush=True)
        self.writer.write(step, {"train/nonfinite_skips": self.skipped})
        return
      raise TrainingError(
          f"loss is {m['train/loss']} (grad norm {m['train/grad_norm']}) at step {step}; "
          f"stopped without saving it. The last good checkpoint is kept in {self.workdir}/"
          "checkpoints. Try a lower train.learning_rate, a longer train.warmup_steps or a "
          "smaller train.grad_clip; train.max_nonfinite_skips=N skips up to N bad steps.")
    if step % train_cfg.log_every and step != self.total:
      return
    now = time.time()
    dt = max(now - self.t_log, 1e-9) / (step - self.t_log_step)
    m.update({"train/learning_rate": float(self.lr(step - 1)), "train/step_time_s": dt,
              "train/tokens_per_s": self.tokens_per_step / dt,
              "train/mfu": self.flops_per_step / dt / self.peak_flops,
              "train/hfu": self.hardware_flops_per_step / dt / self.peak_flops})
    self.writer.write(step, m)
    self.last.update(m)
    print(f"step {step}/{self.total} | loss {m['train/loss']:.4f} | "
          f"{m['train/tokens_per_s']:,.0f} tok/s | MFU {m['train/mfu']:.1%} | {dt:.3f} s/step | "
          f"ETA {_fmt_time(dt * (self.total - step))}", flush=True)
    self.t_log, self.t_log_step = now, step

  def evaluated(self, step: int, result: dict, seconds: float = 0.0) -> None:
    """Logs an evaluation that took `seconds`; the last one also gives the
    compressors' bits per byte on the same text, so a reader can place the
    model."""
    last = step == self.total
    if last:
      result = {**result, **self.baselines}
    self.writer.write(step, result)
    self.last.update(result)
    print(f"eval at step {step} ({self.config.eval.split}): loss {result['eval/loss']:.4f} | "
          f"perplexity {result['eval/perplexity']:.3f} | "
          f"bits/byte {result['eval/bits_per_byte']:.4f}{metrics.groups_text(result)}", flush=True)
    if last:
      print(f"  the same text: gzip -9 {self.baselines['eval/gzip_bits_per_byte']:.4f}, "
            f"xz -9 {self.baselines['eval/xz_bits_per_byte']:.4f} bits/byte", flush=True)
    # Evaluation time is not training time: the log window's clock skips it
    # and keeps the steps it has counted.
    self.t_log += seconds


def _write_run_info(workdir, config, run: steps.Run, facts: dict) -> None:
  info = {"facts": facts, "config": config.to_dict(), "versions": provenance.versions(),
          "git_sha": provenance.git_sha(), "mesh": dict(run.mesh.shape),
          "devices": [str(d) for d in jax.devices()], "process_count": jax.process_count(),
          "tokens_per_step": config.data.batch_size * config.data.seq_len}
  storage.write_text(storage.join(workdir, "run_info.json"),
                     json.dumps(info, indent=2, default=str))


# ----------------------------------------------------------------------------
# Entry point.

def define_flags() -> None:
  """Flags of the `hiertx.train` command (defined only when it is the program)."""
  config_flags.DEFINE_config_file("config", None, "Config file (configs/*.py[:args]).",
                                  lock_config=True)
  flags.DEFINE_string("workdir", None, "Directory for checkpoints and metrics.")
  flags.DEFINE_bool("allow_config_change", False, "Resume even if the model/data config "
                    "differs from the run that wrote the workdir.")
  flags.DEFINE_bool("restart_from_scratch", False, "Train from step 0 when every checkpoint "
                    "of the workdir was set aside as unreadable (they are kept).")
  flags.mark_flags_as_required(["config", "workdir"])
  distributed.define_flags()


def main(argv):
  cli.start(argv)
  distributed.initialize_from_flags()
  f = flags.FLAGS
  cli.log_to_workdir(f.workdir, "train")
  out = cli.run(train_and_evaluate, f.config, f.workdir, f.allow_config_change,
                f.restart_from_scratch)
  print(f"done: step {out['step']} in {_fmt_time(out['wall_time_s'])}", flush=True)
  if out["requeue"]:
    sys.exit(cli.EXIT_REQUEUE)


def run() -> None:
  """The `hiertx-train` console script."""
  cli.command(define_flags, main)


if __name__ == "__main__":
  run()
