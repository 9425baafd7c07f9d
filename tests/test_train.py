"""The trainer end to end on the built-in corpus: metrics, resume, evaluation."""

import json
import os

import jax
import jax.numpy as jnp
import numpy as np
import orbax.checkpoint as ocp
import pytest

from conftest import config_path
from hiertx import baselines, checkpoint, data, evaluate, metrics, optimizer, steps, train
from hiertx import config as config_lib
from hiertx.errors import CheckpointError, ConfigError, FlagError


def _final_params(workdir):
  mngr = checkpoint.manager(workdir)
  params = mngr.restore(mngr.latest_step(), args=ocp.args.Composite(
      params=ocp.args.StandardRestore()))["params"]
  mngr.close()
  return params


@pytest.fixture(scope="module")
def vanilla_run(tmp_path_factory):
  """One uninterrupted tiny vanilla run shared by several tests."""
  config = config_lib.load(config_path("vanilla") + ":size=tiny")
  workdir = str(tmp_path_factory.mktemp("vanilla"))
  out = train.train_and_evaluate(config, workdir)
  return config, workdir, out


def test_training_writes_the_metrics_design_asks_for(vanilla_run):
  config, workdir, out = vanilla_run
  rows = metrics.read_jsonl(os.path.join(workdir, "metrics.jsonl"))
  once = rows[0]
  # XLA's arguments, counted by hand: parameters and Adam's two moments in
  # float32, three int32 counters (the step, Adam's and the schedule's), and
  # this device's row of the five int32 batch arrays (8 rows over 8 devices,
  # 64 tokens); the state is donated, so all of it is aliased.
  state_bytes = 3 * 4 * once["params/total"] + 3 * 4
  assert once["memory/xla_argument_bytes"] == state_bytes + 5 * 4 * 64
  assert once["memory/xla_alias_bytes"] == state_bytes
  assert once["memory/xla_peak_bytes"] > once["memory/xla_argument_bytes"]
  # Forward + backward is at least 6 FLOPs per matmul parameter per token.
  matmul_params = once["params/total"] - once["params/embed"]
  assert once["flops/step_analytic"] > 6 * matmul_params * 8 * 64
  assert once["params/analytic"] == once["params/total"]
  # Matmuls only: at width 32 XLA's elementwise FLOPs are a larger share
  # (tests/test_cost.py holds the 15% bound at the shipped sizes).
  assert 0.7 < once["flops/step_analytic"] / once["flops/step_xla"] < 1.0
  assert once["memory/analytic_peak_bytes"] > once["memory/analytic_state_bytes"] > 0
  assert once["mfu/peak_flops_per_s"] > 1e9
  assert "memory/device_peak_bytes" not in {k for r in rows for k in r}  # CPU has no stats
  train_rows = [r for r in rows if "train/loss" in r]
  assert [r["step"] for r in train_rows] == [5, 10, 15, 20]
  for r in train_rows:
    assert r["train/tokens_per_s"] > 0 and r["train/step_time_s"] > 0
    assert r["train/mfu"] == pytest.approx(
        once["flops/step_model"] / r["train/step_time_s"] / once["mfu/peak_flops_per_s"])
    # Hardware FLOPs add the scores blockwise attention's backward recomputes.
    assert r["train/hfu"] == pytest.approx(
        once["flops/step_analytic"] / r["train/step_time_s"] / once["mfu/peak_flops_per_s"])
    assert r["train/hfu"] > r["train/mfu"]
    assert r["train/grad_norm"] > 0 and 0 < r["train/learning_rate"] <= config.train.learning_rate
  assert train_rows[-1]["train/loss"] < train_rows[0]["train/loss"] - 0.5
  evals = [r for r in rows if "eval/loss" in r]
  assert [r["step"] for r in evals] == [10, 20]
  for r in evals:
    assert np.isclose(r["eval/perplexity"], np.exp(r["eval/loss"]))
    # Byte vocabulary: bits per byte is bits per token, scaled by tokens per byte (EOS aside).
    assert 0.9 < r["eval/bits_per_byte"] / (r["eval/loss"] / np.log(2)) < 1.1
  assert evals[-1]["eval/loss"] < evals[0]["eval/loss"]
  # TensorBoard reads the same scalars from the event file.
  from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
  events = EventAccumulator(os.path.join(workdir, "tensorboard"))
  events.Reload()
  scalars = events.Scalars("eval/loss")
  assert [e.step for e in scalars] == [10, 20]
  assert [e.value for e in scalars] == pytest.approx([r["eval/loss"] for r in evals])
  info = json.load(open(os.path.join(workdir, "run_info.json")))
  assert info["config"]["model"]["name"] == "vanilla" and info["mesh"]["data"] == 8
  # What every attention site ran (printed at start-up): both layers, one line.
  assert info["facts"]["attention/sites"] == (
      f"blocks/block_{{0..1}}/attn: {config.data.seq_len} queries x {config.data.seq_len} keys "
      "-> blockwise [x2]")
  assert json.load(open(os.path.join(workdir, "config.json")))["train"]["steps"] == 20
  assert out["step"] == 20


