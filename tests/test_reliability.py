"""Faults injected on purpose: kills, corrupted checkpoints, NaNs, full disks,
bad workdirs and random config overrides. Nothing may be lost or crash."""

import errno
import os
import random
import shutil
import signal
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import orbax.checkpoint as ocp
import pytest

from conftest import ROOT, config_path, one_device_env
from hiertx import checkpoint, evaluate, generate, metrics, steps, train
from hiertx import config as config_lib
from hiertx.errors import CheckpointError, HiertxError

CLI_ARGS = ["--config=configs/vanilla.py:size=tiny", "--config.train.steps=40",
            "--config.train.log_every=1", "--config.train.checkpoint_every=10",
            "--config.eval.every=1000", "--config.model.positions=rotary"]


def _env():
  return one_device_env()


def _train_cli(workdir, **kw):
  return subprocess.run([sys.executable, "-m", "hiertx.train", f"--workdir={workdir}",
                         *CLI_ARGS], cwd=ROOT, env=_env(), capture_output=True, text=True,
                        timeout=300, **kw)


def _signal_at(workdir, step, sig):
  """Trains with CLI_ARGS and sends `sig` when step `step` is logged: (exit
  code, output after that line)."""
  proc = subprocess.Popen([sys.executable, "-m", "hiertx.train", f"--workdir={workdir}",
                           *CLI_ARGS], cwd=ROOT, env=_env(), stdout=subprocess.PIPE,
                          stderr=subprocess.STDOUT, text=True)
  for line in proc.stdout:
    if line.startswith(f"step {step}/"):
      proc.send_signal(sig)
      break
  rest = proc.stdout.read()
  return proc.wait(timeout=120), rest


def _losses(workdir):
  """Loss per step; a step redone after a kill keeps its last value."""
  return {r["step"]: r["train/loss"] for r in metrics.read_jsonl(
      os.path.join(workdir, "metrics.jsonl")) if "train/loss" in r}


@pytest.fixture(scope="module")
def straight(tmp_path_factory):
  workdir = str(tmp_path_factory.mktemp("straight"))
  assert _train_cli(workdir).returncode == 0
  return workdir


def test_sigterm_saves_and_the_rerun_matches_an_uninterrupted_run(straight, tmp_path):
  """A real `python -m hiertx.train` (with config overrides) gets SIGTERM
  mid-run: it saves where it stopped, and the rerun ends with the losses of
  the uninterrupted run."""
  saved_config = config_lib.from_json(open(os.path.join(straight, "config.json")).read())
  assert saved_config.model.positions == "rotary" and saved_config.train.steps == 40
  workdir = str(tmp_path / "stopped")
  code, rest = _signal_at(workdir, 12, signal.SIGTERM)
  assert code == 0, rest[-2000:]
  saved = checkpoint.manager(workdir).latest_step()
  assert 12 <= saved < 40 and f"SIGTERM: saved a checkpoint at step {saved}" in rest, rest
  r = _train_cli(workdir)
  assert r.returncode == 0 and f"resumed at step {saved}" in r.stdout
  assert "step 40/40" in r.stdout and "bits/byte" in r.stdout
  a, b = _losses(workdir), _losses(straight)
  assert sorted(a) == sorted(b) == list(range(1, 41))
  for step in a:
    assert a[step] == pytest.approx(b[step], rel=1e-6), step


def test_killed_run_resumes_to_the_same_losses(straight, tmp_path):
  """kill -9 mid-run (no chance to save): the rerun redoes the steps since the
  last checkpoint, with the same losses."""
  workdir = str(tmp_path / "killed")
  code, _ = _signal_at(workdir, 25, signal.SIGKILL)
  assert code == -signal.SIGKILL
  saved = checkpoint.manager(workdir).latest_step()
  assert saved in (10, 20)  # work since then is redone
  r = _train_cli(workdir)
  assert r.returncode == 0 and f"resumed at step {saved}" in r.stdout
  a, b = _losses(workdir), _losses(straight)
  assert sorted(a) == sorted(b) == list(range(1, 41))
  for step in a:
    assert a[step] == pytest.approx(b[step], rel=1e-6), step


