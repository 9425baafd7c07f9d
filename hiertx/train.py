r"""Trains a hiertx model: `python -m hiertx.train --config=... --workdir=...`.

  python -m hiertx.train --config=configs/vanilla.py --workdir=/tmp/run
  python -m hiertx.train --config=configs/bottom_up.py:size=tiny \
      --config.train.steps=200 --workdir=/tmp/bu

Re-running the same command resumes from the newest checkpoint in the
workdir. SIGTERM / Ctrl-C finish the current step, save, and exit.
"""

import dataclasses
import functools
import json
import math
import os
import signal
import sys
import time
from typing import Any

import flax
import flax.linen as nn
import jax
import jax.numpy as jnp
import optax
from absl import app, flags, logging
from ml_collections import config_flags

from hiertx import checkpoint
from hiertx import config as config_lib
from hiertx import cost
from hiertx import data
from hiertx import distributed
from hiertx import metrics
from hiertx import models
from hiertx import optimizer
from hiertx import sharding
from hiertx import sweep
from hiertx import tasks
from hiertx.errors import ConfigError, HiertxError


class TrainingError(HiertxError):
  """Training cannot go on (e.g. a non-finite loss)."""


@flax.struct.dataclass
class TrainState:
  step: jax.Array
  params: Any
  opt_state: Any


# ----------------------------------------------------------------------------
# Pure step functions.


def token_nll(logits_BxTxV, targets_BxT):
  logp = jax.nn.log_softmax(logits_BxTxV.astype(jnp.float32), axis=-1)
  return -jnp.take_along_axis(logp, targets_BxT[..., None], axis=-1)[..., 0]


def apply_model(model, params, batch, deterministic=True, rngs=None):
  return model.apply({"params": params}, batch["inputs"], batch["segment_ids"],
                     batch["positions"], deterministic=deterministic, rngs=rngs)


def train_step(state: TrainState, batch, *, model, tx, seed: int, skip_nonfinite: bool = False):
  """One optimizer step; returns the new state and scalar metrics.

  With `skip_nonfinite`, a step whose loss or gradients are not finite leaves
  parameters and optimizer state unchanged (the step counter still advances).
  """
  rng = jax.random.fold_in(jax.random.PRNGKey(seed), state.step)

  def loss_fn(params):
    logits = apply_model(model, params, batch, deterministic=False, rngs={"dropout": rng})
    w = batch["weights"].astype(jnp.float32)
    return (token_nll(logits, batch["targets"]) * w).sum() / jnp.maximum(w.sum(), 1.0)

  loss, grads = jax.value_and_grad(loss_fn)(state.params)
  updates, opt_state = tx.update(grads, state.opt_state, state.params)
  params = optax.apply_updates(state.params, updates)
  grad_norm = optax.tree.norm(grads)
  if skip_nonfinite:
    ok = jnp.isfinite(loss) & jnp.isfinite(grad_norm)
    keep = lambda new, old: jax.tree_util.tree_map(  # noqa: E731
        lambda n, o: jnp.where(ok, n, o), new, old)
    params, opt_state = keep(params, state.params), keep(opt_state, state.opt_state)
  new = TrainState(step=state.step + 1, params=params, opt_state=opt_state)
  return new, {"train/loss": loss, "train/grad_norm": grad_norm}


def eval_step(params, batch, *, model, bytes_V):
  """Sums over a batch: nll (nats), scored tokens, and the bytes they stand for."""
  logits = apply_model(model, params, batch)
  w = batch["weights"].astype(jnp.float32)
  return {"nll": (token_nll(logits, batch["targets"]) * w).sum(),
          "tokens": w.sum(),
          "bytes": (bytes_V[batch["targets"]] * w).sum()}


def summarize_eval(sums: dict) -> dict:
  loss = sums["nll"] / max(sums["tokens"], 1.0)
  return {"eval/loss": loss, "eval/perplexity": math.exp(min(loss, 80.0)),
          "eval/bits_per_byte": sums["nll"] / (math.log(2) * max(sums["bytes"], 1.0)),
          "eval/tokens": sums["tokens"]}


# ----------------------------------------------------------------------------
# Building a run.


@dataclasses.dataclass(frozen=True)
class _InMesh:
  """A jitted function called (and lowered) under its mesh and logical axis rules."""

  fn: Any
  mesh: jax.sharding.Mesh
  rules: tuple

  def __call__(self, *args):
    with jax.sharding.set_mesh(self.mesh), nn.logical_axis_rules(self.rules):
      return self.fn(*args)

  def lower(self, *args):
    with jax.sharding.set_mesh(self.mesh), nn.logical_axis_rules(self.rules):
      return self.fn.lower(*args)


