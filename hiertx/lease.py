"""One owner per run directory: a lease that the trainer holds while it runs.

The lease is a directory of records, `<workdir>/lease/<epoch>.json`, the
newest epoch being the one in force:

  {"host": ..., "pid": ..., "job": SLURM job id or null, "restart": ...,
   "started": t, "heartbeat": t, "timeout_s": T, "released": false}

Taking it creates the next epoch's file with an exclusive create (GCS:
`ifGenerationMatch=0`; locally a hard link), so of two processes that want a
workdir at the same moment exactly one gets it; the other stops with one
line naming the holder. The holder rewrites its own record every
`timeout_s / 4` seconds (its heartbeat) and marks it released when it exits.
A record whose heartbeat is older than its `timeout_s` belongs to a holder
that crashed or was killed: the next process takes over (a new epoch) and
says so. Two kinds of holder are known dead at once and taken over without
waiting: a process of this machine (same boot) that no longer exists (its
pid and start time, so a reused pid does not count), and an earlier run of
the same SLURM job (SLURM starts a requeued job only once the previous
run's processes are gone).

A holder that finds a newer epoch than its own when renewing has lost the
lease (it stalled past its timeout and another process took over); the
trainer then stops without saving (`Lease.check`). Only process 0 of a
multi-process run holds the lease.
"""

import json
import os
import socket
import threading
import time

from absl import logging

from hiertx import storage
from hiertx.errors import ConfigError, HiertxError

DIRECTORY = "lease"


class WorkdirHeld(HiertxError):
  """Another live process holds the run directory."""


class LeaseLost(HiertxError):
  """Another process took the run directory over while this one held it."""


def _epoch_path(workdir: str, epoch: int) -> str:
  return storage.join(workdir, DIRECTORY, f"{epoch:08d}.json")


def _epochs(workdir: str) -> list[int]:
  names = storage.listdir(storage.join(workdir, DIRECTORY))
  return sorted(int(n[:-5]) for n in names if n.endswith(".json") and n[:-5].isdigit())


def _job() -> tuple[str | None, int]:
  """(SLURM job id, restart count) of this process, or (None, 0)."""
  return os.environ.get("SLURM_JOB_ID"), int(os.environ.get("SLURM_RESTART_COUNT", "0") or 0)


def _boot_id() -> str | None:
  """This machine's boot (Linux): equal boot ids mean the same running kernel."""
  try:
    with open("/proc/sys/kernel/random/boot_id") as f:
      return f.read().strip()
  except OSError:
    return None


def _start_time(pid: int) -> str | None:
  """When process `pid` started, in clock ticks since boot (Linux), or None."""
  try:
    with open(f"/proc/{pid}/stat") as f:
      return f.read().rsplit(")", 1)[1].split()[19]
  except (OSError, IndexError):
    return None


def _gone(record: dict) -> bool:
  """Whether the holder was a process of this machine that has ended."""
  boot = _boot_id()
  if boot is None or record.get("boot_id") != boot or "pid_start" not in record:
    return False
  return _start_time(record["pid"]) != record["pid_start"]


def current(workdir: str) -> dict | None:
  """The record in force (with its 'epoch'), or None when the workdir has
  never been held. An unreadable record reads as {'unreadable': True}."""
  epochs = _epochs(workdir)
  if not epochs:
    return None
  try:
    record = json.loads(storage.read_text(_epoch_path(workdir, epochs[-1])))
  except FileNotFoundError:  # released and cleaned up between listing and reading
    return current(workdir) if _epochs(workdir) != epochs else None
  except ValueError:
    record = {"unreadable": True}
  return {**record, "epoch": epochs[-1]}


def state(record: dict | None, now: float | None = None) -> str:
  """'free' (never held or released), 'held' (a live heartbeat) or 'stale'."""
  if record is None or record.get("released"):
    return "free"
  if record.get("unreadable"):
    return "stale"
  now = time.time() if now is None else now
  if now - record["heartbeat"] > record["timeout_s"] or _gone(record):
    return "stale"
  return "held"


def describe(record: dict, now: float | None = None) -> str:
  """'host h, pid 12, SLURM job 34; heartbeat 5 s ago'."""
  if record.get("unreadable"):
    return "an unreadable lease record"
  now = time.time() if now is None else now
  job = f", SLURM job {record['job']}" if record.get("job") else ""
  return (f"host {record['host']}, pid {record['pid']}{job}; heartbeat "
          f"{now - record['heartbeat']:.0f} s ago")


