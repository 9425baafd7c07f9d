r"""Runs a sweep defined next to a config (`sweep_<name>()` in the config file)
on this machine, as one SLURM job array, or on a TPU VM.

  python launch/sweep.py --config=configs/compare.py --sweep=paper_claim \
      --sweep_dir=/tmp/sweeps/paper_claim --target=local --parallel=1
  python launch/sweep.py ... --target=slurm --partition=gpu --dry_run
  python launch/sweep.py ... --target=tpu --tpu=my-v4-8 --zone=us-central2-b --dry_run
  python launch/sweep.py ... -- --config.data.text_files=corpus/*.txt   # to every run

Each run trains in `<sweep_dir>/<name>`, its name made from its overrides.
Running the same command again skips finished runs and resumes the others
from their checkpoints. `<sweep_dir>/sweep.json` lists the runs for
`launch/report.py`.
"""

import json
import os
import shlex
import signal
import subprocess
import sys
import time

from absl import app, flags

import common
import slurm
import tpu
from hiertx import checkpoint
from hiertx import config as config_lib
from hiertx import sweep
from hiertx.errors import HiertxError

TARGETS = ("local", "slurm", "tpu")


def define_flags() -> None:
  flags.DEFINE_string("config", None, "Config file[:arg] defining sweep_<name>().",
                      required=True)
  flags.DEFINE_string("sweep", None, "Sweep name (the config's sweep_<name>).", required=True)
  flags.DEFINE_string("sweep_dir", None, "Directory of the sweep's runs (default: "
                      "/tmp/hiertx_sweeps/<config>-<sweep>).")
  flags.DEFINE_enum("target", "local", TARGETS, "Where the runs go.")
  flags.DEFINE_integer("parallel", 1, "local: runs at a time.", lower_bound=1)
  flags.DEFINE_bool("pin_cpus", False, "local: each of the --parallel runs on its own share "
                    "of this machine's CPUs (Linux). For CPU training: runs on disjoint cores "
                    "outrun the same runs sharing them all.")
  flags.DEFINE_bool("dry_run", False, "Print what would run instead of running it.")
  # slurm
  flags.DEFINE_integer("nodes", 1, "slurm: hosts per run.", lower_bound=1)
  flags.DEFINE_integer("gpus_per_node", 8, "slurm: GPUs per host (0 for CPU-only).", lower_bound=0)
  flags.DEFINE_string("partition", None, "slurm: partition.")
  flags.DEFINE_string("account", None, "slurm: account.")
  flags.DEFINE_string("time", "24:00:00", "slurm: time limit per run.")
  common.check_slurm_time()
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


def plan(config: str, name: str, sweep_dir: str, extra: list[str]) -> list[dict]:
  """The runs with their workdirs, commands and current state; writes sweep.json."""
  runs = sweep.expand(config, sweep.load(config, name))
  for r in runs:  # a misspelt field or argument fails here, not in every run
    resolved = config_lib.load(r.config)
    for flag in (*r.flags, *extra):
      if flag.startswith("--config."):
        config_lib.apply_override(resolved, flag[len("--config."):])
  out = []
  for r in runs:
    workdir = os.path.join(sweep_dir, r.name)
    cmd = common.train_command(r.config, workdir, [*r.flags, *extra], python=sys.executable)
    out.append({**r.to_dict(), "workdir": workdir, "command": cmd,
                "state": checkpoint.read_status(workdir)["state"]})
  os.makedirs(sweep_dir, exist_ok=True)
  with open(os.path.join(sweep_dir, "sweep.json"), "w") as f:
    json.dump({"config": config, "sweep": name, "extra_flags": extra,
               "runs": [{k: v for k, v in r.items() if k != "state"} for r in out]}, f, indent=2)
  return out


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
  """Runs every unfinished run, `parallel` at a time (with `slots`, each on
  one of those CPU sets, one run per set); returns exit codes by name."""
  todo = [r for r in runs if r["state"] != "finished"]
  for r in runs:
    if r["state"] == "finished":
      print(f"skip {r['name']}: finished", flush=True)
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
      os.makedirs(r["workdir"], exist_ok=True)
      log = open(os.path.join(r["workdir"], "train.log"), "a")  # noqa: SIM115
      verb = "resume" if r["state"] in ("interrupted", "running", "failed") else "start"
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
          status = checkpoint.read_status(r["workdir"])
          if status["state"] not in ("failed", "interrupted"):  # killed before it could say
            checkpoint.write_status(r["workdir"], "failed", returncode=proc.returncode,
                               time=time.time())
          print(f"FAILED {r['name']} (exit {proc.returncode}); see {log.name}", flush=True)
        else:
          print(f"done {r['name']}", flush=True)


