"""Runs whose files live on object storage (`gs://`), against a real GCS
server on 127.0.0.1 (fake-gcs-server): a data cache exported to the
bucket, a sweep whose runs train from it into the bucket, SIGTERM mid-run
and the rerun that resumes from the bucket, the report, evaluation and
generation from the bucket, the workdir's lease and checkpoint damage."""

import json
import os
import re
import signal
import socket
import subprocess
import sys
import time

import pytest

from conftest import ROOT, config_path, one_device_env
from hiertx import checkpoint, generate, lease, metrics, steps, storage, train
from hiertx import config as config_lib
from hiertx.errors import HiertxError
from servers import BUCKET, GcsServer

pytestmark = pytest.mark.xdist_group("gcs")  # one server and one trained run per worker

ROOT_URL = f"gs://{BUCKET}"
TINY = "configs/vanilla.py:size=tiny"

SWEEP_CONFIG = '''
import os
from hiertx import config as config_lib
from hiertx import grid

def get_config(arg=None):
  return config_lib.load(os.path.join({root!r}, "configs", "vanilla.py") + ":size=tiny")

def sweep_two():
  # The first run is long enough to be stopped in the middle; both log every
  # step. One model: the second run's step comes from the compilation cache.
  return grid.zipped({{"train.steps": [60, 4]}})
'''


@pytest.fixture(scope="module")
def gcs(tmp_path_factory):
  server = GcsServer(str(tmp_path_factory.mktemp("gcs")))
  saved = {k: os.environ.get(k) for k in server.env}
  os.environ.update(server.env)  # for what the tests do in this process
  yield server
  for k, v in saved.items():
    if v is None:
      os.environ.pop(k, None)
    else:
      os.environ[k] = v
  server.stop()


def _env(gcs):
  return {**one_device_env(), **gcs.env}


def _run(gcs, *argv, timeout=300):
  return subprocess.run([sys.executable, *argv], cwd=ROOT, env=_env(gcs), capture_output=True,
                        text=True, timeout=timeout)


def test_paths_on_object_storage(gcs):
  """The storage layer on the bucket: atomic writes, exclusive creates,
  listings that see other writers at once, appends, checksums."""
  d = f"{ROOT_URL}/storage"
  storage.write_text(f"{d}/a.json", "1")
  assert storage.read_text(f"{d}/a.json") == "1" and storage.listdir(d) == ["a.json"]
  assert storage.create_exclusive(f"{d}/lock", b"mine")
  assert not storage.create_exclusive(f"{d}/lock", b"theirs")
  assert storage.read_bytes(f"{d}/lock") == b"mine"
  log = storage.Appender(f"{d}/log.txt")
  log.write("a\n")
  log.flush()
  log.write("b\n")
  log.close()
  assert storage.read_text(f"{d}/log.txt") == "a\nb\n"
  again = storage.Appender(f"{d}/log.txt")  # a resumed writer keeps what was there
  again.write("c\n")
  again.close()
  assert storage.read_text(f"{d}/log.txt") == "a\nb\nc\n"
  sums = storage.file_checksums(d)
  assert sums["a.json"] == {"size": 1, "crc32c": "90f599e3"}  # the server's CRC32C of b"1"
  with pytest.raises(HiertxError, match=r"--workdir='nope://x/y': no file system for 'nope://'"):
    storage.check("nope://x/y", "--workdir")
  with pytest.raises(HiertxError, match="needs a bucket"):
    storage.check("gs://", "--workdir")


