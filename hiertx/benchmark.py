"""Building blocks of the measurement scripts in experiments/: configs at a
chosen shape, a compiled train step with its facts, and timed steps on
synthetic batches (no data pipeline, so only the model is measured)."""

import os
import statistics
import time

import jax
import numpy as np

from hiertx import config as config_lib
from hiertx import steps

CONFIG_DIR = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))),
                          "configs")


def config_for(spec: str, seq_len: int, batch: int, sets=()):
  """`configs/x.py[:arg]` (or a bare file name under configs/) at a given shape."""
  path, _, arg = spec.partition(":")
  if not os.path.exists(path):
    path = os.path.join(CONFIG_DIR, path)
  config = config_lib.load(path + (f":{arg}" if arg else ""))
  config.data.seq_len = seq_len
  config.data.batch_size = batch
  config.eval.batch_size = batch
  config.model.max_len = max(config.model.max_len, seq_len)
  for s in sets:
    config_lib.apply_override(config, s)
  return config


def compile_step(config, devices=None):
  """(run, compiled train step, facts: XLA and analytic memory/FLOPs)."""
  run = steps.build_run(config, devices)
  compiled, facts = steps.compile_train_step(run, config)
  facts["params/total"] = sum(x.size for x in jax.tree_util.tree_leaves(
      run.abstract_state.params))
  return run, compiled, facts


def synthetic_batch(config, seed: int = 0) -> dict:
  """Random tokens in one document per row, shaped like a training batch."""
  rng = np.random.default_rng(seed)
  b, t = config.data.batch_size, config.data.seq_len
  tokens = rng.integers(1, 256, (b, t + 1), dtype=np.int32)
  return {"inputs": tokens[:, :-1], "targets": tokens[:, 1:],
          "weights": np.ones((b, t), np.int32), "segment_ids": np.ones((b, t), np.int32),
          "positions": np.broadcast_to(np.arange(t, dtype=np.int32), (b, t)).copy()}


def time_steps(run, compiled, config, steps: int = 5, warmup: int = 1) -> float:
  """Median seconds per train step after `warmup` steps."""
  state = run.init(jax.random.PRNGKey(0))
  batch = run.put_batch(synthetic_batch(config))
  times = []
  for i in range(warmup + steps):
    t0 = time.perf_counter()
    state, m = compiled(state, batch)
    jax.block_until_ready(m)
    if i >= warmup:
      times.append(time.perf_counter() - t0)
  return statistics.median(times)
