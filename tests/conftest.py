"""Test setup: 8 simulated CPU devices (set before jax is imported) and helpers."""

import os

os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "")
                           + " --xla_force_host_platform_device_count=8").strip()
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

import pytest  # noqa: E402

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def config_path(name: str) -> str:
  return os.path.join(ROOT, "configs", f"{name}.py")


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
