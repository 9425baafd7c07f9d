"""The SLURM launchers against a real SLURM: a private single-node cluster
(slurmctld, slurmd and munge) started on loopback ports for this module.
Jobs are real sbatch scripts from launch/slurm.py and launch/sweep.py,
running real trainers: one that is preempted (`scontrol requeue`) and
resumes, one that outlives its time limit by requeueing itself, and a job
array that is resubmitted while one of its runs is still going."""

import json
import os
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import time

import pytest

from conftest import ROOT, one_device_env
from hiertx import checkpoint, lease, metrics, storage
from servers import SlurmCluster

pytestmark = pytest.mark.xdist_group("slurm")  # one cluster per worker

TINY = "configs/vanilla.py:size=tiny"
# What every job's trainer logs and saves.
EVERY_STEP = ["--config.train.log_every=1", "--config.eval.every=100000",
              "--config.train.checkpoint_every=100000"]


@pytest.fixture(scope="module")
def base():
  """Where the cluster keeps its state and the jobs their runs: not under
  /tmp, which the cluster launchers refuse as node-local."""
  path = tempfile.mkdtemp(prefix="hiertx-slurm-test-", dir=os.path.expanduser("~"))
  yield path
  shutil.rmtree(path, ignore_errors=True)


@pytest.fixture(scope="module")
def cluster(base):
  c = SlurmCluster(os.path.join(base, "cluster"))
  yield c
  c.stop()


def _env(cluster):
  # Jobs inherit the submitting process's environment (sbatch --export=ALL):
  # one CPU device per trainer, the tests' XLA settings, caches and SLURM_CONF.
  return {**one_device_env(), **cluster.env}


def _launch(cluster, script, *args, timeout=300):
  setup = f"export PATH={os.path.dirname(sys.executable)}:$PATH"
  r = subprocess.run([sys.executable, f"launch/{script}", f"--setup={setup}", *args],
                     cwd=ROOT, env=_env(cluster), capture_output=True, text=True,
                     timeout=timeout)
  assert r.returncode == 0, r.stdout[-2000:] + r.stderr[-2000:]
  return r.stdout


def _submit(cluster, workdir, *overrides, time_limit="10", signal_before=300):
  out = _launch(cluster, "slurm.py", f"--config={TINY}", f"--workdir={workdir}", "--nodes=1",
                "--gpus_per_node=0", "--cpus_per_task=1", f"--time={time_limit}",
                f"--signal_before={signal_before}", "--", *EVERY_STEP, *overrides)
  job = re.search(r"submitted job (\d+)", out)
  assert job, out
  return job[1]


def _wait_for(path, text, timeout=240):
  deadline = time.time() + timeout
  while not (os.path.exists(path) and text in open(path).read()):
    assert time.time() < deadline, open(path).read()[-3000:] if os.path.exists(path) else path
    time.sleep(0.1)


def _trained_steps(workdir) -> list[int]:
  return sorted(r["step"] for r in metrics.read_jsonl(os.path.join(workdir, "metrics.jsonl"))
                if "train/loss" in r)


@pytest.fixture(scope="module")
def time_limited(cluster, base):
  """Submitted first, so that it runs while the other tests do: a job with a
  one-minute limit whose training takes longer. SLURM signals it (USR1, up
  to a minute before the limit), it saves and exits with 75, and its script
  requeues it, until the training is done."""
  workdir = os.path.join(base, "time_limited")
  # SLURM checks time limits every 30 s, so the signal due 59 s before the
  # limit comes 1-31 s after the start: the job must run longer than that
  # (here about 25 s of training after its start-up) to be sure of one.
  steps = 2500
  job = _submit(cluster, workdir, f"--config.train.steps={steps}", time_limit="1",
                signal_before=59)
  return job, workdir, steps


def test_a_preempted_job_resumes_from_its_checkpoint(cluster, base, time_limited):
  """launch/slurm.py submits a tiny training; `scontrol requeue` preempts it
  mid-run (SIGTERM: it saves); SLURM starts it again, it resumes from that
  checkpoint and finishes with every step trained exactly once. (Asks for
  `time_limited` only to submit that job first.)"""
  del time_limited
  workdir = os.path.join(base, "preempted")
  steps = 300
  job = _submit(cluster, workdir, f"--config.train.steps={steps}")
  out = os.path.join(workdir, f"slurm-{job}.out")
  _wait_for(out, "step 100/")
  cluster.run("scontrol", "requeue", job)
  info = cluster.wait(job, timeout=300)
  assert int(info["Restarts"]) == 1, info
  text = open(out).read()
  saved = int(re.search(r"SIGTERM: saved a checkpoint at step (\d+)", text)[1])
  assert 100 <= saved < steps and f"resumed at step {saved}" in text, text[-3000:]
  assert _trained_steps(workdir) == list(range(1, steps + 1))
  assert checkpoint.read_status(workdir)["state"] == "finished"
  assert storage.read_text(os.path.join(workdir, "job.sbatch")).startswith("#!/bin/bash")


