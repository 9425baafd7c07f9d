"""Sharded training on 8 simulated devices equals 1 device; checkpoints move
between meshes; bad meshes fail before compiling."""

import os
import signal
import subprocess
import sys
import time

import jax
import numpy as np
import pytest
from jax.sharding import PartitionSpec as P

from conftest import ROOT, one_device_env
from hiertx import config as config_lib
from hiertx import data, evaluate, metrics, models, sharding, steps, train
from hiertx.errors import ConfigError

MESHES = {"fsdp8": dict(data=1, fsdp=8, tensor=1), "d2f2t2": dict(data=2, fsdp=2, tensor=2)}


def _losses(config, devices, initial=None, n_steps=2):
  """Losses of `n_steps` training steps, the state after them and the state
  they started from (on the host). `initial` (host arrays) is put on the
  run's shardings; without it the run initialises its own."""
  run = steps.build_run(config, devices)
  if initial is None:
    state = run.init(jax.random.PRNGKey(0))
  else:
    state = jax.device_put(initial, run.state_shardings)
  start = jax.device_get(state)  # the step donates its state
  batches = data.train_batches(config_lib.resolved(config).data, config.data.batch_size)
  out = []
  for _ in range(n_steps):
    state, m = run.train_step(state, run.put_batch(next(batches)))
    out.append(float(m["train/loss"]))
  return out, state, start


# Every model on the mesh that uses all three axes; vanilla on fsdp alone too,
# and only vanilla initialises on the meshes (the sharded init compiles as long
# as the step): the others start from the one-device parameters.
ALL_MESHES = ("vanilla",)


