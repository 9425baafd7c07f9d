r"""Renders (and submits) an sbatch script for a multi-host SLURM run: one task
per host, `srun` starts them, and `jax.distributed.initialize()` finds the
coordinator from the SLURM_* environment.

  python launch/slurm.py --config=configs/bottom_up.py:size=base --workdir=/shared/runs/bu \
      --nodes=2 --gpus_per_node=8 --partition=gpu --time=12:00:00 --dry_run
  python launch/slurm.py ... -- --config.train.steps=20000    # submits with sbatch

The script is also written to <workdir>/job.sbatch, so a run's launch is kept.
"""

import os
import shlex
import subprocess
import sys

from absl import app, flags

import common


def define_flags() -> None:
  flags.DEFINE_string("config", None, "Config file[:arg].", required=True)
  flags.DEFINE_string("workdir", None, "Run directory on a shared filesystem.",
                                 required=True)
  flags.DEFINE_integer("nodes", 2, "Hosts.", lower_bound=1)
  flags.DEFINE_integer("gpus_per_node", 8, "GPUs per host (0 for CPU-only).", lower_bound=0)
  flags.DEFINE_integer("cpus_per_task", 16, "CPU cores per task.", lower_bound=1)
  flags.DEFINE_string("partition", None, "SLURM partition.")
  flags.DEFINE_string("account", None, "SLURM account.")
  flags.DEFINE_string("time", "24:00:00", "Time limit.")
  common.check_slurm_time()
  flags.DEFINE_string("job_name", "hiertx", "Job name.")
  flags.DEFINE_string("setup", "source .venv/bin/activate",
                               "Shell line run on every host before training.")
  flags.DEFINE_string("array", None, "Job array spec.")
  flags.DEFINE_bool("dry_run", False, "Print the script instead of submitting it.")


def render(config, workdir, overrides, nodes, gpus_per_node, cpus_per_task=16, partition=None,
           account=None, time="24:00:00", job_name="hiertx", setup="source .venv/bin/activate",
           array=None, body=None) -> str:
  """The sbatch script. `body` replaces the srun line (for job arrays)."""
  lines = ["#!/bin/bash",
           f"#SBATCH --job-name={job_name}",
           f"#SBATCH --nodes={nodes}",
           "#SBATCH --ntasks-per-node=1",
           f"#SBATCH --cpus-per-task={cpus_per_task}",
           f"#SBATCH --time={time}"]
  if gpus_per_node:
    lines.append(f"#SBATCH --gpus-per-node={gpus_per_node}")
  if partition:
    lines.append(f"#SBATCH --partition={partition}")
  if account:
    lines.append(f"#SBATCH --account={account}")
  if array:
    lines.append(f"#SBATCH --array={array}")
    lines.append(f"#SBATCH --output={workdir}/slurm-%A_%a.out")
  else:
    lines.append(f"#SBATCH --output={workdir}/slurm-%j.out")
  lines += ["", "set -euo pipefail", f"cd {shlex.quote(os.getcwd())}", setup, ""]
  lines.append("# One task per host; jax.distributed.initialize() reads SLURM_* for the")
  lines.append("# coordinator (the first host), the process count and this process's id.")
  if body is None:
    body = "srun " + common.show(common.train_command(config, workdir, overrides))
  lines.append(body)
  return "\n".join(lines) + "\n"


def main(argv, overrides):
  del argv
  f = flags.FLAGS
  script = render(f.config, f.workdir, overrides, f.nodes, f.gpus_per_node,
                  f.cpus_per_task, f.partition, f.account, f.time, f.job_name,
                  f.setup, f.array)
  if f.dry_run:
    print(script, end="")
    return
  common.require("sbatch", "run this on a SLURM login node")
  os.makedirs(flags.FLAGS.workdir, exist_ok=True)
  path = os.path.join(flags.FLAGS.workdir, "job.sbatch")
  with open(path, "w") as f:
    f.write(script)
  sys.exit(subprocess.call(["sbatch", path]))


if __name__ == "__main__":
  define_flags()
  common.main_guard(app.run, main)
