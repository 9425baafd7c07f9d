"""What every command-line entry point shares: quiet library logs, and user
errors (bad flags, misspelt config fields, bad config-file arguments, bad
data) printed as one line instead of a traceback.

  app.run(main, flags_parser=cli.parse_flags)
"""

import logging as std_logging
import os
import socket
import sys
import time

from absl import app, flags, logging

from hiertx import config as config_lib
from hiertx import storage
from hiertx.errors import FlagError, HiertxError

# The exit status of a trainer stopped by SIGUSR1 once it has saved: "try
# again later" (sysexits' EX_TEMPFAIL). launch/slurm.py's script requeues the
# job on it.
EXIT_REQUEUE = 75


def quiet_library_logs() -> None:
  """Library INFO logs (Orbax, JAX) drown the progress lines; --verbosity restores them."""
  if not flags.FLAGS["verbosity"].present:
    logging.set_verbosity(logging.WARNING)


class _FileHandler(std_logging.Handler):
  """Log records to a file of the workdir (hiertx.storage.Appender): at once
  on a local disk, at most every `every_s` seconds on object storage, and at
  exit (logging's shutdown flushes every handler)."""

  def __init__(self, path: str, every_s: float = 30.0):
    super().__init__(std_logging.INFO)
    self.setFormatter(std_logging.Formatter(
        "%(asctime)s %(levelname)s %(name)s %(filename)s:%(lineno)d] %(message)s"))
    self.file = storage.Appender(path, keep_existing=False)
    self.every_s, self.last = every_s, 0.0

  def emit(self, record) -> None:  # called with the handler's lock held
    try:
      self.file.write(self.format(record) + "\n")
      if not self.file.remote or time.time() - self.last > self.every_s:
        self.file.flush()
        self.last = time.time()
    except Exception:  # noqa: BLE001  (logging must never stop a run)
      self.handleError(record)

  def flush(self) -> None:
    with self.lock:
      try:
        self.file.flush()
      except Exception:  # noqa: BLE001  (at exit, nothing more can be done)
        pass


def log_to_workdir(workdir: str | None, command: str) -> str | None:
  """Sends library logs (INFO and up, with their tracebacks) to
  `<workdir>/logs/<command>.<host>.<pid>.log` instead of the terminal, which
  keeps the progress lines, warnings and the one `error:` line of a failure.
  Tracebacks Python can only print as 'unraisable' (callbacks from
  tensorstore's threads into an event loop that has closed) and asyncio's
  reports of failed tasks go to the file alone. Returns the file's path;
  None (nothing changed) when the workdir cannot hold it."""
  try:
    workdir = storage.check(workdir or "", "--workdir")
    storage.makedirs(storage.join(workdir, "logs"))
    path = storage.join(workdir, "logs", f"{command}.{socket.gethostname()}.{os.getpid()}.log")
    handler = _FileHandler(path)
  except (HiertxError, OSError, ValueError):
    return None  # the command itself reports a workdir it cannot use
  std_logging.getLogger().addHandler(handler)
  if not flags.FLAGS["verbosity"].present:
    logging.set_verbosity(logging.INFO)  # into the file; the terminal keeps WARNING
    logging.get_absl_handler().setLevel(std_logging.WARNING)
  unraisable = std_logging.getLogger("hiertx.unraisable")
  # Failed futures of Orbax's event loop that nobody awaited ('Task exception
  # was never retrieved', logged by asyncio), and tracebacks Python can only
  # print as unraisable: the file gets them, the terminal does not.
  for name in ("hiertx.unraisable", "asyncio"):
    logger = std_logging.getLogger(name)
    logger.setLevel(std_logging.INFO)
    logger.propagate = False
    logger.addHandler(handler)

  def hook(args):
    unraisable.info("%s: %s", args.err_msg or "unraisable exception", args.object,
                    exc_info=(args.exc_type, args.exc_value, args.exc_traceback))

  sys.unraisablehook = hook
  return path


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
