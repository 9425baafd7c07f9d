r"""Runs one training job on this machine (all local devices, one process).

  python launch/local.py --config=configs/bottom_up.py --workdir=/tmp/bu \
      -- --config.train.steps=1000
  python launch/local.py --config=configs/vanilla.py --workdir=/tmp/v --dry_run
"""

import subprocess
import sys

from absl import app, flags

import common


def define_flags() -> None:
  flags.DEFINE_string("config", None, "Config file[:arg].", required=True)
  flags.DEFINE_string("workdir", None, "Run directory.", required=True)
  flags.DEFINE_bool("dry_run", False, "Print the command instead of running it.")


def command(config, workdir, overrides) -> list[str]:
  return common.train_command(config, workdir, overrides, python=sys.executable)


def main(argv, overrides):
  del argv
  cmd = command(flags.FLAGS.config, flags.FLAGS.workdir, overrides)
  print(common.show(cmd), flush=True)
  if not flags.FLAGS.dry_run:
    sys.exit(subprocess.call(cmd))


if __name__ == "__main__":
  define_flags()
  common.main_guard(app.run, main)
