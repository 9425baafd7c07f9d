"""Orbax checkpoints of a run, the resolved config of a workdir, and its status.

Layout of a workdir:
  config.json        the resolved config the run was started with
  checkpoints/<step> Orbax checkpoints, three items (docs/design.md section 8):
                       params     the model's parameters
                       opt_state  the optimizer's state
                       meta       JSON: the step, and the data position
  metrics.jsonl      scalars per logged step (hiertx.metrics)
  run_info.json      once-per-run facts: memory, FLOPs, params, versions, mesh
  status.json        running, finished, interrupted, or failed with the error

Inference (`hiertx.evaluate`, `hiertx.generate`) restores `params` alone.

A workdir may be a local path or a URL (`gs://bucket/run`): every file goes
through hiertx.storage, checkpoints through Orbax (tensorstore writes the
arrays).

Each saved checkpoint gets a manifest of its files' sizes and CRC32C
checksums (`<step>/hiertx_files.json`, written once Orbax has finalized
it), so damage is told apart from everything else: a restore that fails on
a checkpoint whose files no longer match it names the files.

Restoring tells causes apart: a checkpoint whose damage is positively
identified (files that no longer match its manifest, an empty or
undecodable file, or an older checkpoint restores where it failed) is set
aside as `<step>.corrupt` and the one before it used;
a failure shared by every checkpoint with no damaged file (the code or the
environment) is reported once and nothing is renamed; one that does not fit
the model (another structure or shape) is a `CheckpointError` naming the
first difference, and nothing is renamed; a transient storage error is tried
again a few times and then reported. When checkpoints exist and none can be
read, or all were set aside, the run stops rather than starting over, until
it is told to (`--restart_from_scratch`).
"""

import errno
import json
import os
import re
import time

import jax
import numpy as np
import orbax.checkpoint as ocp
from absl import logging
from etils import epath

from hiertx import config as config_lib
from hiertx import storage
from hiertx.errors import CheckpointError, HiertxError

ITEMS = ("params", "opt_state", "meta")
# Errors of the storage itself, worth trying again (GCS and network file
# systems raise these under load), as opposed to files that are damaged.
_TRANSIENT_ERRNOS = {errno.EIO, errno.EAGAIN, errno.ETIMEDOUT, errno.ECONNRESET, errno.EBUSY,
                     errno.ECONNREFUSED, errno.ENETUNREACH}
_TRANSIENT_WORDS = ("DEADLINE_EXCEEDED", "UNAVAILABLE", "RESOURCE_EXHAUSTED", "Connection reset",
                    "timed out", "Temporary failure")
# HTTP's "try again" statuses, as numbers of their own: a file name such as
# Orbax's hashes (c01bc2503756...) must not read as one.
_TRANSIENT_STATUS = re.compile(r"(?<![\w.])(429|503)(?![\w.])")
RETRIES = 3
MANIFEST = "hiertx_files.json"


def config_path(workdir: str) -> str:
  return storage.join(workdir, "config.json")


def manager(workdir: str, keep: int = 3) -> ocp.CheckpointManager:
  return ocp.CheckpointManager(
      epath.Path(storage.join(storage.absolute(workdir), "checkpoints")),
      options=ocp.CheckpointManagerOptions(max_to_keep=keep, create=True),
      item_handlers={"params": ocp.StandardCheckpointHandler(),
                     "opt_state": ocp.StandardCheckpointHandler(),
                     "meta": ocp.JsonCheckpointHandler()})


def prepare_workdir(workdir: str, config, allow_config_change: bool, write: bool) -> None:
  """Creates the workdir and checks a resumed run matches the one that wrote it."""
  ensure_writable(workdir)
  path = config_path(workdir)
  if storage.exists(path) and has_checkpoints(workdir):
    old = config_lib.from_json(storage.read_text(path))
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
    storage.write_text(path, config_lib.to_json(config))


def ensure_writable(workdir: str) -> None:
  """Creates the workdir; one error line when it cannot be written."""
  try:
    storage.makedirs(workdir)
    probe = storage.join(workdir, f".write_test.{os.getpid()}")  # one per process
    storage.write_text(probe, "ok")
    storage.remove(probe)
  except OSError as e:
    raise HiertxError(f"workdir {workdir!r} is not writable: {e.strerror or e}") from e


def has_checkpoints(workdir: str) -> bool:
  return any(d.isdigit() for d in storage.listdir(storage.join(workdir, "checkpoints")))


def load_config(workdir: str):
  path = config_path(storage.check(workdir, "--workdir"))
  if not storage.exists(path):
    raise CheckpointError(f"{workdir!r} has no config.json: is it a hiertx workdir?")
  return config_lib.from_json(storage.read_text(path))


# ----------------------------------------------------------------------------
# Saving.


