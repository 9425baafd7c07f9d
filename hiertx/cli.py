"""What every command-line entry point shares: quiet library logs, and user
errors (bad flags, misspelt config fields, bad config-file arguments, bad
data) printed as one line instead of a traceback.

  app.run(main, flags_parser=cli.parse_flags)
"""

import os
import sys

from absl import app, flags, logging

from hiertx import config as config_lib
from hiertx.errors import FlagError, HiertxError


def quiet_library_logs() -> None:
  """Library INFO logs (Orbax, JAX) drown the progress lines; --verbosity restores them."""
  if not flags.FLAGS["verbosity"].present:
    logging.set_verbosity(logging.WARNING)


def command(define_flags, main) -> None:
  """Runs an entry point: defines its flags, then `main` under absl, with
  every user mistake a one-line error (`python -m hiertx.<name>` and the
  `hiertx-<name>` console scripts)."""
  define_flags()
  app.run(main, flags_parser=parse_flags)


def start(argv: list[str]) -> None:
  """The first lines of every `main(argv)`: no stray positional arguments,
  quiet library logs."""
  if len(argv) > 1:
    raise app.UsageError(f"unexpected arguments: {argv[1:]}")
  quiet_library_logs()


def run(fn, *args, **kwargs):
  """`fn(*args, **kwargs)`; a HiertxError (a user mistake) exits with `error: ...`."""
  try:
    return fn(*args, **kwargs)
  except HiertxError as e:
    sys.exit(f"error: {e}")


def int_list(values: list[str], flag: str) -> list[int]:
  """A list flag's values as positive integers, or a FlagError naming the flag."""
  try:
    out = [int(v) for v in values]
  except ValueError:
    raise FlagError(flag, f"{','.join(values)!r} is not a list of integers") from None
  if any(v < 1 for v in out):
    raise FlagError(flag, f"needs positive integers, got {out}")
  return out


def parse_flags(argv: list[str]) -> list[str]:
  """absl's flag parsing, with every user mistake a one-line `error: ...`."""
  spec = _config_spec(argv)
  if spec is not None and not os.path.isfile(spec.partition(":")[0]):
    sys.exit(f"error: --config: no config file {spec.partition(':')[0]!r}")
  try:
    return flags.FLAGS(argv)
  except (flags.Error, HiertxError) as e:
    sys.exit(f"error: {e}")
  except (AttributeError, KeyError, TypeError, ValueError) as e:
    # ml_collections raises these for a --config.<path> that is not a field.
    sys.exit(f"error: {_override_error(argv) or e}")


def _config_spec(argv: list[str]) -> str | None:
  """The value of --config (a config file with its argument), if given."""
  spec = next((a.split("=", 1)[1] for a in argv if a.startswith("--config=")), None)
  if spec is None and "--config" in argv[:-1]:
    spec = argv[argv.index("--config") + 1]
  return spec


def _override_error(argv: list[str]) -> str | None:
  """The message of the first --config.<path>=... that names no field."""
  spec = _config_spec(argv)
  if spec is None:
    return None
  try:
    config = config_lib.load(spec)
    for arg in argv:
      if arg.startswith("--config."):
        config_lib.check_path(config, arg[len("--config."):].split("=", 1)[0])
  except HiertxError as e:
    return str(e)
  return None
