"""What every command-line entry point shares: quiet library logs, and user
errors printed as one line instead of a traceback."""

import sys

from absl import flags, logging

from hiertx.errors import HiertxError


def quiet_library_logs() -> None:
  """Library INFO logs (Orbax, JAX) drown the progress lines; --verbosity restores them."""
  if not flags.FLAGS["verbosity"].present:
    logging.set_verbosity(logging.WARNING)


def run(fn, *args, **kwargs):
  """`fn(*args, **kwargs)`; a HiertxError (a user mistake) exits with `error: ...`."""
  try:
    return fn(*args, **kwargs)
  except HiertxError as e:
    sys.exit(f"error: {e}")