def save(mngr: ocp.CheckpointManager, step: int, state) -> None:
  """Starts an (asynchronous) save of the train state as three items; Orbax
  writes to a temporary directory and renames it only when complete, so a
  save cut short is never listed. The data position is the step: batches are
  a function of it (hiertx.data)."""
  meta = {"step": int(step), "data": {"step": int(step)}, "format": 2}
  try:
    mngr.save(step, args=ocp.args.Composite(
        params=ocp.args.StandardSave(state.params),
        opt_state=ocp.args.StandardSave(state.opt_state),
        meta=ocp.args.JsonSave(meta)), force=True)
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


def write_manifests(mngr: ocp.CheckpointManager, below: int | None = None) -> None:
  """Writes the manifest (each file's size and CRC32C) of every checkpoint
  that has none, of steps below `below` (all with None). Orbax starts a save
  only once the previous one is finalized, so after `save(mngr, step)` every
  step below `step` is complete, and after `wait` every step is (process 0
  calls this at both places)."""
  for step in mngr.all_steps():
    if below is not None and step >= below:
      continue
    step_dir = _step_dir(mngr, step)
    path = storage.join(step_dir, MANIFEST)
    try:
      if storage.exists(path) or not storage.isdir(step_dir):
        continue
      files = storage.file_checksums(step_dir)
      files.pop(MANIFEST, None)
      storage.write_text(path, json.dumps({"step": int(step), "files": files}, indent=1))
    except FileNotFoundError:  # deleted by Orbax (max_to_keep) while being read
      continue


# ----------------------------------------------------------------------------
# Restoring.


class Unreadable(CheckpointError):
  """A checkpoint's files are missing, truncated or do not decode."""


def _step_dir(mngr, step: int) -> str:
  return storage.join(str(mngr.directory), str(step))


def _legacy(mngr, step: int) -> bool:
  """Checkpoints of earlier versions hold the whole train state as one item."""
  return storage.isdir(storage.join(_step_dir(mngr, step), "default"))


def _is_transient(e: BaseException) -> bool:
  if isinstance(e, (TimeoutError, ConnectionError)):
    return True
  if isinstance(e, OSError) and e.errno in _TRANSIENT_ERRNOS:
    return True
  return any(w in str(e) for w in _TRANSIENT_WORDS) or bool(_TRANSIENT_STATUS.search(str(e)))


def _first_mismatch(saved, wanted, path="") -> str | None:
  """The first place two trees of (shape-carrying) leaves differ, in words."""
  if isinstance(wanted, dict) or isinstance(saved, dict):
    if not (isinstance(wanted, dict) and isinstance(saved, dict)):
      return f"{path or '/'} is {_kind(saved)} in the checkpoint and {_kind(wanted)} here"
    for key in sorted(set(saved) | set(wanted)):
      if key not in saved:
        return f"{path}/{key} is missing from the checkpoint"
      if key not in wanted:
        return f"{path}/{key} is in the checkpoint but not in this model"
      found = _first_mismatch(saved[key], wanted[key], f"{path}/{key}")
      if found:
        return found
    return None
  a, b = tuple(getattr(saved, "shape", ())), tuple(getattr(wanted, "shape", ()))
  if a != b:
    return f"{path} has shape {a} in the checkpoint and {b} here"
  return None


def _kind(x) -> str:
  return "a subtree" if isinstance(x, dict) else f"an array {tuple(getattr(x, 'shape', ()))}"


def _plain(tree):
  """Nested dicts of a state-like pytree (flax structs, FrozenDicts, optax
  states, Orbax's metadata trees)."""
  if hasattr(tree, "tree") and not hasattr(tree, "shape"):  # Orbax metadata wrapper
    tree = tree.tree
  if isinstance(tree, tuple) and hasattr(tree, "_fields"):  # namedtuple (optax states)
    return {str(i): _plain(v) for i, v in enumerate(tree)}
  if hasattr(tree, "items"):
    return {str(k): _plain(v) for k, v in tree.items()}
  if isinstance(tree, (list, tuple)) and not hasattr(tree, "shape"):
    return {str(i): _plain(v) for i, v in enumerate(tree)}
  if hasattr(tree, "__dataclass_fields__") and not hasattr(tree, "shape"):
    return {k: _plain(getattr(tree, k)) for k in tree.__dataclass_fields__}
  return tree