def _copy(straight, tmp_path, name):

  workdir = str(tmp_path / name)
  shutil.copytree(straight, workdir)
  return workdir


def _truncate_all_files(step_dir):
  for root, _, files in os.walk(step_dir):
    for f in files:
      with open(os.path.join(root, f), "r+b") as fh:
        fh.truncate(0)


def test_corrupted_newest_checkpoint_falls_back_to_the_previous(straight, tmp_path):
  workdir = _copy(straight, tmp_path, "corrupt")
  newest = os.path.join(workdir, "checkpoints", "40")
  _truncate_all_files(newest)
  r = _train_cli(workdir)
  assert r.returncode == 0, r.stderr[-2000:]
  assert "the checkpoint at step 40 is damaged: hiertx_files.json: unreadable; " in r.stdout
  assert "resumed at step 30" in r.stdout
  assert os.path.isdir(newest + ".corrupt") and "Traceback" not in r.stdout + r.stderr
  assert _losses(workdir)[40] == pytest.approx(_losses(straight)[40], rel=1e-6)


def test_a_checkpoint_that_does_not_fit_is_an_error_not_corruption(straight, tmp_path):
  """A model change (here its width) is named and nothing is renamed or lost;
  the run does not start over."""
  workdir = _copy(straight, tmp_path, "mismatch")
  before = sorted(os.listdir(os.path.join(workdir, "checkpoints")))
  r = subprocess.run([sys.executable, "-m", "hiertx.train", f"--workdir={workdir}", *CLI_ARGS,
                      "--config.train.steps=50", "--config.model.d_model=48",
                      "--allow_config_change"], cwd=ROOT, env=_env(), capture_output=True,
                     text=True, timeout=300)
  assert r.returncode != 0
  message = r.stderr.strip().splitlines()[-1]
  assert message.startswith("error: the checkpoint at step 40") and "does not fit" in message
  assert "has shape (32, 2, 16) in the checkpoint and (48, 2, 24) here" in message
  assert "Traceback" not in r.stdout + r.stderr
  assert sorted(os.listdir(os.path.join(workdir, "checkpoints"))) == before
  assert max(_losses(workdir)) == 40  # nothing trained from step 0


def test_truncated_array_files_are_named_as_damage_in_one_line(straight, tmp_path):
  """Every array file of every checkpoint's parameters cut to 20 bytes: the
  manifests written at saving name each damaged file and its size, the
  checkpoints are set aside, and the terminal shows warnings and one error
  line; the library's tracebacks are in the run's log file."""
  workdir = _copy(straight, tmp_path, "truncated")
  shutil.rmtree(os.path.join(workdir, "logs"), ignore_errors=True)
  cut = {}
  for step in ("20", "30", "40"):
    d = os.path.join(workdir, "checkpoints", step, "params", "d")
    for name in os.listdir(d):
      cut[(step, name)] = os.path.getsize(os.path.join(d, name))
      with open(os.path.join(d, name), "r+b") as f:
        f.truncate(20)
  r = _train_cli(workdir)
  assert r.returncode == 1
  # One warning per checkpoint naming its damaged files (Orbax may write one
  # data file or several per checkpoint; the first three are named).
  warned = {step: [line for line in r.stdout.splitlines() if line.startswith(
      f"warning: the checkpoint at step {step} is damaged: ")] for step in ("20", "30", "40")}
  for step, lines in warned.items():
    assert len(lines) == 1 and lines[0].endswith(f"; set aside as {step}.corrupt"), lines
    files = sorted(name for s, name in cut if s == step)
    named = [name for name in files if f"params/d/{name}: 20 bytes, {cut[step, name]} when "
             "saved" in lines[0]]
    assert len(named) == min(3, len(files)), (lines[0], files)
  assert r.stderr.strip().splitlines() == [
      f"error: none of the checkpoints in {workdir}/checkpoints can be read (set aside: "
      "20.corrupt, 30.corrupt, 40.corrupt). The run does not start over on its own: pass "
      "--restart_from_scratch to train from step 0 (they are kept), or move them away."]
  assert "Traceback" not in r.stdout + r.stderr
  log = "".join(open(os.path.join(workdir, "logs", n)).read()
                for n in os.listdir(os.path.join(workdir, "logs")))
  assert "is not valid for value of size 20" in log and "Traceback" in log


