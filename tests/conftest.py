"""Test setup: 8 simulated CPU devices (set before jax is imported) and helpers."""

import os
from importlib import metadata


def _has_older_emitters() -> bool:
  """Whether XLA:CPU can switch back to its older elemental emitters: jaxlib
  up to 0.10 has `xla_cpu_use_fusion_emitters`; from 0.11 the fusion emitters
  are the only ones, and an XLA_FLAGS entry XLA does not know aborts the
  process."""
  major, minor = (int(x) for x in metadata.version("jaxlib").split(".")[:2])
  return (major, minor) < (0, 11)


# Compiling dominates the tests' time (tiny models, a few steps each): the
# backend's optimisation level 0 compiles about 1.8x faster and still runs the
# tiny steps faster overall, and XLA:CPU's older elemental emitters
# (`use_fusion_emitters=false`, where the jaxlib has them) compile a tiny
# model's gradient about 3x faster than its fusion emitters (the attention and
# decoding tests: 409 s -> 268 s on 2 cores). No excess precision: a bfloat16
# value is rounded wherever the program says so, whatever XLA fuses, so the
# bfloat16 decoding test compares like with like.
OLDER_EMITTERS = _has_older_emitters()
TEST_XLA_FLAGS = ("--xla_backend_optimization_level=0 --xla_allow_excess_precision=false"
                  + (" --xla_cpu_use_fusion_emitters=false" if OLDER_EMITTERS else ""))
# Compile options for a test about the compiled program itself: XLA:CPU's own
# emitters, as outside the tests (the older ones expand scatters, such as the
# embedding's gradient, into while loops of their own).
PRODUCTION_EMITTERS = {"xla_cpu_use_fusion_emitters": True} if OLDER_EMITTERS else {}
os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "") + " " + TEST_XLA_FLAGS
                           + " --xla_force_host_platform_device_count=8").strip()
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
# One persistent compilation cache for the session, shared by the xdist workers
# and the trainer processes tests start: the same tiny train steps are compiled
# once, not once per process. A fresh directory per session, so nothing stale.
# Likewise one packed-data cache: the corpora are read and packed once.
import atexit
import shutil
import tempfile

# Every compile goes in it, not only those over JAX's default second: most of
# a tiny model's compiles take less, and processes repeat them (8% less CPU
# over the decoding, sweep and reliability tests).
os.environ.setdefault("JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS", "0")
for _var, _prefix in (("JAX_COMPILATION_CACHE_DIR", "hiertx_test_xla_cache_"),
                      ("HIERTX_DATA_CACHE", "hiertx_test_data_cache_")):
  if _var not in os.environ:
    os.environ[_var] = tempfile.mkdtemp(prefix=_prefix)
    atexit.register(shutil.rmtree, os.environ[_var], True)

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def one_device_env() -> dict:
  """The environment for a child process with one CPU device (the tests' XLA
  settings without the 8 simulated devices)."""
  return {**os.environ, "JAX_PLATFORMS": "cpu", "XLA_FLAGS": TEST_XLA_FLAGS}


# Config files of models a test registers (tests/test_adding_a_model.py), by name.
CONFIG_FILES: dict[str, str] = {}


def config_path(name: str) -> str:
  return CONFIG_FILES.get(name) or os.path.join(ROOT, "configs", f"{name}.py")


@pytest.fixture
def tiny_config():
  """Loads `configs/<name>.py:size=tiny` with the trainer's tiny schedule."""
  from hiertx import config as config_lib

  def load(name: str, **overrides):
    c = config_lib.load(config_path(name) + ":size=tiny")
    for dotted, value in overrides.items():
      section, field = dotted.split("__")
      c[section][field] = value
    return c

  return load


# The longest tests, by module or name (about 60-200 s each on 2 busy cores):
# the servers' groups and the multi-process runs. Collected first, so that
# xdist hands them out at the start and the other worker's short tests fill
# in beside them, instead of one long test finishing the session alone.
LONG_FIRST = ("test_object_storage.py", "test_slurm.py",
              "test_a_signal_to_one_process_stops_every_process_at_the_same_step",
              "test_gpu_check_dry_run_ends_in_one_summary_table",
              "test_local_sweep_with_a_failure_then_report_and_rerun",
              "test_sigterm_stops_the_sweep_and_its_runs_resume")


def pytest_collection_modifyitems(items):
  items.sort(key=lambda item: not any(name in item.nodeid for name in LONG_FIRST))
