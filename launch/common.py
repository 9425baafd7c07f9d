"""Shared by the launchers: the trainer command line and printing a dry run."""

import os
import re
import shlex
import shutil
import sys
import tempfile

from absl import flags

from hiertx import cli
from hiertx import config as config_lib
from hiertx import storage
from hiertx.errors import FlagError


def train_command(config: str, workdir: str, overrides: list[str], python: str = "python3",
                  module: str = "hiertx.train") -> list[str]:
  """`python -m hiertx.train --config=... --workdir=... --config.x=y ...`."""
  return [python, "-m", module, f"--config={config}", f"--workdir={workdir}", *overrides]


# SLURM's --time forms: minutes, minutes:seconds, hours:minutes:seconds,
# days-hours, days-hours:minutes, days-hours:minutes:seconds.
_SLURM_TIME = re.compile(r"(\d+-)?\d+(:\d+){0,2}")


def check_slurm_time() -> None:
  """Registers a check of --time: a malformed limit is refused here, not by sbatch."""
  flags.register_validator(
      "time", lambda v: bool(_SLURM_TIME.fullmatch(v or "")),
      message="not a SLURM time limit (minutes, HH:MM:SS, D-HH, D-HH:MM or D-HH:MM:SS)")


def show(cmd: list[str] | str) -> str:
  return cmd if isinstance(cmd, str) else shlex.join(cmd)


def split_overrides(argv: list[str]) -> list[str]:
  """Everything after `--` on the launcher's command line goes to the trainer."""
  return argv[argv.index("--") + 1:] if "--" in argv else []


def launcher_argv(argv: list[str]) -> list[str]:
  return argv[:argv.index("--")] if "--" in argv else argv


def main_guard(app_run, main):
  """Runs `main(argv, trainer_args)` after checking the config file, its
  argument and every --config.* override: a mistake is one line here, not a
  failed job on a cluster."""
  sys.argv, rest = launcher_argv(sys.argv), split_overrides(sys.argv)

  def checked(argv):
    cli.run(check_config, getattr(flags.FLAGS, "config", None), rest)
    main(argv, rest)

  app_run(checked, flags_parser=cli.parse_flags)


def check_config(spec: str | None, overrides: list[str]) -> None:
  if not spec:
    return
  config = config_lib.load(spec)
  for arg in overrides:
    if arg.startswith("--config."):
      config_lib.apply_override(config, arg[len("--config."):])


def require(program: str, hint: str) -> None:
  """Exits with a clear message when a cluster tool is not installed here."""
  if shutil.which(program) is None:
    sys.exit(f"error: {program} not found on this machine; {hint} "
             "(--dry_run prints what would be run)")


# Directories every machine has its own copy of: a cluster job that writes
# there writes where no other node (nor the login node's report) can read.
NODE_LOCAL_ROOTS = ("/tmp", "/var/tmp", "/dev/shm", "/run")


def check_shared_dir(path: str | None, flag: str, target: str) -> str:
  """`path` for runs on other machines (--target=slurm|tpu): given, and
  not node-local (a URL, or a path outside the node-local roots); one
  FlagError line otherwise."""
  if not path:
    raise FlagError(flag, f"--target={target} needs a directory every node and the login node "
                    "share (a shared filesystem path, or gs://bucket/...)")
  path = storage.check(path, flag)
  if storage.is_url(path):
    return path
  real = os.path.realpath(os.path.abspath(os.path.expanduser(path)))
  local = {*NODE_LOCAL_ROOTS, os.path.realpath(tempfile.gettempdir())}
  for root in sorted(local):
    if real == root or real.startswith(root.rstrip("/") + "/"):
      raise FlagError(flag, f"{path!r} is under {root}, which each node keeps for itself: the "
                      f"runs of --target={target} would write where launch/report.py never "
                      "looks. Use a shared filesystem path or gs://bucket/...")
  return real
