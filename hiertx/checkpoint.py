"""Orbax checkpoints of the train state, and the resolved config of a workdir.

Layout of a workdir:
  config.json        the resolved config the run was started with
  checkpoints/<step> Orbax checkpoints (params, optimizer state, step)
  metrics.jsonl      scalars per logged step (hiertx.metrics)
  run_info.json      once-per-run facts: memory, FLOPs, params, versions, mesh
  status.json        running, finished, interrupted, or failed with the error
"""

import json
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
  """Starts an (asynchronous) save; Orbax writes to a temporary directory and
  renames it only when complete, so a save cut short is never listed."""
  try:
    mngr.save(step, args=ocp.args.StandardSave(state), force=True)
  except OSError as e:
    raise CheckpointError(f"saving the checkpoint of step {step} failed: {e.strerror or e}; "
                          "earlier checkpoints are intact. Free disk space or point "
                          "--workdir elsewhere, then rerun to resume.") from e


def wait(mngr: ocp.CheckpointManager) -> None:
  """Blocks until pending saves are written; a failed write is a clear error."""
  try:
    mngr.wait_until_finished()
  except OSError as e:
    raise CheckpointError(f"writing a checkpoint failed: {e.strerror or e}; earlier "
                          "checkpoints are intact. Free disk space, then rerun to resume.") from e


def restore(mngr: ocp.CheckpointManager, step: int, abstract_state):
  """Restores onto the shardings `abstract_state` carries (any mesh)."""
  return mngr.restore(step, args=ocp.args.StandardRestore(abstract_state))


def restore_latest(mngr: ocp.CheckpointManager, abstract_state, set_aside: bool):
  """(step, state) of the newest checkpoint that restores, or (None, None).

  A checkpoint that fails to load (truncated or corrupted files) is skipped
  with a warning and, when `set_aside`, renamed to `<step>.corrupt` so the
  next run does not trip on it again; the previous one is used.
  """
  for step in sorted(mngr.all_steps(), reverse=True):
    try:
      return step, restore(mngr, step, abstract_state)
    except Exception as e:  # noqa: BLE001  (Orbax/tensorstore raise many kinds)
      if isinstance(e, HiertxError):
        raise
      path = os.path.join(str(mngr.directory), str(step))
      logging.warning("checkpoint %s cannot be restored (%s: %s); using an older one",
                      path, type(e).__name__, str(e).splitlines()[0][:200] if str(e) else "")
      print(f"warning: checkpoint at step {step} is unreadable; falling back to an older one",
            flush=True)
      if set_aside and os.path.isdir(path):
        os.rename(path, path + ".corrupt")
      mngr.reload()
  return None, None


def read_status(workdir: str) -> dict:
  """{'state': 'finished'|'failed'|'interrupted'|'running', ...}, or 'not started'."""
  try:
    with open(os.path.join(workdir, "status.json")) as f:
      return json.load(f)
  except FileNotFoundError:
    return {"state": "not started"}
  except (OSError, json.JSONDecodeError) as e:
    return {"state": "unknown", "error": str(e)}


def write_status(workdir: str, state: str, **info) -> None:
  tmp = os.path.join(workdir, "status.json.tmp")
  with open(tmp, "w") as f:
    json.dump({"state": state, **info}, f)
  os.replace(tmp, os.path.join(workdir, "status.json"))
