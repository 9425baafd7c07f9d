r"""Runs a sweep defined next to a config (`sweep_<name>()` in the config file)
on this machine, as one SLURM job array, or on a TPU VM.

  python launch/sweep.py --config=configs/compare.py --sweep=paper_claim \
      --sweep_dir=/tmp/sweeps/paper_claim --target=local --parallel=1
  python launch/sweep.py ... --target=slurm --partition=gpu --dry_run
  python launch/sweep.py ... --target=tpu --tpu=my-v4-8 --zone=us-central2-b --dry_run
  python launch/sweep.py ... -- --config.data.text_files=corpus/*.txt   # to every run
  python launch/sweep.py ... --only=seed-1        # the runs whose names match

Each run trains in `<sweep_dir>/<name>`, its name made from its overrides
and kept once given (`sweep.json` records it: a sweep that grows renames
nothing). Running the same command again skips finished runs and runs that
a live process holds (hiertx.lease), and resumes the others from their
checkpoints; with --target=slurm it also skips runs whose array task this
sweep submitted is still queued or running. `<sweep_dir>/sweep.json` lists
the runs for `launch/report.py`.

The sweep directory may be `gs://bucket/...`. For --target=slurm|tpu it
must be given, and be a directory every node shares (a node-local path such
as /tmp is refused): the jobs write their runs there and the report reads
them. docs/clusters.md walks through both.
"""

import json
import os
import re
import shlex
import shutil
import signal
import subprocess
import sys
import tempfile
import time

from absl import app, flags

import common
import slurm
import tpu
from hiertx import checkpoint
from hiertx import config as config_lib
from hiertx import results
from hiertx import storage
from hiertx import grid
from hiertx.errors import HiertxError

TARGETS = ("local", "slurm", "tpu")


def define_flags() -> None:
  flags.DEFINE_string("config", None, "Config file[:arg] defining sweep_<name>().",
                      required=True)
  flags.DEFINE_string("sweep", None, "Sweep name (the config's sweep_<name>).", required=True)
  flags.DEFINE_string("sweep_dir", None, "Directory of the sweep's runs, or gs://... "
                      "(--target=local default: /tmp/hiertx_sweeps/<config>-<sweep>; "
                      "slurm and tpu: required, on storage every node shares).")
  flags.DEFINE_enum("target", "local", TARGETS, "Where the runs go.")
  flags.DEFINE_integer("parallel", 1, "local: runs at a time.", lower_bound=1)
  flags.DEFINE_bool("pin_cpus", False, "local: each of the --parallel runs on its own share "
                    "of this machine's CPUs (Linux). For CPU training: runs on disjoint cores "
                    "outrun the same runs sharing them all.")
  flags.DEFINE_bool("dry_run", False, "Print what would run instead of running it.")
  flags.DEFINE_string("only", None, "Start only the runs whose names match this regular "
                      "expression (e.g. 'seed-1' for one seed of every arm); the sweep and "
                      "its report still hold every run.")
  # slurm
  flags.DEFINE_integer("nodes", 1, "slurm: hosts per run.", lower_bound=1)
  flags.DEFINE_integer("gpus_per_node", 8, "slurm: GPUs per host (0 for CPU-only).", lower_bound=0)
  flags.DEFINE_string("partition", None, "slurm: partition.")
  flags.DEFINE_string("account", None, "slurm: account.")
  slurm.define_time_flags()
  flags.DEFINE_integer("cpus_per_task", 16, "slurm: CPU cores per task.", lower_bound=1)
  flags.DEFINE_string("job_output_dir", None, "slurm: directory of the jobs' output files "
                      "(default: the sweep directory; for a gs:// one, ./slurm_logs).")
  flags.DEFINE_integer("max_running", 0, "slurm: at most this many array tasks at once.",
                       lower_bound=0)
  # tpu
  flags.DEFINE_string("tpu", None, "tpu: TPU VM name.")
  flags.DEFINE_string("zone", None, "tpu: zone.")
  flags.DEFINE_string("project", None, "tpu: GCP project.")
  flags.DEFINE_string("repo_dir", "~/hiertx", "tpu: repository path on the workers.")
  flags.DEFINE_string("setup", "source .venv/bin/activate", "Shell line run before training.")


def default_dir(config: str, name: str) -> str:
  stem = os.path.splitext(os.path.basename(config.partition(":")[0]))[0]
  return os.path.join("/tmp/hiertx_sweeps", f"{stem}-{name}")


def read_spec(sweep_dir: str) -> dict:
  """The sweep's sweep.json, or {} before its first launch."""
  path = storage.join(sweep_dir, "sweep.json")
  return json.loads(storage.read_text(path)) if storage.exists(path) else {}