def test_no_readable_checkpoint_stops_instead_of_starting_over(straight, tmp_path):
  """Every checkpoint damaged: the run stops and sets them aside; reruns (a
  cluster's requeue) keep refusing until told to start over, which keeps them."""
  workdir = _copy(straight, tmp_path, "all_corrupt")
  for step in ("20", "30", "40"):
    _truncate_all_files(os.path.join(workdir, "checkpoints", step))
  with pytest.raises(CheckpointError, match="none of the checkpoints .* can be read.*does not "
                     "start over.*--restart_from_scratch"):
    train.train_and_evaluate(_cli_config(), workdir)
  aside = ["20.corrupt", "30.corrupt", "40.corrupt"]
  assert sorted(os.listdir(os.path.join(workdir, "checkpoints"))) == aside
  for _ in range(2):
    with pytest.raises(CheckpointError, match=r"no readable checkpoint, only ones set aside as "
                       r"unreadable \(20.corrupt, 30.corrupt, 40.corrupt\).*"
                       r"--restart_from_scratch"):
      train.train_and_evaluate(_cli_config(), workdir)
    assert max(_losses(workdir)) == 40 and len(_losses(workdir)) == 40  # nothing trained
  config = _cli_config()
  config.train.steps = 3
  out = train.train_and_evaluate(config, workdir, restart_from_scratch=True)
  assert out["step"] == 3 and set(aside) <= set(os.listdir(os.path.join(workdir, "checkpoints")))


def test_a_fault_in_the_restore_code_renames_nothing(straight, tmp_path, monkeypatch):
  """Every checkpoint fails alike and no file is damaged: the code or the
  environment is at fault, so nothing is set aside and one clear error says so."""
  workdir = _copy(straight, tmp_path, "code_fault")
  run = steps.build_run(_cli_config())

  def broken(self, *a, **k):
    raise RuntimeError("injected: cannot build the restore plan\n  deep internal detail")

  monkeypatch.setattr(ocp.CheckpointManager, "restore", broken)
  mngr = checkpoint.manager(workdir)
  before = sorted(os.listdir(os.path.join(workdir, "checkpoints")))
  with pytest.raises(CheckpointError) as err:
    checkpoint.restore_latest(mngr, run.abstract_state, set_aside=True)
  mngr.close()
  message = str(err.value)
  assert "\n" not in message and "deep internal detail" not in message
  assert message.startswith("the checkpoint at step 40 cannot be read: RuntimeError: injected")
  assert "every checkpoint fails" in message and "nothing was renamed" in message
  assert sorted(os.listdir(os.path.join(workdir, "checkpoints"))) == before


def test_error_lines_leave_out_what_a_user_cannot_act_on():
  e = ValueError("Encountered error while reading array index: (a, b). See full TensorStore "
                 "details: <bound method pybind11_detail_function_record_v1_system_libstdcpp_"
                 "gxx_abi_1xxx of <tensorstore.Status>>\nmore")
  assert checkpoint._first_line(e) == "Encountered error while reading array index: (a, b)"


def _cli_config():
  """The config CLI_ARGS give."""
  config = config_lib.load(config_path("vanilla") + ":size=tiny")
  config.train.steps, config.train.log_every = 40, 1
  config.train.checkpoint_every, config.eval.every = 10, 1000
  config.model.positions = "rotary"
  return config


