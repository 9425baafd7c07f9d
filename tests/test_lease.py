"""One owner per run directory (hiertx.lease) and the storage primitives it
stands on, on a local disk (tests/test_object_storage.py does the same on a
GCS server)."""

import json
import os
import subprocess
import sys
import threading
import time

import pytest

from hiertx import lease, storage, train
from hiertx.errors import ConfigError


def test_of_many_processes_taking_a_workdir_at_once_exactly_one_gets_it(tmp_path):
  workdir = str(tmp_path / "run")
  # Eight processes race for the same free workdir; each says whether it won.
  code = ("import sys; from hiertx import lease\n"
          "try:\n  l = lease.acquire(sys.argv[1], 60); print('won', flush=True); "
          "sys.stdin.read(); l.release()\n"
          "except lease.WorkdirHeld as e: print('held', flush=True)")
  procs = [subprocess.Popen([sys.executable, "-c", code, workdir], stdin=subprocess.PIPE,
                            stdout=subprocess.PIPE, text=True) for _ in range(8)]
  answers = [p.stdout.readline().strip() for p in procs]
  for p in procs:
    p.communicate("")
  assert sorted(answers) == ["held"] * 7 + ["won"], answers
  assert lease.state(lease.current(workdir)) == "free"  # the winner released it


def test_a_held_workdir_is_refused_and_a_released_one_is_free(tmp_path):
  workdir = str(tmp_path / "run")
  held = lease.acquire(workdir, timeout_s=60)
  with pytest.raises(lease.WorkdirHeld, match=rf"{workdir} is in use by another run \(host "
                     rf"\S+, pid {os.getpid()}; heartbeat 0 s ago\)"):
    lease.acquire(workdir, timeout_s=60)
  held.release()
  again = lease.acquire(workdir, timeout_s=60)
  assert again.epoch == held.epoch + 1
  assert storage.listdir(os.path.join(workdir, "lease")) == [f"{again.epoch:08d}.json"]
  again.release()
  with pytest.raises(ConfigError, match="config.train.lease_timeout_s: must be a positive"):
    lease.acquire(workdir, timeout_s=0)


def test_the_holder_renews_and_a_silent_holder_is_taken_over(tmp_path, capsys):
  workdir = str(tmp_path / "run")
  held = lease.acquire(workdir, timeout_s=0.4)  # renewed every 0.1 s
  first = lease.current(workdir)["heartbeat"]
  time.sleep(0.5)
  assert lease.current(workdir)["heartbeat"] > first  # beating
  assert lease.state(lease.current(workdir)) == "held"
  # A holder elsewhere that stopped beating: taken over, and said so.
  held._stop.set()
  held._thread.join()
  record = {**lease.current(workdir), "host": "elsewhere", "boot_id": "other"}
  storage.write_text(os.path.join(workdir, "lease", f"{held.epoch:08d}.json"), json.dumps(record))
  time.sleep(0.5)
  assert lease.state(lease.current(workdir)) == "stale"
  taker = lease.acquire(workdir, timeout_s=60)
  said = capsys.readouterr().out
  assert f"warning: took over {workdir} from host elsewhere, pid {os.getpid()}" in said
  assert "(its heartbeat stopped for longer than 0.4 s)" in said
  # The old holder learns at its next renewal that it lost the workdir.
  assert held._renew() is True
  with pytest.raises(lease.LeaseLost, match="another process took over"):
    held.check()
  held.release()  # does not touch the new holder's record
  assert lease.state(lease.current(workdir)) == "held"
  taker.release()


def test_a_holder_that_died_on_this_machine_is_taken_over_at_once(tmp_path, capsys):
  """kill -9 leaves a fresh heartbeat behind; the holder's pid and start time
  show it is gone."""
  workdir = str(tmp_path / "run")
  code = ("import sys, time; from hiertx import lease\n"
          "lease.acquire(sys.argv[1], 300); print('held', flush=True); time.sleep(600)")
  proc = subprocess.Popen([sys.executable, "-c", code, workdir], stdout=subprocess.PIPE, text=True)
  assert proc.stdout.readline().strip() == "held"
  with pytest.raises(lease.WorkdirHeld):
    lease.acquire(workdir, timeout_s=300)
  proc.kill()
  proc.wait()
  taker = lease.acquire(workdir, timeout_s=300)
  assert "(its process on this machine has ended)" in capsys.readouterr().out
  taker.release()


def test_an_earlier_run_of_the_same_slurm_job_is_taken_over_at_once(tmp_path, monkeypatch,
                                                                     capsys):
  workdir = str(tmp_path / "run")
  monkeypatch.setenv("SLURM_JOB_ID", "77")
  monkeypatch.setenv("SLURM_RESTART_COUNT", "0")
  first = lease.acquire(workdir, timeout_s=300)
  first._stop.set()  # killed by the requeue without releasing
  monkeypatch.setenv("SLURM_RESTART_COUNT", "1")
  second = lease.acquire(workdir, timeout_s=300)
  assert "(an earlier run of this SLURM job)" in capsys.readouterr().out
  second.release()


def test_a_trainer_refuses_a_held_workdir_before_writing_anything(tiny_config, tmp_path):
  workdir = str(tmp_path / "run")
  held = lease.acquire(workdir, timeout_s=60)
  try:
    with pytest.raises(lease.WorkdirHeld):
      train.train_and_evaluate(tiny_config("vanilla"), workdir)
  finally:
    held.release()
  assert sorted(os.listdir(workdir)) == ["lease"]


def test_storage_writes_whole_files_and_creates_exclusively(tmp_path):
  path = str(tmp_path / "f.json")
  storage.write_text(path, "one")
  storage.write_text(path, "two")
  assert storage.read_text(path) == "two" and os.listdir(tmp_path) == ["f.json"]  # no leftovers
  results = []
  threads = [threading.Thread(target=lambda i=i: results.append(
      storage.create_exclusive(str(tmp_path / "x"), str(i).encode()))) for i in range(16)]
  for t in threads:
    t.start()
  for t in threads:
    t.join()
  assert sorted(results) == [False] * 15 + [True]
  assert sorted(os.listdir(tmp_path)) == ["f.json", "x"]
  sums = storage.file_checksums(str(tmp_path))
  assert sums["f.json"] == {"size": 3, "crc32c": "52d8b3a3"}  # CRC32C (Castagnoli) of b"two"