def _usable_cpus() -> set[int]:
  if not hasattr(os, "sched_getaffinity"):
    raise HiertxError("--pin_cpus: needs Linux (os.sched_setaffinity); run without it here")
  return os.sched_getaffinity(0)


def _remote(cmd: list[str]) -> list[str]:
  """The command for another machine: its own `python3`, not this venv's path."""
  return ["python3", *cmd[1:]]


def _repo_root() -> str:
  return os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def slurm_script(runs: list[dict], sweep_dir: str, f) -> str:
  """One job array over the unfinished runs; task i runs the i-th command."""
  todo = [r for r in runs if r["state"] != "finished"]
  lines = ["RUNS=("]
  lines += [f"  {shlex.quote(common.show(_remote(r['command'])))}" for r in todo]
  lines.append(")")
  body = "\n".join(lines) + "\nsrun bash -c \"${RUNS[$SLURM_ARRAY_TASK_ID]}\""
  array = f"0-{len(todo) - 1}" + (f"%{f.max_running}" if f.max_running else "")
  return slurm.render(None, sweep_dir, [], f.nodes, f.gpus_per_node, partition=f.partition,
                      account=f.account, time=f.time, job_name=f"sweep-{f.sweep}",
                      setup=f.setup, array=array, body=body)


def tpu_commands(runs: list[dict], f) -> list[str]:
  """One `gcloud ... ssh --worker=all` per unfinished run, in order."""
  out = []
  for r in runs:
    if r["state"] == "finished":
      continue
    remote = f"cd {f.repo_dir} && {f.setup} && {common.show(_remote(r['command']))}"
    out.append(common.show(tpu.render(f.tpu, f.zone, None, None, [], f.project, remote=remote)))
  return out


def main(argv, extra):
  del argv
  f = flags.FLAGS
  sweep_dir = f.sweep_dir or default_dir(f.config, f.sweep)
  try:
    if f.pin_cpus and f.target != "local":
      raise HiertxError(f"--pin_cpus: only for --target=local (got --target={f.target}), "
                        "where this machine's CPUs are shared between runs")
    slots = cpu_slots(max(1, f.parallel), _usable_cpus()) if f.pin_cpus else None
    runs = plan(f.config, f.sweep, sweep_dir, extra)
  except HiertxError as e:
    sys.exit(f"error: {e}")
  finished = sum(r["state"] == "finished" for r in runs)
  print(f"sweep {f.sweep}: {len(runs)} runs in {sweep_dir} ({finished} finished)", flush=True)
  if f.target == "local":
    if f.dry_run:
      for r in runs:
        print(("# finished: " if r["state"] == "finished" else "") + common.show(r["command"]))
      return
    codes = run_local(runs, max(1, f.parallel), slots)
    failed = sorted(n for n, c in codes.items() if c)
    print(f"sweep {f.sweep}: {len(runs) - len(failed)} of {len(runs)} runs finished; "
          f"report: python launch/report.py --sweep_dir={sweep_dir}", flush=True)
    if failed:
      sys.exit(f"failed: {', '.join(failed)}")
    return
  if finished == len(runs):
    print("every run is finished; nothing to submit")
    return
  if f.target == "slurm":
    script = slurm_script(runs, sweep_dir, f)
    if f.dry_run:
      print(script, end="")
      return
    common.require("sbatch", "run this on a SLURM login node")
    path = os.path.join(sweep_dir, "sweep.sbatch")
    with open(path, "w") as out:
      out.write(script)
    sys.exit(subprocess.call(["sbatch", path]))
  if not (f.tpu and f.zone):
    sys.exit("error: --target=tpu needs --tpu and --zone")
  commands = tpu_commands(runs, f)
  print("\n".join(commands), flush=True)
  if not f.dry_run:
    common.require("gcloud", "install the Google Cloud CLI")
    for c in commands:
      if subprocess.call(c, shell=True):
        sys.exit(f"failed: {c}")


if __name__ == "__main__":
  define_flags()
  common.main_guard(app.run, main)
