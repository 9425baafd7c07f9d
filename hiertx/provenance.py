"""Where a run came from: the git commit and the versions of the packages it ran with."""

import importlib.metadata
import os
import platform
import subprocess

import flax
import jax
import optax
import orbax.checkpoint

import hiertx


def git_sha() -> str:
  try:
    here = os.path.dirname(os.path.abspath(__file__))
    return subprocess.run(["git", "rev-parse", "HEAD"], cwd=here, capture_output=True,
                          text=True, timeout=5).stdout.strip() or "unknown"
  except (OSError, subprocess.SubprocessError):
    return "unknown"


def versions() -> dict[str, str]:
  return {"python": platform.python_version(), "jax": jax.__version__,
          "flax": flax.__version__, "optax": optax.__version__,
          "orbax": getattr(orbax.checkpoint, "__version__", "?"),
          "seqio": _installed("seqio"), "tensorflow": _installed("tensorflow"),
          "hiertx": hiertx.__version__}


def _installed(package: str) -> str:
  """A package's version without importing it; 'absent' when not installed."""
  try:
    return importlib.metadata.version(package)
  except importlib.metadata.PackageNotFoundError:
    return "absent"