def test_evaluate_reproduces_the_logged_eval_loss(vanilla_run):
  _, workdir, _ = vanilla_run
  logged = {r["step"]: r["eval/loss"] for r in metrics.read_jsonl(
      os.path.join(workdir, "metrics.jsonl")) if "eval/loss" in r}
  for step in (10, 20):
    result = evaluate.evaluate_checkpoint(workdir, step=step)
    assert result["eval/loss"] == pytest.approx(logged[step], rel=1e-6)
  assert os.path.exists(os.path.join(workdir, "eval_validation_10.json"))
  test = evaluate.evaluate_checkpoint(workdir, split="test")
  assert test["step"] == 20 and np.isfinite(test["eval/loss"])
  with pytest.raises(CheckpointError, match="no checkpoint at step 7"):
    evaluate.evaluate_checkpoint(workdir, step=7)
  with pytest.raises(ConfigError, match="eval.batches: must be a positive integer, got 0"):
    evaluate.evaluate_checkpoint(workdir, batches=0)  # would score nothing, 0 bits/byte


def test_crash_and_resume_ends_with_the_same_parameters(vanilla_run, tmp_path, monkeypatch):
  config, ref_workdir, _ = vanilla_run
  workdir = str(tmp_path / "resumed")
  real = train.data.train_batches

  def crashing(*args, **kwargs):  # dies while fetching the batch of step 14
    for i, batch in enumerate(real(*args, **kwargs)):
      if args[2] + i == 13:
        raise KeyboardInterrupt("simulated kill")
      yield batch

  monkeypatch.setattr(train.data, "train_batches", crashing)
  with pytest.raises(KeyboardInterrupt):
    train.train_and_evaluate(config, workdir)
  assert checkpoint.manager(workdir).latest_step() == 10
  monkeypatch.setattr(train.data, "train_batches", real)
  out = train.train_and_evaluate(config, workdir)
  assert out["step"] == 20
  ref, got = _final_params(ref_workdir), _final_params(workdir)
  jax.tree_util.tree_map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-6, atol=1e-7),
                         ref, got)
  # The losses logged after the resume match the uninterrupted run's.
  loss = lambda wd: {r["step"]: r["train/loss"] for r in metrics.read_jsonl(
      os.path.join(wd, "metrics.jsonl")) if "train/loss" in r}
  assert loss(workdir)[20] == pytest.approx(loss(ref_workdir)[20], rel=1e-6)


def test_incompatible_workdir_is_refused(vanilla_run):
  config, workdir, _ = vanilla_run
  other = config.copy_and_resolve_references()
  other.unlock()
  other.model.num_layers = 3
  with pytest.raises(CheckpointError, match=r"model.num_layers: 2 -> 3"):
    train.train_and_evaluate(other, workdir)


def test_bad_batch_for_the_mesh_fails_before_compiling(tiny_config, tmp_path):
  config = tiny_config("vanilla", data__batch_size=12)
  with pytest.raises(ConfigError, match="data.batch_size.*data-parallel size 8"):
    train.train_and_evaluate(config, str(tmp_path))
  assert not os.path.exists(tmp_path / "checkpoints")


def test_weight_decay_skips_layer_norms_of_scanned_blocks():
  params = {"blocks": {"blocks": {"block": {
      "ln_attn": {"scale": jnp.ones((3, 8)), "bias": jnp.zeros((3, 8))},
      "mlp": {"wi": {"kernel": jnp.ones((3, 8, 16))}}}}},
      "embed": {"position": jnp.ones((4, 8)), "token": jnp.ones((5, 8))}}
  mask = optimizer._decay_mask(params)
  block = mask["blocks"]["blocks"]["block"]
  assert not block["ln_attn"]["scale"] and not block["ln_attn"]["bias"]
  assert block["mlp"]["wi"]["kernel"] and mask["embed"]["token"]
  assert not mask["embed"]["position"]