def _check_fits(mngr, step: int, abstract_params) -> None:
  """Compares the saved parameters' metadata with the model's: unreadable
  metadata means damaged files; a structure or shape mismatch is the user's.
  (The optimizer state mirrors the parameters, so they decide.)"""
  if _legacy(mngr, step):
    return  # earlier versions' single item has no metadata without its handler
  item = "params"
  try:
    saved = mngr.item_metadata(step)[item]
  except Exception as e:  # Orbax/tensorstore raise many kinds
    if _is_transient(e):
      raise
    raise Unreadable(f"the checkpoint at step {step} cannot be read: "
                     f"{type(e).__name__}: {_first_line(e)}") from e
  if saved is None:
    raise Unreadable(f"the checkpoint at step {step} has no parameter metadata")
  saved = _plain(saved)
  found = _first_mismatch(saved, _plain(abstract_params), "params")
  if found:
      raise CheckpointError(
          f"the checkpoint at step {step} in {mngr.directory} does not fit this model: {found}. "
          "Nothing was changed. It was written by a run with another model config; resume "
          "with that config, or train this one in a new --workdir.")


def _first_line(e: BaseException) -> str:
  """The first line of an error, without what a user cannot act on (a
  TensorStore pointer to a bound C++ method)."""
  text = str(e).strip()
  text = text.splitlines()[0] if text else ""
  text = re.split(r"\.?\s*See full TensorStore details", text)[0]
  return re.sub(r"<bound method [^>]*>?", "", text).strip()[:200]


def damaged_files(step_dir: str) -> list[str]:
  """Files of a checkpoint that are positively damaged, each with what is
  wrong ('params/d/ab12: 20 bytes, 1972 when saved'). With a manifest: files
  missing, or whose size or CRC32C differ from it. Without one (older
  checkpoints): empty files, and JSON that does not parse. Empty means none
  were found, not that the checkpoint is whole."""
  notes = []
  try:
    manifest = json.loads(storage.read_text(storage.join(step_dir, MANIFEST)))["files"]
  except FileNotFoundError:
    manifest = None
  except (OSError, ValueError, KeyError, TypeError):
    manifest, notes = None, [f"{MANIFEST}: unreadable"]
  # Without a manifest only sizes and JSON are judged: no checksums to read.
  found = storage.file_checksums(step_dir, checksums=manifest is not None)
  found.pop(MANIFEST, None)
  if manifest is not None:
    out = []
    for rel, want in sorted(manifest.items()):
      have = found.get(rel)
      if have is None:
        out.append(f"{rel}: missing")
      elif have["size"] != want["size"]:
        out.append(f"{rel}: {have['size']} bytes, {want['size']} when saved")
      elif want.get("crc32c") and have.get("crc32c") and have["crc32c"] != want["crc32c"]:
        out.append(f"{rel}: CRC32C {have['crc32c']}, {want['crc32c']} when saved")
    return out
  out = notes
  for rel, info in sorted(found.items()):
    if info["size"] == 0:
      out.append(f"{rel}: empty")
    elif rel.endswith(("METADATA", ".json")) and info["size"] < 1 << 24:
      try:
        json.loads(storage.read_text(storage.join(step_dir, rel)))
      except (OSError, ValueError):
        out.append(f"{rel}: does not decode")
  return out


def _with_retries(fn, what: str):
  for attempt in range(RETRIES):
    try:
      return fn()
    except HiertxError:  # includes Unreadable: damaged files are not retried
      raise
    except Exception as e:  # only a transient storage error is retried; the rest re-raised
      if not _is_transient(e):
        raise
      if attempt == RETRIES - 1:
        raise CheckpointError(f"{what} failed {RETRIES} times with a storage error "
                              f"({type(e).__name__}: {_first_line(e)}); the checkpoint was "
                              "left as it is. Check the storage, then rerun.") from e
      logging.warning("%s: %s; trying again", what, _first_line(e))
      time.sleep(0.5 * 2 ** attempt)
  raise AssertionError("unreachable")


def restore(mngr: ocp.CheckpointManager, step: int, abstract_state):
  """The train state of `step`, onto the shardings `abstract_state` carries
  (any mesh). Raises CheckpointError (does not fit, or storage failing) or
  Unreadable (damaged files)."""
  legacy = _legacy(mngr, step)
  args = ocp.args.Composite(params=ocp.args.StandardRestore(abstract_state.params),
                            opt_state=ocp.args.StandardRestore(abstract_state.opt_state),
                            meta=ocp.args.JsonRestore())
  what = f"restoring the checkpoint at step {step}"
  _with_retries(lambda: _check_fits(mngr, step, abstract_state.params), what)

  def load():
    try:
      if legacy:  # one unnamed item: read by a manager of its own
        with ocp.CheckpointManager(mngr.directory) as old:
          return old.restore(step, args=ocp.args.StandardRestore(abstract_state))
      return mngr.restore(step, args=args)
    except HiertxError:
      raise
    except Exception as e:  # any other failure to read means the checkpoint is unreadable
      if _is_transient(e):
        raise
      raise Unreadable(f"the checkpoint at step {step} cannot be read: "
                       f"{type(e).__name__}: {_first_line(e)}") from e

  out = _with_retries(load, what)
  if legacy:
    return out
  step_array = jax.device_put(np.asarray(out["meta"]["step"], np.int32),
                              abstract_state.step.sharding)
  return type(abstract_state)(step=step_array, params=out["params"],
                              opt_state=out["opt_state"])