def test_transient_storage_errors_are_retried_then_reported(straight, tmp_path, monkeypatch):
  workdir = _copy(straight, tmp_path, "flaky")
  run = steps.build_run(_cli_config())
  real = ocp.CheckpointManager.restore
  failures = {"left": 2}

  def flaky(self, *a, **k):
    if failures["left"]:
      failures["left"] -= 1
      raise OSError(errno.EIO, "Input/output error")
    return real(self, *a, **k)

  monkeypatch.setattr(checkpoint.time, "sleep", lambda s: None)
  monkeypatch.setattr(ocp.CheckpointManager, "restore", flaky)
  mngr = checkpoint.manager(workdir)
  step, state = checkpoint.restore_latest(mngr, run.abstract_state, set_aside=True)
  assert step == 40 and int(state.step) == 40 and failures["left"] == 0
  failures["left"] = 10**6  # the storage stays down
  with pytest.raises(CheckpointError, match="failed 3 times with a storage error"):
    checkpoint.restore_latest(mngr, run.abstract_state, set_aside=True)
  mngr.close()
  assert not any(d.endswith(".corrupt") for d in os.listdir(os.path.join(workdir, "checkpoints")))


def test_inference_reads_the_parameters_alone(straight, tmp_path):
  """Evaluation and generation need no optimizer state: with it deleted, both work."""


  workdir = _copy(straight, tmp_path, "params_only")
  shutil.rmtree(os.path.join(workdir, "checkpoints", "40", "opt_state"))
  assert np.isfinite(evaluate.evaluate_checkpoint(workdir)["eval/loss"])
  text, step = generate.from_checkpoint(workdir, "def ", 8, temperature=0.0)
  assert step == 40 and len(text) > 0


def _nan_nll(monkeypatch):
  real = steps.token_nll
  monkeypatch.setattr(steps, "token_nll", lambda logits, t: real(logits, t) * jnp.nan)


def test_nonfinite_loss_stops_at_once_and_keeps_the_last_good_checkpoint(
    tiny_config, tmp_path, monkeypatch):
  workdir = str(tmp_path)
  config = tiny_config("vanilla", train__steps=10, eval__every=10)
  train.train_and_evaluate(config, workdir)
  _nan_nll(monkeypatch)
  config = tiny_config("vanilla", train__steps=20, eval__every=20)
  with pytest.raises(train.TrainingError, match=r"loss is nan .* at step 11.*max_nonfinite"):
    train.train_and_evaluate(config, workdir)
  assert checkpoint.manager(workdir).all_steps() == [10]


def test_nonfinite_steps_can_be_skipped(tiny_config, tmp_path, monkeypatch):
  _nan_nll(monkeypatch)
  config = tiny_config("vanilla", train__steps=6, train__max_nonfinite_skips=3,
                       train__log_every=1, eval__every=100, train__checkpoint_every=100)
  with pytest.raises(train.TrainingError, match="at step 4"):
    train.train_and_evaluate(config, str(tmp_path))
  rows = metrics.read_jsonl(os.path.join(tmp_path, "metrics.jsonl"))
  assert [r["train/nonfinite_skips"] for r in rows if "train/nonfinite_skips" in r] == [1, 2, 3]
  assert not checkpoint.has_checkpoints(str(tmp_path))


def test_skipped_steps_leave_parameters_unchanged(tiny_config):
  config = tiny_config("vanilla")
  run = steps.build_run(config)
  state = run.init(jax.random.PRNGKey(0))
  before = jax.device_get(state.params)
  step = jax.jit(lambda s, b: steps.train_step(
      s, b, model=run.model, tx=run.tx, seed=0, skip_nonfinite=True))
  batch = {k: jnp.zeros((8, 64), jnp.int32) for k in
           ("inputs", "targets", "weights", "segment_ids", "positions")}
  batch["weights"] = batch["weights"] + 1
  real = steps.token_nll
  try:
    steps.token_nll = lambda logits, t: real(logits, t) * jnp.nan
    new, m = step(state, batch)
  finally:
    steps.token_nll = real
  assert not np.isfinite(float(m["train/loss"])) and int(new.step) == 1
  jax.tree_util.tree_map(np.testing.assert_array_equal, jax.device_get(new.params), before)