def plan(config: str, name: str, sweep_dir: str, extra: list[str], write: bool = True
         ) -> list[dict]:
  """The runs with their workdirs, commands and current state ('state', and
  'holder' while a process holds the run); writes sweep.json unless
  `write` is False (a dry run writes nothing). Runs sweep.json already
  names keep their names."""
  spec = read_spec(sweep_dir)
  known = spec.get("named", spec.get("runs", []))
  runs = grid.expand(config, grid.load(config, name), known)
  for r in runs:  # a misspelt field or argument fails here, not in every run
    resolved = config_lib.load(r.config)
    for flag in (*r.flags, *extra):
      if flag.startswith("--config."):
        config_lib.apply_override(resolved, flag[len("--config."):])
  out = []
  for r in runs:
    workdir = storage.join(sweep_dir, r.name)
    cmd = common.train_command(r.config, workdir, [*r.flags, *extra], python=sys.executable)
    status = results.run_state(workdir)
    out.append({**r.to_dict(), "workdir": workdir, "command": cmd, "state": status["state"],
                **({"holder": status["holder"]} if "holder" in status else {})})
  if write:
    storage.makedirs(sweep_dir)
    # Every name ever given, so that runs a sweep drops and adds back keep theirs.
    current = [{k: r[k] for k in ("name", "config", "flags")} for r in out]
    names = {r["name"] for r in current}
    named = current + [k for k in known if k["name"] not in names]
    storage.write_text(storage.join(sweep_dir, "sweep.json"), json.dumps(
        {"config": config, "sweep": name, "extra_flags": extra,
         "runs": [{k: v for k, v in r.items() if k not in ("state", "holder")} for r in out],
         "named": named, "submissions": spec.get("submissions", [])}, indent=2))
  return out


def skip_reason(r: dict) -> str | None:
  """Why a run is not launched: finished, or held by a live process."""
  if r["state"] == "finished":
    return "finished"
  if "holder" in r:
    return f"running ({r['holder']})"
  return None


def cpu_slots(parallel: int, cpus) -> list[set[int]]:
  """`cpus` split into `parallel` disjoint sets of consecutive ids whose sizes
  differ by at most one: the CPUs each of `parallel` local runs may use."""
  cpus = sorted(cpus)
  if parallel > len(cpus):
    raise HiertxError(f"--pin_cpus: {parallel} runs at a time need at least {parallel} CPUs; "
                      f"this process may use {len(cpus)} ({_ids(cpus)})")
  size, extra = divmod(len(cpus), parallel)
  slots, start = [], 0
  for i in range(parallel):
    n = size + (i < extra)
    slots.append(set(cpus[start:start + n]))
    start += n
  return slots


def _ids(cpus) -> str:
  return ",".join(str(c) for c in sorted(cpus))


def run_local(runs: list[dict], parallel: int, slots=None) -> dict[str, int]:
  """Runs every run that is neither finished nor held, `parallel` at a time
  (with `slots`, each on one of those CPU sets, one run per set); returns
  exit codes by name."""
  todo = [r for r in runs if skip_reason(r) is None]
  for r in runs:
    if skip_reason(r):
      print(f"skip {r['name']}: {skip_reason(r)}", flush=True)
  codes, active = {}, []
  # SIGTERM (e.g. a preempted login node) stops the sweep like Ctrl-C: every
  # running trainer gets SIGTERM, saves a checkpoint and exits; rerun to resume.
  old = signal.signal(signal.SIGTERM, _raise_interrupt)
  try:
    _loop(runs, todo, active, codes, parallel, slots)
  except KeyboardInterrupt:
    for _, log, proc, _ in active:
      proc.send_signal(signal.SIGTERM)
    for r, log, proc, _ in active:
      proc.wait()
      log.close()
      print(f"stopped {r['name']} (saved; rerun the sweep to resume)", flush=True)
    sys.exit("sweep interrupted")
  finally:
    signal.signal(signal.SIGTERM, old)
  return codes


def _raise_interrupt(signum, frame):
  del signum, frame
  raise KeyboardInterrupt