def restore_params(mngr: ocp.CheckpointManager, step: int, abstract_state):
  """The parameters of `step` alone (inference), onto the shardings
  `abstract_state.params` carries; the optimizer state is not read."""
  if _legacy(mngr, step):
    return restore(mngr, step, abstract_state).params
  what = f"restoring the parameters at step {step}"
  _with_retries(lambda: _check_fits(mngr, step, abstract_state.params), what)
  return _with_retries(lambda: mngr.restore(step, args=ocp.args.Composite(
      params=ocp.args.StandardRestore(abstract_state.params)))["params"], what)


def set_aside_dirs(mngr: ocp.CheckpointManager) -> list[str]:
  """Checkpoints earlier runs set aside as unreadable (`<step>.corrupt`)."""
  return sorted((d for d in storage.listdir(str(mngr.directory)) if d.endswith(".corrupt")),
                key=lambda d: int(d.split(".")[0]) if d.split(".")[0].isdigit() else -1)


def restore_latest(mngr: ocp.CheckpointManager, abstract_state, set_aside: bool,
                   restart_from_scratch: bool = False):
  """(step, state) of the newest checkpoint that restores, or (None, None) when
  there are none.

  A checkpoint is set aside as `<step>.corrupt` (when `set_aside`; process 0
  of a multi-process run) only when its damage is positively identified: a
  file of it is empty or does not decode (`damaged_files`), or an older
  checkpoint restores where it failed. When none restores and no file is
  damaged, the cause is the code or the environment, not the files: that
  error is reported once and nothing is renamed. A workdir whose checkpoints
  were all set aside does not start over unless `restart_from_scratch`.
  """
  steps = sorted(mngr.all_steps(), reverse=True)
  if not steps:
    aside = set_aside_dirs(mngr)
    if aside and not restart_from_scratch:
      raise CheckpointError(
          f"{mngr.directory} holds no readable checkpoint, only ones set aside as unreadable "
          f"({', '.join(aside)}). The run does not start over on its own: pass "
          "--restart_from_scratch to train from step 0 (they are kept), or move them away.")
    return None, None
  failed = []  # (step, Unreadable), newest first

  def put_aside(step, text):
    path = _step_dir(mngr, step)
    logging.info("%s; set aside as %s.corrupt", text, step)
    print(f"warning: {text}; set aside as {step}.corrupt", flush=True)
    if set_aside and storage.isdir(path):
      storage.rename(path, path + ".corrupt")

  for step in steps:
    try:
      state = restore(mngr, step, abstract_state)
    except Unreadable as e:
      bad = damaged_files(_step_dir(mngr, step))
      logging.info("restoring step %d failed; damaged files: %s", step, bad or "none found",
                   exc_info=e.__cause__ or e)
      if bad:
        put_aside(step, f"the checkpoint at step {step} is damaged: {'; '.join(bad[:3])}"
                  + (f" and {len(bad) - 3} more" if len(bad) > 3 else ""))
        mngr.reload()
      else:
        failed.append((step, e))
      continue
    for s, e in failed:  # failed where an older one restores: their own files
      put_aside(s, f"{e} (the checkpoint at step {step} restores)")
    if failed:
      mngr.reload()
    return step, state
  if failed:
    step, e = failed[0]
    # The library's own account (tensorstore specs and all) goes to the log file.
    logging.info("restoring failed for steps %s", [s for s, _ in failed], exc_info=e.__cause__)
    raise CheckpointError(
        f"{e}; {'every checkpoint fails' if len(failed) > 1 else 'it fails'} without any "
        "damaged file, so the cause is likely the code or the environment (library versions, "
        f"devices), not the files: nothing was renamed. Details are in the log.") from e
  raise CheckpointError(
      f"none of the checkpoints in {mngr.directory} can be read (set aside: "
      f"{', '.join(set_aside_dirs(mngr))}). The run does not start over on its own: pass "
      "--restart_from_scratch to train from step 0 (they are kept), or move them away.")


# ----------------------------------------------------------------------------
# Run status, which sweeps read.


def read_status(workdir: str) -> dict:
  """{'state': 'finished'|'failed'|'interrupted'|'running', ...}, or 'not started'."""
  try:
    return json.loads(storage.read_text(storage.join(workdir, "status.json")))
  except FileNotFoundError:
    return {"state": "not started"}
  except (OSError, ValueError) as e:
    return {"state": "unknown", "error": str(e)}


def write_status(workdir: str, state: str, **info) -> None:
  storage.write_text(storage.join(workdir, "status.json"), json.dumps({"state": state, **info}))
