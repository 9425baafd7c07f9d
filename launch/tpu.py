r"""Runs a job on every worker of a Cloud TPU VM slice with
`gcloud compute tpus tpu-vm ssh --worker=all`; each worker starts the trainer
and `jax.distributed.initialize()` finds the slice's coordinator by itself.

  python launch/tpu.py --tpu=my-v4-16 --zone=us-central2-b \
      --config=configs/bottom_up.py:size=base --workdir=gs://bucket/runs/bu --dry_run

The repository is expected at --repo_dir on every worker (e.g. cloned there
by --setup).
"""

import shlex
import subprocess
import sys

from absl import app, flags

import common


def define_flags() -> None:
  flags.DEFINE_string("config", None, "Config file[:arg].", required=True)
  flags.DEFINE_string("workdir", None, "Run directory (e.g. gs://...).", required=True)
  flags.DEFINE_string("tpu", None, "TPU VM name.", required=True)
  flags.DEFINE_string("zone", None, "TPU zone.", required=True)
  flags.DEFINE_string("project", None, "GCP project (default: gcloud's).")
  flags.DEFINE_string("repo_dir", "~/hiertx", "Repository path on the workers.")
  flags.DEFINE_string("setup", "source .venv/bin/activate",
                               "Shell line run on every worker before training.")
  flags.DEFINE_bool("dry_run", False, "Print the command instead of running it.")


def remote_command(config, workdir, overrides, repo_dir="~/hiertx",
                   setup="source .venv/bin/activate") -> str:
  train = common.show(common.train_command(config, workdir, overrides))
  return f"cd {repo_dir} && {setup} && {train}"


def render(tpu, zone, config, workdir, overrides, project=None, repo_dir="~/hiertx",
           setup="source .venv/bin/activate", remote=None) -> list[str]:
  cmd = ["gcloud", "compute", "tpus", "tpu-vm", "ssh", tpu, f"--zone={zone}", "--worker=all"]
  if project:
    cmd.append(f"--project={project}")
  cmd.append("--command=" + (remote or remote_command(config, workdir, overrides, repo_dir,
                                                      setup)))
  return cmd


def main(argv, overrides):
  del argv
  f = flags.FLAGS
  cmd = render(f.tpu, f.zone, f.config, f.workdir, overrides, f.project, f.repo_dir, f.setup)
  print(" ".join(shlex.quote(c) for c in cmd), flush=True)
  if not flags.FLAGS.dry_run:
    common.require("gcloud", "install the Google Cloud CLI")
    sys.exit(subprocess.call(cmd))


if __name__ == "__main__":
  define_flags()
  common.main_guard(app.run, main)