def test_full_disk_is_a_clear_error_and_the_next_run_resumes(tiny_config, tmp_path, monkeypatch):
  workdir = str(tmp_path)
  config = tiny_config("vanilla", train__steps=10, eval__every=10)
  train.train_and_evaluate(config, workdir)

  def no_space(self, *a, **k):
    raise OSError(errno.ENOSPC, "No space left on device")

  monkeypatch.setattr(ocp.CheckpointManager, "save", no_space)
  with pytest.raises(CheckpointError, match="step 20 failed: No space left on device"):
    train.train_and_evaluate(tiny_config("vanilla", eval__every=20), workdir)
  monkeypatch.undo()
  out = train.train_and_evaluate(tiny_config("vanilla", eval__every=20), workdir)
  assert out["step"] == 20 and checkpoint.manager(workdir).latest_step() == 20


def test_unwritable_workdir_is_a_clear_error(tiny_config, tmp_path):
  blocker = tmp_path / "file"
  blocker.write_text("not a directory")
  with pytest.raises(HiertxError, match="is not writable"):
    train.train_and_evaluate(tiny_config("vanilla"), str(blocker / "run"))


FUZZ_FIELDS = {
    "model": ["d_model", "num_heads", "mlp_dim", "num_layers", "max_len", "dropout",
              "positions", "dtype", "name", "bogus"],
    "data": ["seq_len", "batch_size", "vocab", "task", "split_fractions", "pack"],
    "train": ["steps", "learning_rate", "warmup_steps", "grad_clip", "log_every",
              "checkpoint_every", "weight_decay", "max_nonfinite_skips"],
    "eval": ["every", "batch_size", "batches", "split"],
    "mesh": ["data", "fsdp", "tensor"],
}
FUZZ_VALUES = [0, -1, 1, 3, 7, 64, 10**9, 0.5, -2.5, "", "x", "rotary", (1,), (0.5, 0.5, 0.0),
               None, True]


def test_fuzzed_overrides_fail_cleanly_or_work(tiny_config):
  rng = random.Random(0)
  outcomes = {"ok": 0, "refused": 0}
  for _ in range(80):
    config = tiny_config("vanilla")
    config.unlock()
    for _ in range(rng.randint(1, 2)):
      section = rng.choice(sorted(FUZZ_FIELDS))
      try:
        config[section][rng.choice(FUZZ_FIELDS[section])] = rng.choice(FUZZ_VALUES)
      except (TypeError, ValueError):
        pass  # ConfigDict's type check: the command line refuses these the same way
    try:
      steps.build_run(config)  # validation, data and mesh checks, tracing the model's init
      outcomes["ok"] += 1
    except HiertxError:
      outcomes["refused"] += 1
  assert outcomes["refused"] > 10 and outcomes["ok"] > 0, outcomes


def test_only_real_storage_hiccups_are_retried():
  """HTTP 429/503, timeouts and gRPC's UNAVAILABLE are retried; a damaged
  file whose name happens to hold those digits (Orbax's hex hashes) is not."""
  from hiertx import checkpoint
  for text in ("GET https://storage.googleapis.com/b/o: 503 Service Unavailable",
               "429 Too Many Requests", "UNAVAILABLE: socket closed", "read timed out"):
    assert checkpoint._is_transient(ValueError(text)), text
  damaged = ('OUT_OF_RANGE: Error reading Byte range [0, 2002) of local file "/w/checkpoints/20/'
             'params/d/c01bc2503756de30b592b8f1b14ca2b4": not valid for value of size 20')
  assert not checkpoint._is_transient(ValueError(damaged))
  assert not checkpoint._is_transient(ValueError("params/d/ab429f1: 20 bytes"))