def test_whole_document_evaluation_scores_every_byte_once(vanilla_run):
  """Windows of the training length advancing by it are the pieces of unpacked
  rows: the same number as row-based evaluation of the whole split. With more
  context than stride, every token is still scored exactly once."""
  config, workdir, _ = vanilla_run
  seq = config.data.seq_len
  # 64 windows a batch, not the run's 8: the whole split is 2,000+ windows.
  docs = evaluate.evaluate_documents(workdir, "validation", seq, seq, batch_size=64)
  cfg, run, _, params = steps.load_params(workdir)
  cfg.data.pack, cfg.data.align = False, 1
  rows = run.evaluate(params, data.eval_batches(cfg.data, "validation", 64, 10**6))
  assert docs["eval/tokens"] == rows["eval/tokens"] > 1000
  assert docs["eval/loss"] == pytest.approx(rows["eval/loss"], rel=1e-5)
  assert docs["eval/bits_per_byte"] == pytest.approx(rows["eval/bits_per_byte"], rel=1e-5)
  longer = evaluate.evaluate_documents(workdir, "validation", 2 * seq, seq // 2, batch_size=64)
  assert longer["eval/tokens"] == docs["eval/tokens"] and longer["eval/bytes"] == docs[
      "eval/bytes"]
  assert longer["eval/loss"] < docs["eval/loss"]  # more context, lower loss
  assert 0 < longer["gzip_bits_per_byte"] < 8 and 0 < longer["xz_bits_per_byte"] < 8
  assert os.path.exists(os.path.join(workdir, f"eval_validation_20_ctx{2 * seq}_stride"
                                     f"{seq // 2}.json"))
  with pytest.raises(FlagError, match="--batch_size: must be a positive multiple of the mesh's "
                     "8-way"):
    evaluate.evaluate_documents(workdir, "validation", seq, seq, batch_size=12)


def test_windows_cover_each_document_once_with_bounded_context():
  lengths = [1, 5, 64, 65, 200]
  for context, stride in ((64, 64), (128, 32), (10, 3)):
    plan = evaluate.windows(lengths, context, stride)
    for d, n in enumerate(lengths):
      spans = sorted((lo, hi) for doc, _, lo, hi in plan if doc == d)
      assert [lo for lo, _ in spans] == list(range(0, n, stride))
      assert all(a[1] == b[0] for a, b in zip(spans, spans[1:])) and spans[-1][1] == n
    for _, start, lo, hi in plan:
      assert hi - start <= context and start == max(0, lo - (context - stride))


def test_compressor_baselines():
  text = b"the quick brown fox jumps over the lazy dog\n" * 200
  repetitive = baselines.compressor_bits_per_byte(text)
  noise = baselines.compressor_bits_per_byte(np.random.default_rng(0).bytes(8800))
  assert repetitive["gzip_bits_per_byte"] < 0.5 and repetitive["xz_bits_per_byte"] < 0.5
  assert noise["gzip_bits_per_byte"] > 7.9 and noise["xz_bits_per_byte"] > 7.9


def test_throughput_leaves_out_evaluation_time(tiny_config, monkeypatch, tmp_path):
  """eval.every (3) is not a multiple of train.log_every (4): the logged step
  time counts the four steps of the window and none of the evaluation's time
  (one second per step on a fake clock, a 100-second evaluation at step 3).
  Every step of a run logged at each step, the last one included (fetched
  right after the one before it was logged), times one second."""
  config = tiny_config("vanilla", train__log_every=4, eval__every=3, train__steps=8)
  clock = [0.0]
  monkeypatch.setattr(train.time, "time", lambda: clock[0])

  def progress_of(config):
    return train._Progress(config, str(tmp_path), metrics.Writer(str(tmp_path), active=False),
                           0, 1e9, 2e9, 1e12, {})

  step_metrics = {"train/loss": 1.0, "train/grad_norm": 1.0}
  progress = progress_of(config)
  for step in range(1, 6):
    clock[0] += 1.0
    progress.step_dispatched(step, step_metrics)
    if step == 3:
      progress.flush()
      clock[0] += 100.0
      progress.evaluated(step, {"eval/loss": 1.0, "eval/perplexity": 2.7,
                                "eval/bits_per_byte": 1.4}, seconds=100.0)
  assert progress.last["train/step_time_s"] == pytest.approx(1.0)
  assert progress.last["train/tokens_per_s"] == pytest.approx(
      config.data.batch_size * config.data.seq_len)

  config = tiny_config("vanilla", train__log_every=1, train__steps=4)
  progress, times = progress_of(config), {}
  progress.writer.write = lambda step, m: times.setdefault(step, m.get("train/step_time_s"))
  for step in range(1, 5):
    clock[0] += 1.0
    progress.step_dispatched(step, step_metrics)
  clock[0] += 1.0  # the last step runs while the loop waits for its metrics
  progress.flush()
  assert times == {1: pytest.approx(1.0), 2: pytest.approx(1.0), 3: pytest.approx(1.0),
                   4: pytest.approx(1.0)}