@dataclasses.dataclass
class Run:
  """Everything built from a config: the model, mesh, shardings and jitted steps."""

  config: Any
  mesh: jax.sharding.Mesh
  model: models.base.LanguageModel
  vocab: Any
  tx: optax.GradientTransformation
  state_shardings: Any
  abstract_state: Any  # ShapeDtypeStructs carrying shardings
  init: Any
  train_step: Any
  eval_step: Any

  def put_batch(self, batch: dict) -> dict:
    s = sharding.batch_sharding(self.mesh)
    return {k: jax.make_array_from_process_local_data(s, v) for k, v in batch.items()}

  def evaluate(self, params, batches) -> dict:
    sums = {"nll": 0.0, "tokens": 0.0, "bytes": 0.0}
    for b in batches:
      out = jax.device_get(self.eval_step(params, self.put_batch(b)))
      for k in sums:
        sums[k] += float(out[k])
    return summarize_eval(sums)


def build_run(config, devices=None) -> Run:
  """Validates the config and builds the sharded model and step functions.

  `devices` (default: all) lets tests and tools use part of the machine.
  """
  config_lib.validate(config)
  data.check_data(config.data)
  mesh = sharding.make_mesh(config.mesh, devices)
  par = sharding.batch_parallelism(mesh)
  for section in ("data", "eval"):
    if config[section].batch_size % par:
      raise ConfigError(f"{section}.batch_size", f"{config[section].batch_size} is not "
                        f"divisible by the data-parallel size {par} (mesh.data x mesh.fsdp)")
  vocab = tasks.vocabulary(config.data.vocab)
  model = models.build(config.model, vocab.vocab_size, config.data.seq_len)
  tx = optimizer.make(config.train)
  rules = sharding.rules(config.sharding)
  seq = config.data.seq_len

  def init_boxed(rng):
    tokens = jnp.zeros((1, seq), jnp.int32)
    params = model.init(rng, tokens)["params"]
    return TrainState(step=jnp.zeros((), jnp.int32), params=params, opt_state=tx.init(params))

  abstract_boxed = jax.eval_shape(init_boxed, jax.random.PRNGKey(0))
  state_shardings = sharding.logical_shardings(abstract_boxed, mesh, rules)
  abstract_state = jax.tree_util.tree_map(
      lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s),
      nn.unbox(abstract_boxed), state_shardings)
  replicated = jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec())
  batch_s = sharding.batch_sharding(mesh)

  def in_mesh(fn):
    # Tracing (first call or .lower) must see the mesh and the logical rules.
    return _InMesh(fn, mesh, rules)

  init = in_mesh(jax.jit(lambda rng: nn.unbox(init_boxed(rng)), out_shardings=state_shardings))
  step = in_mesh(jax.jit(functools.partial(train_step, model=model, tx=tx, seed=config.train.seed,
                                           skip_nonfinite=config.train.max_nonfinite_skips > 0),
                         in_shardings=(state_shardings, batch_s),
                         out_shardings=(state_shardings, replicated), donate_argnums=0))
  bytes_V = jnp.asarray(tasks.token_bytes(vocab), jnp.float32)
  evals = in_mesh(jax.jit(functools.partial(eval_step, model=model, bytes_V=bytes_V),
                          in_shardings=(state_shardings.params, batch_s),
                          out_shardings=replicated))
  return Run(config, mesh, model, vocab, tx, state_shardings, abstract_state, init, step, evals)


def batch_spec(config, run: Run) -> dict:
  shape = (config.data.batch_size, config.data.seq_len)
  s = sharding.batch_sharding(run.mesh)
  return {k: jax.ShapeDtypeStruct(shape, jnp.int32, sharding=s)
          for k in ("inputs", "targets", "weights", "segment_ids", "positions")}


def compile_train_step(run: Run, config):
  """Compiles the train step ahead of time (no device memory used).

  Returns the executable, which the loop then calls (so the step is compiled
  once), and the once-per-run numbers read from it.
  """
  compiled = run.train_step.lower(run.abstract_state, batch_spec(config, run)).compile()
  return compiled, compiled_facts(compiled, run)