def _loop(runs, todo, active, codes, parallel, slots) -> None:
  free = list(slots or [None] * parallel)  # the CPU sets no run holds
  while todo or active:
    while todo and len(active) < parallel:
      r = todo.pop(0)
      log = _RunLog(r["workdir"])
      verb = "resume" if r["state"] in ("interrupted", "stopped", "failed") else "start"
      cpus = free.pop(0)
      where = f"; CPUs {_ids(cpus)}" if cpus else ""
      number = len(runs) - len(todo)  # finished before, done or running here, this one
      print(f"{verb} {r['name']} ({number}/{len(runs)}; log "
            f"{log.name}{where})", flush=True)
      # The child's threads (XLA's pool among them) inherit the set it starts on.
      pin = (lambda: os.sched_setaffinity(0, cpus)) if cpus else None
      active.append((r, log, subprocess.Popen(r["command"], stdout=log, stderr=subprocess.STDOUT,
                                              cwd=_repo_root(), preexec_fn=pin), cpus))
    time.sleep(0.5)
    for item in list(active):
      r, log, proc, cpus = item
      if proc.poll() is not None:
        log.close()
        active.remove(item)
        free.append(cpus)
        codes[r["name"]] = proc.returncode
        if proc.returncode:
          # Killed before it could say (not a run some other process holds).
          if results.run_state(r["workdir"])["state"] in ("stopped", "not started"):
            checkpoint.write_status(r["workdir"], "failed", returncode=proc.returncode,
                                    time=time.time())
          print(f"FAILED {r['name']} (exit {proc.returncode}); see {log.name}", flush=True)
        else:
          print(f"done {r['name']}", flush=True)


class _RunLog:
  """A local run's output file, `<workdir>/train.log`, appended to. For a
  workdir on object storage the trainer's output goes to a local file
  while it runs (a child process writes to a file descriptor), which is
  appended to the workdir's train.log when the run ends."""

  def __init__(self, workdir: str):
    self.workdir = workdir
    if storage.is_url(workdir):
      fd, self.name = tempfile.mkstemp(prefix=f"hiertx-{storage.name(workdir)}-", suffix=".log")
      self._file = os.fdopen(fd, "w")
    else:
      os.makedirs(workdir, exist_ok=True)
      self.name = os.path.join(workdir, "train.log")
      self._file = open(self.name, "a")

  def fileno(self) -> int:
    return self._file.fileno()

  def close(self) -> None:
    self._file.close()
    if storage.is_url(self.workdir):
      log = storage.Appender(storage.join(self.workdir, "train.log"))
      with open(self.name, "rb") as f:
        log.write(f.read())
      log.close()
      os.remove(self.name)


def _usable_cpus() -> set[int]:
  if not hasattr(os, "sched_getaffinity"):
    raise HiertxError("--pin_cpus: needs Linux (os.sched_setaffinity); run without it here")
  return os.sched_getaffinity(0)


def _remote(cmd: list[str]) -> list[str]:
  """The command for another machine: its own `python3`, not this venv's path."""
  return ["python3", *cmd[1:]]


def _repo_root() -> str:
  return os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def slurm_script(todo: list[dict], sweep_dir: str, f) -> str:
  """One job array over `todo`; task i runs the i-th command."""
  lines = ["RUNS=("]
  lines += [f"  {shlex.quote(common.show(_remote(r['command'])))}" for r in todo]
  lines.append(")")
  body = "\n".join(lines) + "\nsrun bash -c \"${RUNS[$SLURM_ARRAY_TASK_ID]}\""
  array = f"0-{len(todo) - 1}" + (f"%{f.max_running}" if f.max_running else "")
  return slurm.render(None, sweep_dir, [], f.nodes, f.gpus_per_node, f.cpus_per_task,
                      partition=f.partition, account=f.account, time=f.time,
                      job_name=f"sweep-{f.sweep}", setup=f.setup, array=array, body=body,
                      logs=slurm.output_dir(f.job_output_dir, sweep_dir),
                      signal_before=f.signal_before)


def queued_runs(sweep_dir: str) -> dict[str, str]:
  """{run name: 'job_task STATE'} of the array tasks this sweep submitted
  that SLURM still has pending or running (squeue); {} without squeue."""
  submissions = read_spec(sweep_dir).get("submissions", [])
  if not submissions or shutil.which("squeue") is None:
    return {}
  # All of this user's jobs, one line per array task: naming the sweep's jobs
  # instead fails as a whole once SLURM has forgotten one of them.
  r = subprocess.run(["squeue", "--me", "--noheader", "--array", "--format=%i %T"],
                     capture_output=True, text=True)
  out = {}
  for line in r.stdout.splitlines():
    task, _, state = line.strip().partition(" ")
    job, _, index = task.partition("_")
    for s in submissions:
      if s["job"] == job and index.isdigit() and int(index) < len(s["runs"]):
        out[s["runs"][int(index)]] = f"{task} {state}"
  return out