def _sweep_config(path, root):
  path.write_text(f'''
import os
from hiertx import config as config_lib
from hiertx import grid

def get_config(arg=None):
  return config_lib.load(os.path.join({root!r}, "configs", "vanilla.py") + ":size=tiny")

def sweep_three():
  return grid.zipped({{"train.steps": [20, 300, 300], "train.seed": [0, 1, 2]}})
''')


def test_a_sweep_array_resubmitted_while_a_run_is_going(cluster, base, tmp_path):
  """launch/sweep.py --target=slurm submits three runs as one job array. One
  is stopped mid-run (SIGTERM: it saves), one is suspended mid-run (it keeps
  its workdir's lease); resubmitting then skips the finished run and the
  held one, and submits only the stopped one, which resumes. launch/report.py
  then reads all three as finished."""
  config = tmp_path / "sweep_config.py"
  _sweep_config(config, ROOT)
  sweep_dir = os.path.join(base, "sweep")
  args = [f"--config={config}", "--sweep=three", f"--sweep_dir={sweep_dir}", "--target=slurm",
          "--nodes=1", "--gpus_per_node=0", "--cpus_per_task=1", "--time=10", "--",
          *EVERY_STEP]
  out = _launch(cluster, "sweep.py", *args)
  job = re.search(r"submitted job array (\d+) \(3 runs\)", out)
  assert job, out
  job = job[1]
  spec = json.loads(open(os.path.join(sweep_dir, "sweep.json")).read())
  short, long, cancelled = (r["name"] for r in spec["runs"])
  assert spec["submissions"][0]["runs"] == [short, long, cancelled]
  _wait_for(os.path.join(sweep_dir, f"slurm-{job}_1.out"), "step 50/")
  cluster.run("scontrol", "suspend", f"{job}_1")  # stopped, and still holding its workdir
  _wait_for(os.path.join(sweep_dir, f"slurm-{job}_2.out"), "step 50/")
  # Its trainer is told to stop (as a preempted host's would be): it saves,
  # exits 0, and its run is left interrupted.
  os.kill(lease.current(os.path.join(sweep_dir, cancelled))["pid"], signal.SIGTERM)
  cluster.wait(f"{job}_2", timeout=120)
  cluster.wait(f"{job}_0", timeout=240)
  deadline = time.time() + 60
  while (status := checkpoint.read_status(os.path.join(sweep_dir, cancelled)))["state"] != \
      "interrupted":
    assert time.time() < deadline, status
    time.sleep(0.5)
  assert lease.state(lease.current(os.path.join(sweep_dir, long))) == "held"

  again = _launch(cluster, "sweep.py", *args)
  assert f"skip {short}: finished" in again
  assert re.search(rf"skip {long}: running \(host \S+, pid \d+, SLURM job \d+; heartbeat", again), \
      again
  resubmitted = re.search(r"submitted job array (\d+) \(1 runs\)", again)
  assert resubmitted, again
  assert json.loads(open(os.path.join(sweep_dir, "sweep.json")).read())["submissions"][1][
      "runs"] == [cancelled]
  cluster.run("scontrol", "resume", f"{job}_1")
  cluster.wait(f"{resubmitted[1]}_0", timeout=300)
  cluster.wait(f"{job}_1", timeout=300)
  text = open(os.path.join(sweep_dir, f"slurm-{resubmitted[1]}_0.out")).read()
  assert f"resumed at step {status['step']}" in text, text[-3000:]
  for name, steps in ((short, 20), (long, 300), (cancelled, 300)):
    assert _trained_steps(os.path.join(sweep_dir, name)) == list(range(1, steps + 1)), name

  r = subprocess.run([sys.executable, "launch/report.py", f"--sweep_dir={sweep_dir}"],
                     cwd=ROOT, env=_env(cluster), capture_output=True, text=True, timeout=300)
  assert r.returncode == 0, r.stderr[-2000:]
  assert r.stdout.count("| finished |") == 3, r.stdout


def test_a_job_past_its_time_limit_requeues_itself(cluster, time_limited):
  job, workdir, steps = time_limited
  info = cluster.wait(job, timeout=600)
  assert int(info["Restarts"]) >= 1, info
  text = open(os.path.join(workdir, f"slurm-{job}.out")).read()
  saved = [int(s) for s in re.findall(
      r"SIGUSR1: saved a checkpoint at step (\d+); run the same command to resume "
      r"\(exit 75: requeue\)", text)]
  assert len(saved) == int(info["Restarts"]), text[-3000:]
  assert f"requeueing job {job}" in text
  for s in saved:
    assert f"resumed at step {s}" in text
  assert _trained_steps(workdir) == list(range(1, steps + 1))
  assert checkpoint.read_status(workdir)["state"] == "finished"