def compiled_facts(compiled, run: Run) -> dict:
  """XLA memory analysis and FLOPs of a compiled train step, next to the
  analytic prediction (`hiertx.cost`) of both."""
  facts = metrics.xla_memory(compiled)
  flops = metrics.xla_flops(compiled)
  # XLA's cost analysis counts a loop body once, not once per iteration, so
  # its FLOPs are only meaningful for unrolled blocks.
  if flops is not None and not run.config.model.scan_layers:
    facts["flops/step_xla_per_device"] = flops  # one partition of the SPMD program
    facts["flops/step_xla"] = flops * run.mesh.size
  facts.update(cost.predict(run.config, run.vocab.vocab_size))
  return facts


# ----------------------------------------------------------------------------
# The loop.


class _StopRequest:
  """Turns SIGTERM/SIGINT into 'finish this step, save, exit'."""

  def __init__(self):
    self.signal = None
    self._old = {}

  def __enter__(self):
    for sig in (signal.SIGTERM, signal.SIGINT):
      try:
        self._old[sig] = signal.signal(sig, self._handle)
      except ValueError:  # not the main thread: signals stay as they were
        pass
    return self

  def _handle(self, signum, frame):
    del frame
    if self.signal is not None:  # second signal: stop now
      raise KeyboardInterrupt
    self.signal = signal.Signals(signum).name

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
               flops_per_step: float, peak_flops: float):
    self.config, self.workdir, self.writer = config, workdir, writer
    self.total = config.train.steps
    self.tokens_per_step = config.data.batch_size * config.data.seq_len
    self.flops_per_step = flops_per_step
    self.peak_flops = peak_flops
    self.lr = optimizer.schedule(config.train)
    self.pending = None  # (step, metrics still on device)
    self.start, self.t_start = start, time.time()
    self.t_log, self.steps_since_log = self.t_start, 0
    self.skipped = 0
    self.last: dict = {}

  def step_dispatched(self, step: int, device_metrics) -> None:
    self.steps_since_log += 1
    if step == self.start + 1:  # the first call compiled; time from here on
      self.t_log, self.steps_since_log = time.time(), 0
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
    if self.steps_since_log == 0:  # only the compiling first step so far
      self.steps_since_log, self.t_log = 1, self.t_start
    dt = (now - self.t_log) / self.steps_since_log
    m.update({"train/learning_rate": float(self.lr(step - 1)), "train/step_time_s": dt,
              "train/tokens_per_s": self.tokens_per_step / dt,
              "train/mfu": self.flops_per_step / dt / self.peak_flops})
    self.writer.write(step, m)
    self.last.update(m)
    print(f"step {step}/{self.total} | loss {m['train/loss']:.4f} | "
          f"{m['train/tokens_per_s']:,.0f} tok/s | MFU {m['train/mfu']:.1%} | {dt:.3f} s/step | "
          f"ETA {_fmt_time(dt * (self.total - step))}", flush=True)
    self.t_log, self.steps_since_log = now, 0

  def evaluated(self, step: int, result: dict) -> None:
    self.writer.write(step, result)
    self.last.update(result)
    print(f"eval at step {step} ({self.config.eval.split}): loss {result['eval/loss']:.4f} | "
          f"perplexity {result['eval/perplexity']:.3f} | "
          f"bits/byte {result['eval/bits_per_byte']:.4f}", flush=True)
    self.t_log = time.time()  # evaluation time is not training time


def _write_run_info(workdir, config, run: Run, facts: dict) -> None:
  info = {"facts": facts, "config": config.to_dict(), "versions": metrics.versions(),
          "git_sha": metrics.git_sha(), "mesh": dict(run.mesh.shape),
          "devices": [str(d) for d in jax.devices()], "process_count": jax.process_count(),
          "tokens_per_step": config.data.batch_size * config.data.seq_len}
  with open(os.path.join(workdir, "run_info.json"), "w") as f:
    json.dump(info, f, indent=2, default=str)


def train_and_evaluate(config, workdir: str, allow_config_change: bool = False) -> dict:
  """Trains to `config.train.steps`, resuming from `workdir`; returns last metrics.

  The run's state goes to `<workdir>/status.json` (running, finished,
  interrupted or failed with the error), which sweeps read to skip or resume.
  """
  lead = jax.process_index() == 0
  try:
    out = _train_and_evaluate(config, workdir, allow_config_change)
  except BaseException as e:
    if lead and os.path.isdir(workdir) and os.access(workdir, os.W_OK):
      sweep.write_status(workdir, "failed", error=f"{type(e).__name__}: {e}"[:2000],
                         time=time.time())
    raise
  if lead:
    state = "finished" if out["step"] >= config.train.steps else "interrupted"
    sweep.write_status(workdir, state, step=out["step"], time=time.time(),
                       wall_time_s=out["wall_time_s"])
  return out


