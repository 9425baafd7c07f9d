"""Orbax checkpoints of the train state, and the resolved config of a workdir.

Layout of a workdir:
  config.json        the resolved config the run was started with
  checkpoints/<step> Orbax checkpoints (params, optimizer state, step)
  metrics.jsonl      scalars per logged step (hiertx.metrics)
  run_info.json      once-per-run facts: memory, FLOPs, params, versions, mesh
"""

import os

import orbax.checkpoint as ocp
from absl import logging

from hiertx import config as config_lib
from hiertx.errors import CheckpointError, HiertxError


def config_path(workdir: str) -> str:
  return os.path.join(workdir, "config.json")


def manager(workdir: str, keep: int = 3) -> ocp.CheckpointManager:
  return ocp.CheckpointManager(
      os.path.join(os.path.abspath(workdir), "checkpoints"),
      options=ocp.CheckpointManagerOptions(max_to_keep=keep, create=True))


def prepare_workdir(workdir: str, config, allow_config_change: bool, write: bool) -> None:
  """Creates the workdir and checks a resumed run matches the one that wrote it."""
  try:
    os.makedirs(workdir, exist_ok=True)
    probe = os.path.join(workdir, ".write_test")
    with open(probe, "w") as f:
      f.write("ok")
    os.remove(probe)
  except OSError as e:
    raise HiertxError(f"workdir {workdir!r} is not writable: {e.strerror}") from e
  path = config_path(workdir)
  if os.path.exists(path) and has_checkpoints(workdir):
    with open(path) as f:
      old = config_lib.from_json(f.read())
    diffs = []
    for section in config_lib.RESUME_SECTIONS:
      diffs += config_lib.differences(old[section].to_dict(), config[section].to_dict(),
                                      section + ".")
    if diffs and not allow_config_change:
      raise CheckpointError(
          f"workdir {workdir!r} holds checkpoints of a run with a different config:\n  "
          + "\n  ".join(diffs)
          + "\nUse a new --workdir, or pass --allow_config_change to resume anyway.")
    if diffs:
      logging.warning("resuming with a changed config: %s", "; ".join(diffs))
  if write:
    with open(path, "w") as f:
      f.write(config_lib.to_json(config))


def has_checkpoints(workdir: str) -> bool:
  root = os.path.join(workdir, "checkpoints")
  return os.path.isdir(root) and any(d.isdigit() for d in os.listdir(root))


def load_config(workdir: str):
  path = config_path(workdir)
  if not os.path.exists(path):
    raise CheckpointError(f"{workdir!r} has no config.json: is it a hiertx workdir?")
  with open(path) as f:
    return config_lib.from_json(f.read())


def save(mngr: ocp.CheckpointManager, step: int, state) -> None:
  mngr.save(step, args=ocp.args.StandardSave(state), force=True)


def restore(mngr: ocp.CheckpointManager, step: int, abstract_state):
  """Restores onto the shardings `abstract_state` carries (any mesh)."""
  return mngr.restore(step, args=ocp.args.StandardRestore(abstract_state))