def submit_slurm(runs: list[dict], sweep_dir: str, f) -> None:
  """Submits the runs that are neither finished, held nor queued as one job
  array, and records the job in sweep.json."""
  queued = queued_runs(sweep_dir)
  todo = []
  for r in runs:
    why = skip_reason(r) or (f"queued as SLURM job {queued[r['name']]}" if r["name"] in queued
                             else None)
    if why:
      print(f"skip {r['name']}: {why}", flush=True)
    else:
      todo.append(r)
  if not todo:
    print("every run is finished, running or queued; nothing to submit", flush=True)
    return
  script = slurm_script(todo, sweep_dir, f)
  if f.dry_run:
    print(script, end="")
    return
  os.makedirs(slurm.output_dir(f.job_output_dir, sweep_dir), exist_ok=True)
  job = slurm.submit(script, storage.join(sweep_dir, "sweep.sbatch"))
  spec = read_spec(sweep_dir)
  spec["submissions"] = [*spec.get("submissions", []),
                         {"job": job, "runs": [r["name"] for r in todo], "time": time.time()}]
  storage.write_text(storage.join(sweep_dir, "sweep.json"), json.dumps(spec, indent=2))
  print(f"submitted job array {job} ({len(todo)} runs); report: python launch/report.py "
        f"--sweep_dir={sweep_dir}", flush=True)


def tpu_commands(runs: list[dict], f) -> list[str]:
  """One `gcloud ... ssh --worker=all` per run neither finished nor held, in order."""
  out = []
  for r in runs:
    if skip_reason(r):
      continue
    remote = f"cd {f.repo_dir} && {f.setup} && {common.show(_remote(r['command']))}"
    out.append(common.show(tpu.render(f.tpu, f.zone, None, None, [], f.project, remote=remote)))
  return out


def select(runs: list[dict], pattern: str | None) -> list[dict]:
  """The runs whose names match the regular expression `pattern` (--only);
  all of them without one."""
  if pattern is None:
    return runs
  try:
    chosen = [r for r in runs if re.search(pattern, r["name"])]
  except re.error as e:
    raise HiertxError(f"--only={pattern!r}: not a regular expression ({e})") from None
  if not chosen:
    raise HiertxError(f"--only={pattern!r} matches none of the sweep's runs: "
                      + ", ".join(r["name"] for r in runs))
  return chosen


def sweep_dir_of(f) -> str:
  """--sweep_dir, checked for the target; local sweeps have a default."""
  if f.target == "local":
    return storage.absolute(storage.check(f.sweep_dir or default_dir(f.config, f.sweep),
                                          "--sweep_dir"))
  return common.check_shared_dir(f.sweep_dir, "--sweep_dir", f.target)


def main(argv, extra):
  del argv
  f = flags.FLAGS
  try:
    if f.pin_cpus and f.target != "local":
      raise HiertxError(f"--pin_cpus: only for --target=local (got --target={f.target}), "
                        "where this machine's CPUs are shared between runs")
    sweep_dir = sweep_dir_of(f)
    slots = cpu_slots(max(1, f.parallel), _usable_cpus()) if f.pin_cpus else None
    planned = plan(f.config, f.sweep, sweep_dir, extra, write=not f.dry_run)
    runs = select(planned, f.only)
  except HiertxError as e:
    sys.exit(f"error: {e}")
  finished = sum(r["state"] == "finished" for r in runs)
  held = sum("holder" in r for r in runs)
  chosen = f" ({len(runs)} of {len(planned)} by --only)" if f.only is not None else ""
  print(f"sweep {f.sweep}: {len(runs)} runs{chosen} in {sweep_dir} ({finished} finished, "
        f"{held} running)", flush=True)
  if f.target == "local":
    if f.dry_run:
      for r in runs:
        why = skip_reason(r)
        print((f"# {why}: " if why else "") + common.show(r["command"]))
      return
    codes = run_local(runs, max(1, f.parallel), slots)
    failed = sorted(n for n, c in codes.items() if c)
    print(f"sweep {f.sweep}: {len(runs) - len(failed)} of {len(runs)} runs finished; "
          f"report: python launch/report.py --sweep_dir={sweep_dir}", flush=True)
    if failed:
      sys.exit(f"failed: {', '.join(failed)}")
    return
  if f.target == "slurm":
    submit_slurm(runs, sweep_dir, f)
    return
  if not (f.tpu and f.zone):
    sys.exit("error: --target=tpu needs --tpu and --zone")
  commands = tpu_commands(runs, f)
  if not commands:
    print("every run is finished or running; nothing to start")
    return
  print("\n".join(commands), flush=True)
  if not f.dry_run:
    common.require("gcloud", "install the Google Cloud CLI")
    for c in commands:
      if subprocess.call(c, shell=True):
        sys.exit(f"failed: {c}")


if __name__ == "__main__":
  define_flags()
  common.main_guard(app.run, main)