def _train_and_evaluate(config, workdir: str, allow_config_change: bool) -> dict:
  run = build_run(config)
  lead = jax.process_index() == 0
  checkpoint.prepare_workdir(workdir, config, allow_config_change, write=lead)
  if lead:
    sweep.write_status(workdir, "running", pid=os.getpid(), time=time.time())
  mngr = checkpoint.manager(workdir, config.train.keep_checkpoints)
  writer = metrics.Writer(workdir, active=lead)
  total = config.train.steps

  start, state = checkpoint.restore_latest(mngr, run.abstract_state, set_aside=lead)
  if start is not None:
    logging.info("resumed from checkpoint at step %d in %s", start, workdir)
    print(f"resumed at step {start}", flush=True)
  else:
    start = 0
    state = run.init(jax.random.PRNGKey(config.train.seed))
  if start >= total:
    print(f"already trained to step {start} (train.steps={total}); nothing to do", flush=True)

  step_fn, facts = compile_train_step(run, config)
  facts.update(metrics.param_counts(state.params))
  peak, peak_source = metrics.peak_flops(config.model.dtype)
  facts["mfu/peak_flops_per_s"] = peak
  facts["mfu/peak_source"] = peak_source
  if lead:
    _write_run_info(workdir, config, run, facts)
  writer.write(start, {k: v for k, v in facts.items() if not isinstance(v, str)})
  print(f"model {config.model.name}: {facts['params/total']:,} params, XLA peak train-step "
        f"memory {facts.get('memory/xla_peak_bytes', 0) / 2**20:.1f} MiB (analytic "
        f"{facts['memory/analytic_peak_bytes'] / 2**20:.1f} MiB)", flush=True)

  shard = data.Shard(jax.process_index(), jax.process_count())
  batches = data.train_batches(config.data, config.data.batch_size, start, shard)
  eval_data = data.eval_batches(config.data, config.eval.split, config.eval.batch_size,
                                config.eval.batches, shard)
  progress = _Progress(config, workdir, writer, start, facts["flops/step_analytic"], peak)

  def save(step):
    progress.flush()  # a non-finite step must be caught before it is saved
    if mngr.latest_step() != step:
      checkpoint.save(mngr, step, state)

  step = start
  try:
    with _StopRequest() as stop:
      while step < total:
        state, step_metrics = step_fn(state, run.put_batch(next(batches)))
        step += 1
        progress.step_dispatched(step, step_metrics)
        is_last = step == total
        if step % config.eval.every == 0 or is_last:
          progress.flush()
          progress.evaluated(step, run.evaluate(state.params, eval_data))
        if step % config.train.checkpoint_every == 0 or is_last:
          save(step)
        if stop.signal and not is_last:
          save(step)
          print(f"{stop.signal}: saved a checkpoint at step {step}; run the same command "
                "to resume", flush=True)
          break
      progress.flush()
  finally:
    # An exception (or a second Ctrl-C) must not drop a save already under way.
    checkpoint.wait(mngr)
    writer.flush()
  peak = metrics.device_peak_bytes()
  if peak is not None:
    writer.write(step, {"memory/device_peak_bytes": peak})
  writer.close()
  mngr.close()
  return {**progress.last, "step": step, "wall_time_s": time.time() - progress.t_start}


# ----------------------------------------------------------------------------
# Entry point.

def define_flags() -> None:
  """Flags of the `hiertx.train` command (defined only when it is the program)."""
  config_flags.DEFINE_config_file("config", None, "Config file (configs/*.py[:args]).",
                                  lock_config=True)
  flags.DEFINE_string("workdir", None, "Directory for checkpoints and metrics.")
  flags.DEFINE_bool("allow_config_change", False, "Resume even if the model/data config "
                    "differs from the run that wrote the workdir.")
  flags.mark_flags_as_required(["config", "workdir"])
  distributed.define_flags()


def quiet_library_logs() -> None:
  """Library INFO logs (Orbax, JAX) drown the progress lines; --verbosity restores them."""
  if not flags.FLAGS["verbosity"].present:
    logging.set_verbosity(logging.WARNING)


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f"unexpected arguments: {argv[1:]}")
  quiet_library_logs()
  distributed.initialize_from_flags()
  try:
    f = flags.FLAGS
    out = train_and_evaluate(f.config, f.workdir, f.allow_config_change)
  except HiertxError as e:
    sys.exit(f"error: {e}")
  print(f"done: step {out['step']} in {_fmt_time(out['wall_time_s'])}", flush=True)


if __name__ == "__main__":
  define_flags()
  app.run(main)
