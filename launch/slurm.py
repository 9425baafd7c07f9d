r"""Renders (and submits) an sbatch script for a multi-host SLURM run: one task
per host, `srun` starts them, and `jax.distributed.initialize()` finds the
coordinator from the SLURM_* environment.

  python launch/slurm.py --config=configs/bottom_up.py:size=base --workdir=/shared/runs/bu \
      --nodes=2 --gpus_per_node=8 --partition=gpu --time=12:00:00 --dry_run
  python launch/slurm.py ... -- --config.train.steps=20000    # submits with sbatch

A run longer than the time limit goes on by itself: the job asks SLURM for
SIGUSR1 --signal_before seconds before the limit, the trainer saves a
checkpoint and exits with 75, and the script requeues the job, which
resumes from that checkpoint. A job preempted or requeued by an
administrator (`scontrol requeue`) gets SIGTERM, saves and resumes the same
way. Its output is appended to <job_output_dir>/slurm-<job>.out across restarts.

The script is also written to <workdir>/job.sbatch, so a run's launch is kept.
"""

import os
import shlex
import subprocess
import sys

from absl import app, flags

import common
from hiertx import cli
from hiertx import storage


def define_flags() -> None:
  flags.DEFINE_string("config", None, "Config file[:arg].", required=True)
  flags.DEFINE_string("workdir", None, "Run directory on a shared filesystem, or gs://...",
                      required=True)
  flags.DEFINE_integer("nodes", 2, "Hosts.", lower_bound=1)
  flags.DEFINE_integer("gpus_per_node", 8, "GPUs per host (0 for CPU-only).", lower_bound=0)
  flags.DEFINE_integer("cpus_per_task", 16, "CPU cores per task.", lower_bound=1)
  flags.DEFINE_string("partition", None, "SLURM partition.")
  flags.DEFINE_string("account", None, "SLURM account.")
  define_time_flags()
  flags.DEFINE_string("job_name", "hiertx", "Job name.")
  flags.DEFINE_string("setup", "source .venv/bin/activate",
                               "Shell line run on every host before training.")
  flags.DEFINE_string("job_output_dir", None, "Directory of the job's output file (default: "
                      "the workdir; for a gs:// workdir, ./slurm_logs).")
  flags.DEFINE_string("array", None, "Job array spec.")
  flags.DEFINE_bool("dry_run", False, "Print the script instead of submitting it.")


def define_time_flags() -> None:
  """--time and --signal_before, shared with launch/sweep.py."""
  flags.DEFINE_string("time", "24:00:00", "slurm: time limit of each job (it requeues itself "
                      "to go on past it).")
  common.check_slurm_time()
  flags.DEFINE_integer("signal_before", 300, "slurm: seconds before the time limit at which "
                       "the trainer is asked to save and requeue (SLURM may signal up to a "
                       "minute earlier).", lower_bound=1)


def output_dir(given: str | None, run_dir: str) -> str:
  """Where the job's output goes: SLURM writes it, so it must be a path."""
  if given:
    return os.path.abspath(given)
  return os.path.abspath("slurm_logs") if storage.is_url(run_dir) else run_dir


def render(config, workdir, overrides, nodes, gpus_per_node, cpus_per_task=16, partition=None,
           account=None, time="24:00:00", job_name="hiertx", setup="source .venv/bin/activate",
           array=None, body=None, logs=None, signal_before=300) -> str:
  """The sbatch script. `body` replaces the srun line (for job arrays);
  `logs` is the output directory (default: `workdir`)."""
  logs = logs or workdir
  lines = ["#!/bin/bash",
           f"#SBATCH --job-name={job_name}",
           f"#SBATCH --nodes={nodes}",
           "#SBATCH --ntasks-per-node=1",
           f"#SBATCH --cpus-per-task={cpus_per_task}",
           f"#SBATCH --time={time}",
           # Every job step (the trainers, not this shell) gets SIGUSR1 before
           # the limit; the job may be requeued, and appends to its output.
           f"#SBATCH --signal=USR1@{signal_before}",
           "#SBATCH --requeue",
           "#SBATCH --open-mode=append"]
  if gpus_per_node:
    lines.append(f"#SBATCH --gpus-per-node={gpus_per_node}")
  if partition:
    lines.append(f"#SBATCH --partition={partition}")
  if account:
    lines.append(f"#SBATCH --account={account}")
  if array:
    lines.append(f"#SBATCH --array={array}")
    lines.append(f"#SBATCH --output={logs}/slurm-%A_%a.out")
  else:
    lines.append(f"#SBATCH --output={logs}/slurm-%j.out")
  lines += ["", "set -euo pipefail", f"cd {shlex.quote(os.getcwd())}", setup, ""]
  lines.append("# One task per host; jax.distributed.initialize() reads SLURM_* for the")
  lines.append("# coordinator (the first host), the process count and this process's id.")
  if body is None:
    body = "srun " + common.show(common.train_command(config, workdir, overrides))
  lines.append(f"{body} && status=0 || status=$?")
  lines += [
      f"if [ \"$status\" -eq {cli.EXIT_REQUEUE} ]; then",
      "  # The trainer saved a checkpoint before the time limit: go on in a new run of",
      "  # this job, which resumes from it.",
      "  echo \"hiertx: saved before the time limit; requeueing job $SLURM_JOB_ID\"",
      "  scontrol requeue \"$SLURM_JOB_ID\"",
      "  exit 0",
      "fi",
      "exit \"$status\""]
  return "\n".join(lines) + "\n"


def submit(script: str, keep_at: str | None = None) -> str:
  """Submits `script` with sbatch (through stdin, so it may be kept on object
  storage) and returns the job id; keeps a copy at `keep_at`."""
  common.require("sbatch", "run this on a SLURM login node")
  if keep_at:
    storage.write_text(keep_at, script)
  r = subprocess.run(["sbatch", "--parsable"], input=script, capture_output=True, text=True)
  if r.returncode:
    sys.exit(f"error: sbatch failed: {r.stderr.strip() or r.stdout.strip()}")
  return r.stdout.strip().split(";")[0]


def main(argv, overrides):
  del argv
  f = flags.FLAGS
  workdir = storage.absolute(storage.check(f.workdir, "--workdir"))
  logs = output_dir(f.job_output_dir, workdir)
  script = render(f.config, workdir, overrides, f.nodes, f.gpus_per_node,
                  f.cpus_per_task, f.partition, f.account, f.time, f.job_name,
                  f.setup, f.array, logs=logs, signal_before=f.signal_before)
  if f.dry_run:
    print(script, end="")
    return
  storage.makedirs(workdir)
  os.makedirs(logs, exist_ok=True)
  job = submit(script, storage.join(workdir, "job.sbatch"))
  print(f"submitted job {job}; output: {logs}/slurm-{job}.out", flush=True)


if __name__ == "__main__":
  define_flags()
  common.main_guard(app.run, main)