@pytest.mark.parametrize("name", sorted(models.MODELS))
def test_sharded_training_matches_one_device(name, tiny_config):
  scan = name == "vanilla"  # vanilla with scanned blocks (stacked parameters)
  single, _, initial = _losses(tiny_config(name, mesh__data=1, model__scan_layers=scan),
                               jax.devices()[:1])
  for mesh_name, mesh in MESHES.items():
    if name not in ALL_MESHES and mesh_name != "d2f2t2":
      continue
    config = tiny_config(name, model__scan_layers=scan)
    config.mesh.update(mesh)
    got, state, start = _losses(config, jax.devices(),
                                initial=None if name in ALL_MESHES else initial)
    # The same parameters whatever the mesh (the PRNG is partitionable).
    jax.tree.map(np.testing.assert_array_equal, start, initial)
    # Different reduction orders across devices: equal to float32 round-off.
    np.testing.assert_allclose(got, single, rtol=2e-5, err_msg=f"{name} on {mesh_name}")
    if mesh_name == "fsdp8":
      table = state.params["embed"]["token"]
      assert table.sharding.spec == P("tensor", "fsdp")
      assert {s.data.shape for s in table.addressable_shards} == {(384, 32 // 8)}
      if name == "vanilla":  # scanned blocks: the stacking axis is not sharded
        wi = state.params["blocks"]["blocks"]["block"]["mlp"]["wi"]["kernel"]
        assert wi.sharding.spec == P(None, "fsdp", "tensor") and wi.shape[0] == 2
    if mesh_name == "d2f2t2":
      wi = state.params["head"]["logits"]["kernel"]  # (embed, vocab)
      assert wi.sharding.spec == P("fsdp", "tensor")
      assert {s.data.shape for s in wi.addressable_shards} == {(16, 192)}


def test_bad_meshes_fail_before_compiling(tiny_config, tmp_path):
  for mesh, match in [(dict(data=3), "needs 3 devices but 8"),
                      (dict(data=-1, fsdp=3), "does not divide the 8"),
                      (dict(data=-1, fsdp=-1), "at most one axis may be -1"),
                      (dict(data=0), "mesh.data")]:
    config = tiny_config("vanilla")
    config.mesh.update(mesh)
    with pytest.raises(ConfigError, match=match):
      train.train_and_evaluate(config, str(tmp_path))
  config = tiny_config("vanilla", eval__batch_size=4)
  with pytest.raises(ConfigError, match="eval.batch_size"):
    steps.build_run(config)


@pytest.mark.parametrize("case", ["heads", "embed", "mlp", "coarse length"])
def test_a_mesh_that_misfits_a_dimension_is_one_config_line_before_compiling(tiny_config, case):
  """Each kind of misfit (a parameter's heads, width under fsdp, MLP width; a
  coarse scale's length under `length` sharding) is one `config.mesh.<axis>`
  line naming the dimension, with meshes that fit, before anything compiles;
  the meshes it offers build."""
  name, mesh, model, expect = {
      "heads": ("vanilla", dict(data=1, tensor=8), {}, r"mesh.tensor: .*'heads' .*\(2\) into 8"),
      "embed": ("vanilla", dict(data=1, fsdp=8), dict(d_model=36, num_heads=2),
                r"mesh.fsdp: .*'embed' .*\(36\) into 8"),
      "mlp": ("vanilla", dict(data=4, tensor=2), dict(mlp_dim=65),
              r"mesh.tensor: .*'mlp' .*\(65\) into 2"),
      "coarse length": ("hourglass", dict(data=1, tensor=8), dict(d_model=64, num_heads=8),
                        r"mesh.tensor: .*'length' of an activation \[12, 64\] per row"),
  }[case]
  config = tiny_config(name)
  config.model.update(model)
  config.mesh.update(dict(dict(data=1, fsdp=1, tensor=1), **mesh))
  if case == "coarse length":  # hourglass tiny at 48 tokens: scales of 48, 24 and 12
    config.data.seq_len = 48
    config.sharding.rules = tuple((n, "tensor" if n == "length" else ax)
                                  for n, ax in config.sharding.rules)
  compiled = []
  with pytest.MonkeyPatch.context() as mp:
    mp.setattr(jax.stages.Lowered, "compile", lambda *a, **k: compiled.append(1))
    with pytest.raises(ConfigError, match=expect) as e:
      steps.build_run(config, check_data=False)
  assert not compiled and "\n" not in str(e.value)
  assert "meshes of 8 devices that fit" in str(e.value)
  offered = str(e.value).split("that fit: ")[1].split("; or make")[0].split("; ")
  for flags_text in offered:
    fit = {f.split("=")[0].split(".")[-1]: int(f.split("=")[1]) for f in flags_text.split()}
    config.mesh.update(fit)
    steps.build_run(config, check_data=False)  # no error: the offered mesh fits


def test_tensor_parallel_alone_matches_one_device(tiny_config):
  """All 8 devices on the tensor axis (8 heads): the one-device losses."""
  config = tiny_config("vanilla", model__num_heads=8, model__d_model=64, model__mlp_dim=128)
  single, _, initial = _losses(tiny_config("vanilla", mesh__data=1, model__num_heads=8,
                                           model__d_model=64, model__mlp_dim=128),
                               jax.devices()[:1], n_steps=1)
  config.mesh.update(dict(data=1, fsdp=1, tensor=8))
  got, state, _ = _losses(config, jax.devices(), initial=initial, n_steps=1)
  np.testing.assert_allclose(got, single, rtol=2e-5)
  assert state.params["blocks"]["block_0"]["attn"]["query"].sharding.spec[1] == "tensor"


def test_checkpoint_restores_onto_other_meshes(tiny_config, tmp_path):
  """Saved on fsdp8, restored on data2 x fsdp4 and on one device. Restoring
  reads the parameter tree's shapes and the target mesh, whatever the model,
  so vanilla (the quickest to compile) stands for all."""
  config = tiny_config("vanilla", train__steps=10, eval__every=10)
  config.mesh.update(MESHES["fsdp8"])
  workdir = str(tmp_path / "fsdp8")
  train.train_and_evaluate(config, workdir)
  logged = [r["eval/loss"] for r in metrics.read_jsonl(os.path.join(workdir, "metrics.jsonl"))
            if "eval/loss" in r][-1]
  on_2x4 = evaluate.evaluate_checkpoint(workdir, mesh="data=2,fsdp=4")
  assert on_2x4["eval/loss"] == pytest.approx(logged, rel=1e-5)
  # One device, in a fresh process that has only one.
  env = one_device_env()
  r = subprocess.run([sys.executable, "-m", "hiertx.evaluate", f"--workdir={workdir}"],
                     cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
  assert r.returncode == 0, r.stderr[-2000:]
  assert f"loss {logged:.4f}" in r.stdout


def test_mesh_shape_resolution():
  assert sharding.mesh_shape(dict(data=-1, fsdp=2, tensor=1), 8) == (4, 2, 1)
  assert sharding.mesh_shape(dict(data=2, fsdp=2, tensor=-1), 8) == (2, 2, 2)


def test_a_signal_to_one_process_stops_every_process_at_the_same_step(tiny_config, tmp_path):
  """Two real processes of one CPU device each (jax.distributed), SIGTERM to
  process 1 only: both save the same step and exit 0; the rerun resumes and
  ends with the losses of an uninterrupted one-process run; the two-process
  checkpoint evaluates in one process to the loss the run logged.

  The first part runs with the `tensor` axis across the two processes (no
  batch axis spans them, so both feed the whole global batch), the resumed
  part with `data` across them (each feeds its half): rows follow the
  devices' places along the batch axes, and both give the one-process
  losses."""
  import multiprocess  # a launcher script, not a package

  workdir = str(tmp_path / "mp")
  os.makedirs(workdir)
  common = ["--config.train.steps=60", "--config.train.log_every=1",
            "--config.train.checkpoint_every=100", "--config.eval.every=100",
            "--config.train.stop_check_every=4"]
  overrides = [*common, "--config.mesh.data=1", "--config.mesh.tensor=2"]
  procs = multiprocess.commands("configs/vanilla.py:size=tiny", workdir, overrides, 2, 1,
                                multiprocess.free_port())
  logs = [open(os.path.join(workdir, f"process_{i}.log"), "w") for i in range(2)]
  running = [subprocess.Popen(args, env={**os.environ, **env}, cwd=ROOT, stdout=log,
                              stderr=subprocess.STDOUT) for (env, args), log in zip(procs, logs)]
  log0 = os.path.join(workdir, "process_0.log")
  deadline = time.time() + 300
  while "step 6/60" not in open(log0).read():
    assert time.time() < deadline and running[0].poll() is None, open(log0).read()[-2000:]
    time.sleep(0.2)
  running[1].send_signal(signal.SIGTERM)
  codes = [p.wait(timeout=180) for p in running]
  for log in logs:
    log.close()
  texts = [open(os.path.join(workdir, f"process_{i}.log")).read() for i in range(2)]
  assert codes == [0, 0], [t[-1500:] for t in texts]
  saved = [int(t.split("saved a checkpoint at step ")[1].split(";")[0]) for t in texts]
  assert saved[0] == saved[1] and saved[0] % 4 == 0 and 6 <= saved[0] < 60, saved
  assert "SIGTERM" in texts[1] and "a stop request on another process" in texts[0]
  r = subprocess.run([sys.executable, "launch/multiprocess.py", "--num_processes=2",
                      "--devices_per_process=1", "--config=configs/vanilla.py:size=tiny",
                      f"--workdir={workdir}", "--", *common, "--config.mesh.data=2",
                      "--config.mesh.tensor=1"], cwd=ROOT, capture_output=True,
                     text=True, timeout=600)
  assert r.returncode == 0 and f"resumed at step {saved[0]}" in r.stdout, r.stdout[-2000:]
  config = tiny_config("vanilla", train__steps=60, train__log_every=1,
                       train__checkpoint_every=100, eval__every=100)
  single = str(tmp_path / "single")
  train.train_and_evaluate(config, single)
  loss = lambda wd: {r["step"]: r["train/loss"] for r in metrics.read_jsonl(
      os.path.join(wd, "metrics.jsonl")) if "train/loss" in r}
  resumed, straight = loss(workdir), loss(single)
  assert sorted(resumed) == list(range(1, 61))
  np.testing.assert_allclose([resumed[s] for s in range(1, 61)],
                             [straight[s] for s in range(1, 61)], rtol=2e-5)
  rows = metrics.read_jsonl(os.path.join(workdir, "metrics.jsonl"))
  assert rows[0]["memory/xla_peak_bytes"] > 0
  restored = evaluate.evaluate_checkpoint(workdir)
  assert restored["eval/loss"] == pytest.approx(
      [r["eval/loss"] for r in rows if "eval/loss" in r][-1], rel=1e-5)


def test_row_blocks_follow_the_devices_place_along_the_batch_axes():
  mesh = sharding.make_mesh(dict(data=4, fsdp=1, tensor=2))
  assert sharding.process_batch_slice(mesh) == (0, 1)  # this process holds every row
  with pytest.raises(ConfigError, match="process 3 has no device in the mesh"):
    sharding.process_batch_slice(mesh, process_index=3)
