"""Shared by the launchers: the trainer command line and printing a dry run."""

import re
import shlex
import shutil
import sys

from absl import flags

from hiertx import cli
from hiertx import config as config_lib


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