def test_a_sweep_on_the_bucket_from_export_to_report(gcs, tmp_path):
  """The issue's path on gs://, with the processes a user starts."""
  cache, sweep_dir = f"{ROOT_URL}/cache", f"{ROOT_URL}/sweep"
  r = _run(gcs, "-m", "hiertx.prepare_data", f"--config={TINY}", f"--export={cache}")
  assert r.returncode == 0, r.stderr[-2000:]
  assert f"exported to {cache}" in r.stdout and storage.exists(f"{cache}/manifest.json")

  config = tmp_path / "sweep_config.py"
  config.write_text(SWEEP_CONFIG.format(root=ROOT))
  args = ["launch/sweep.py", f"--config={config}", "--sweep=two", f"--sweep_dir={sweep_dir}",
          "--", f"--config.data.cache_dir={cache}", "--config.train.log_every=1",
          "--config.train.checkpoint_every=100", "--config.eval.every=100"]
  proc = subprocess.Popen([sys.executable, *args], cwd=ROOT, env=_env(gcs),
                          stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
  first = proc.stdout.readline() + proc.stdout.readline()
  log = re.search(r"\(1/2; log (\S+)\)", first)
  assert log, first
  deadline = time.time() + 300
  while not (os.path.exists(log[1]) and "step 20/60" in open(log[1]).read()):
    assert time.time() < deadline and proc.poll() is None, first + proc.stderr.read()
    time.sleep(0.2)
  proc.send_signal(signal.SIGTERM)
  out, err = proc.communicate(timeout=300)
  assert proc.returncode != 0 and "sweep interrupted" in err, out + err
  spec = json.loads(storage.read_text(f"{sweep_dir}/sweep.json"))
  long_run, short_run = (r["workdir"] for r in spec["runs"])
  status = checkpoint.read_status(long_run)
  assert status["state"] == "interrupted" and 20 <= status["step"] < 60, status
  assert lease.state(lease.current(long_run)) == "free"  # released on the way out
  assert "SIGTERM: saved a checkpoint" in storage.read_text(f"{long_run}/train.log")

  again = _run(gcs, *args[:4], "--parallel=2", *args[4:])  # both at once
  assert again.returncode == 0, again.stdout[-2000:] + again.stderr[-2000:]
  assert "resume steps-60" in again.stdout
  assert f"resumed at step {status['step']}" in storage.read_text(f"{long_run}/train.log")
  logged = [r["step"] for r in metrics.read_jsonl(f"{long_run}/metrics.jsonl")
            if "train/loss" in r]
  assert sorted(logged) == list(range(1, 61))  # every step once: nothing lost, nothing redone
  assert checkpoint.read_status(short_run)["state"] == "finished"
  assert storage.listdir(f"{long_run}/tensorboard")  # events, uploaded whole

  r = _run(gcs, "launch/report.py", f"--sweep_dir={sweep_dir}")
  assert r.returncode == 0, r.stderr[-2000:]
  assert r.stdout.count("| finished |") == 2
  assert storage.read_text(f"{sweep_dir}/report.md").count("| finished |") == 2
  assert storage.exists(f"{sweep_dir}/loss_curves.png")

  r = _run(gcs, "-m", "hiertx.evaluate", f"--workdir={long_run}")
  assert r.returncode == 0, r.stderr[-2000:]
  last_eval = [r["eval/loss"] for r in metrics.read_jsonl(f"{long_run}/metrics.jsonl")
               if "eval/loss" in r][-1]
  assert f"step 60 (validation): loss {last_eval:.4f}" in r.stdout
  assert storage.exists(f"{long_run}/eval_validation_60.json")
  text, step = generate.from_checkpoint(long_run, "def ", 8, temperature=0)
  assert step == 60 and len(text) > 0

  # Damage on the bucket is told apart by the manifest's sizes and CRC32Cs.
  step_dir = f"{short_run}/checkpoints/4"
  names = storage.listdir(f"{step_dir}/params/d")
  for name in names:
    storage.write_bytes(f"{step_dir}/params/d/{name}", b"x" * 20)
  damaged = checkpoint.damaged_files(step_dir)
  assert damaged and all(re.fullmatch(r"params/d/\w+: 20 bytes, \d+ when saved", d)
                         for d in damaged), damaged
  config = checkpoint.load_config(short_run)
  run = steps.build_run(config)
  mngr = checkpoint.manager(short_run)
  with pytest.raises(HiertxError, match="none of the checkpoints .* can be read"):
    checkpoint.restore_latest(mngr, run.abstract_state, set_aside=True)
  mngr.close()
  assert "4.corrupt" in storage.listdir(f"{short_run}/checkpoints")


def test_one_trainer_per_workdir_on_the_bucket(gcs, capsys):
  """A held workdir refuses a second trainer in one line naming the holder; a
  holder whose heartbeat stopped (a crashed machine) is taken over, and the
  takeover is said."""
  workdir = f"{ROOT_URL}/leased"
  cmd = ["-m", "hiertx.train", f"--config={TINY}", f"--workdir={workdir}",
         "--config.train.steps=2", "--config.eval.every=2", "--config.train.checkpoint_every=2"]
  held = lease.acquire(workdir, timeout_s=60)
  try:
    r = _run(gcs, *cmd)
  finally:
    held.release()
  assert r.returncode == 1
  assert r.stderr.strip().splitlines() == [
      f"error: {workdir} is in use by another run (host {socket.gethostname()}, pid "
      f"{os.getpid()}; heartbeat {r.stderr.split('heartbeat ')[1].split(' s ago')[0]} s ago); "
      "it renews its lease every 15 s. Wait for it to end, stop it, or use another --workdir. "
      "A holder whose heartbeat stops for its timeout (60 s) is taken over."]
  assert checkpoint.read_status(workdir)["state"] == "not started"  # nothing was written

  # A holder on another machine that stopped beating 10 minutes ago.
  record = {"host": "gone-host", "pid": 1, "job": None, "restart": 0, "started": 0.0,
            "heartbeat": time.time() - 600, "timeout_s": 300.0, "released": False}
  epoch = lease.current(workdir)["epoch"] + 1
  storage.write_text(f"{workdir}/lease/{epoch:08d}.json", json.dumps(record))
  assert lease.state(lease.current(workdir)) == "stale"
  config = config_lib.load(config_path("vanilla") + ":size=tiny")
  config.train.steps, config.eval.every, config.train.checkpoint_every = 2, 2, 2
  out = train.train_and_evaluate(config, workdir)
  assert out["step"] == 2
  assert re.search(rf"warning: took over {workdir} from host gone-host, pid 1; heartbeat 6\d\d s "
                   r"ago \(its heartbeat stopped for longer than 300 s\)", capsys.readouterr().out)
  assert checkpoint.read_status(workdir)["state"] == "finished"
  assert lease.state(lease.current(workdir)) == "free"