def _earlier_run_of_this_job(record: dict) -> bool:
  job, restart = _job()
  return bool(job) and record.get("job") == job and record.get("restart", 0) < restart


class Lease:
  """The lease of one workdir, held by this process until `release()`."""

  def __init__(self, workdir: str, epoch: int, record: dict):
    self.workdir, self.epoch, self.record = workdir, epoch, record
    self.lost_to: dict | None = None
    self._stop = threading.Event()
    self._thread = threading.Thread(target=self._beat, name="hiertx-lease", daemon=True)
    self._thread.start()

  @property
  def interval_s(self) -> float:
    return max(self.record["timeout_s"] / 4, 0.1)

  def _beat(self) -> None:
    while not self._stop.wait(self.interval_s):
      try:
        if self._renew():
          return
      except Exception as e:  # noqa: BLE001  (storage hiccups: try again next beat)
        logging.warning("renewing the lease of %s failed: %s", self.workdir, e)

  def _renew(self) -> bool:
    """One heartbeat; True once the lease is lost."""
    newer = [e for e in _epochs(self.workdir) if e > self.epoch]
    if newer:
      self.lost_to = current(self.workdir) or {"unreadable": True}
      logging.error("lost the lease of %s to %s", self.workdir, describe(self.lost_to))
      return True
    self.record["heartbeat"] = time.time()
    storage.write_text(_epoch_path(self.workdir, self.epoch), json.dumps(self.record))
    return False

  def check(self) -> None:
    """Raises LeaseLost once another process has taken the workdir over."""
    if self.lost_to is not None:
      raise LeaseLost(f"another process took over {self.workdir} ({describe(self.lost_to)}) "
                      "while this one was not renewing its lease (stalled for longer than "
                      f"train.lease_timeout_s={self.record['timeout_s']:g}); this one stopped "
                      "without saving, and the other goes on from the last checkpoint")

  def release(self) -> None:
    """Marks the lease released (unless it was lost); stops the heartbeat."""
    self._stop.set()
    self._thread.join(timeout=30)
    if self.lost_to is None and max(_epochs(self.workdir), default=-1) <= self.epoch:
      self.record.update(released=True, heartbeat=time.time())
      storage.write_text(_epoch_path(self.workdir, self.epoch), json.dumps(self.record))


def acquire(workdir: str, timeout_s: float) -> Lease:
  """Takes the workdir's lease, or raises WorkdirHeld naming its live holder.
  A stale holder's lease is taken over, and that is printed and logged."""
  if isinstance(timeout_s, bool) or not isinstance(timeout_s, (int, float)) or not timeout_s > 0:
    raise ConfigError("train.lease_timeout_s", f"must be a positive number of seconds, got "
                      f"{timeout_s!r}")
  storage.makedirs(storage.join(workdir, DIRECTORY))
  for _ in range(5):  # each lost race re-reads the record that won it
    prev = current(workdir)
    if state(prev) == "held" and not _earlier_run_of_this_job(prev):
      raise WorkdirHeld(
          f"{workdir} is in use by another run ({describe(prev)}); it renews its lease every "
          f"{prev['timeout_s'] / 4:.0f} s. Wait for it to end, stop it, or use another "
          "--workdir. A holder whose heartbeat stops for its timeout "
          f"({prev['timeout_s']:g} s) is taken over.")
    epoch = prev["epoch"] + 1 if prev else 0
    job, restart = _job()
    now = time.time()
    record = {"host": socket.gethostname(), "pid": os.getpid(), "job": job, "restart": restart,
              "started": now, "heartbeat": now, "timeout_s": float(timeout_s),
              "released": False, "boot_id": _boot_id(), "pid_start": _start_time(os.getpid())}
    if storage.create_exclusive(_epoch_path(workdir, epoch), json.dumps(record).encode()):
      if state(prev) != "free":
        why = ("an earlier run of this SLURM job" if _earlier_run_of_this_job(prev) else
               "its process on this machine has ended" if _gone(prev) else
               f"its heartbeat stopped for longer than {prev.get('timeout_s', 0):g} s")
        text = f"took over {workdir} from {describe(prev)} ({why})"
        print(f"warning: {text}", flush=True)
        logging.warning(text)
      for old in _epochs(workdir):  # earlier epochs say nothing more
        if old < epoch:
          storage.remove(_epoch_path(workdir, old))
      return Lease(workdir, epoch, record)
  raise WorkdirHeld(f"{workdir}: kept losing the race for its lease to other processes "
                    f"(now {describe(current(workdir) or {'unreadable': True})})")
