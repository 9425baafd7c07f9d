"""The launchers render the commands they would run (dry runs)."""

import os
import subprocess
import sys

from conftest import ROOT

import common
import multiprocess
import slurm
import tpu


def _dry(script, *args):
  args = list(args)
  at = args.index("--") if "--" in args else len(args)
  args.insert(at, "--dry_run")
  r = subprocess.run([sys.executable, f"launch/{script}", *args], cwd=ROOT,
                     capture_output=True, text=True, timeout=120)
  assert r.returncode == 0, r.stderr[-2000:]
  return r.stdout


def test_slurm_script_for_two_hosts():
  out = _dry("slurm.py", "--config=configs/bottom_up.py:size=base", "--workdir=/shared/bu",
             "--nodes=2", "--gpus_per_node=8", "--partition=gpu", "--",
             "--config.train.steps=1000")
  assert "#SBATCH --nodes=2" in out and "#SBATCH --ntasks-per-node=1" in out
  assert "#SBATCH --gpus-per-node=8" in out and "#SBATCH --partition=gpu" in out
  srun = [line for line in out.splitlines() if line.startswith("srun ")]
  assert srun == ["srun python3 -m hiertx.train --config=configs/bottom_up.py:size=base "
                  "--workdir=/shared/bu --config.train.steps=1000 && status=0 || status=$?"]
  # Before the time limit the trainers get SIGUSR1, save, and exit with 75,
  # on which the script requeues the job; output is appended across restarts.
  for line in ("#SBATCH --signal=USR1@300", "#SBATCH --requeue", "#SBATCH --open-mode=append",
               "#SBATCH --output=/shared/bu/slurm-%j.out", 'if [ "$status" -eq 75 ]; then',
               '  scontrol requeue "$SLURM_JOB_ID"', 'exit "$status"'):
    assert line in out.splitlines(), line
  # A gs:// workdir: SLURM writes the output to a directory of this machine.
  assert slurm.output_dir(None, "gs://b/run") == os.path.abspath("slurm_logs")
  assert slurm.output_dir(None, "/shared/bu") == "/shared/bu"
  assert slurm.output_dir("logs", "gs://b/run") == os.path.abspath("logs")


def test_slurm_array_body():
  script = slurm.render("c.py", "/w", [], nodes=1, gpus_per_node=0, array="0-2",
                        body="srun run_one $SLURM_ARRAY_TASK_ID")
  assert "#SBATCH --array=0-2" in script and "gpus-per-node" not in script
  assert "srun run_one $SLURM_ARRAY_TASK_ID && status=0 || status=$?" in script.splitlines()


def test_tpu_command_for_all_workers():
  out = _dry("tpu.py", "--tpu=v4-16", "--zone=us-central2-b", "--config=configs/vanilla.py",
             "--workdir=gs://b/run")
  assert out.startswith("gcloud compute tpus tpu-vm ssh v4-16 --zone=us-central2-b --worker=all")
  assert "python3 -m hiertx.train --config=configs/vanilla.py --workdir=gs://b/run" in out
  cmd = tpu.render("t", "z", "c.py", "/w", ["--config.train.steps=5"], project="p")
  assert "--project=p" in cmd and cmd[-1].endswith("--config.train.steps=5")


def test_multiprocess_and_local_dry_runs():
  out = _dry("multiprocess.py", "--num_processes=2", "--devices_per_process=4", "--port=1234",
             "--config=configs/vanilla.py:size=tiny", "--workdir=/tmp/mp")
  lines = out.strip().splitlines()
  assert len(lines) == 2
  for i, line in enumerate(lines):
    assert line.startswith("JAX_PLATFORMS=cpu XLA_FLAGS=--xla_force_host_platform_device_count=4")
    assert f"--coordinator_address=localhost:1234 --num_processes=2 --process_id={i}" in line
  procs = multiprocess.commands("c.py", "/w", [], 3, 2, 99, module="hiertx.evaluate")
  assert len(procs) == 3 and not any(a.startswith("--config=") for _, a2 in procs for a in a2)
  out = _dry("local.py", "--config=configs/vanilla.py", "--workdir=/tmp/v", "--",
             "--config.train.steps=3")
  assert ("-m hiertx.train --config=configs/vanilla.py --workdir=/tmp/v "
          "--config.train.steps=3") in out


def test_slurm_time_limits_are_checked_before_submitting():
  ok = ["30", "1:30", "24:00:00", "2-00", "2-12:00", "2-12:00:00"]
  bad = ["abc", "1h", "", "24:00:00:00", "2-", "-5"]
  assert all(common._SLURM_TIME.fullmatch(t) for t in ok)
  assert not any(common._SLURM_TIME.fullmatch(t) for t in bad)
  r = subprocess.run([sys.executable, "launch/slurm.py", "--config=configs/vanilla.py",
                      "--workdir=/tmp/x", "--time=1h", "--dry_run"], cwd=ROOT,
                     capture_output=True, text=True, timeout=120)
  assert r.returncode != 0 and "Traceback" not in r.stderr
  assert r.stderr.strip().splitlines()[-1] == (
      "error: flag --time=1h: not a SLURM time limit (minutes, HH:MM:SS, D-HH, D-HH:MM or "
      "D-HH:MM:SS)")
