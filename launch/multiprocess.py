r"""Runs N processes on this machine, joined by `jax.distributed` (the real
multi-host code path, on CPU devices): for testing multi-process runs.

  python launch/multiprocess.py --num_processes=2 --devices_per_process=4 \
      --config=configs/vanilla.py:size=tiny --workdir=/tmp/mp
  python launch/multiprocess.py ... --dry_run

Process 0 is the coordinator on localhost:--port; each process gets
JAX_PLATFORMS=cpu and --xla_force_host_platform_device_count. Output of
process i goes to <workdir>/process_<i>.log (process 0 also to the console;
for a gs:// workdir, to a local directory it names).
"""

import os
import socket
import subprocess
import sys
import tempfile

from absl import app, flags

import common
from hiertx import storage


def define_flags() -> None:
  flags.DEFINE_string("config", None, "Config file[:arg].", required=True)
  flags.DEFINE_string("workdir", None, "Run directory.", required=True)
  flags.DEFINE_integer("num_processes", 2, "Processes to start.", lower_bound=1)
  flags.DEFINE_integer("devices_per_process", 4, "CPU devices per process.", lower_bound=1)
  flags.DEFINE_integer("port", 0, "Coordinator port (0: pick a free one).", lower_bound=0)
  flags.DEFINE_enum("module", "hiertx.train", ["hiertx.train", "hiertx.evaluate"],
                    "Entry point every process runs.")
  flags.DEFINE_bool("dry_run", False, "Print the commands instead of running them.")


def free_port() -> int:
  with socket.socket() as s:
    s.bind(("localhost", 0))
    return s.getsockname()[1]


def commands(config, workdir, overrides, n, devices, port, module="hiertx.train"):
  """(env additions, argv) for each process."""
  out = []
  for i in range(n):
    env = {"JAX_PLATFORMS": "cpu",
           "XLA_FLAGS": f"--xla_force_host_platform_device_count={devices}"}
    args = ([sys.executable, "-m", module, f"--workdir={workdir}"]
            + ([f"--config={config}"] if module == "hiertx.train" else [])
            + [f"--coordinator_address=localhost:{port}", f"--num_processes={n}",
               f"--process_id={i}", *overrides])
    out.append((env, args))
  return out


def run(procs, workdir) -> int:
  logs = tempfile.mkdtemp(prefix="hiertx-multiprocess-") if storage.is_url(workdir) else workdir
  os.makedirs(logs, exist_ok=True)
  running = []
  for i, (env, args) in enumerate(procs):
    log = open(os.path.join(logs, f"process_{i}.log"), "w")
    running.append((subprocess.Popen(args, env={**os.environ, **env}, stdout=log,
                                     stderr=subprocess.STDOUT), log))
  codes = [p.wait() for p, _ in running]
  for _, log in running:
    log.close()
  with open(os.path.join(logs, "process_0.log")) as f:
    sys.stdout.write(f.read())
  for i, c in enumerate(codes):
    if c:
      print(f"process {i} exited with {c}; see {logs}/process_{i}.log", file=sys.stderr)
  return max(codes, key=abs)


def main(argv, overrides):
  del argv
  port = flags.FLAGS.port or free_port()
  f = flags.FLAGS
  procs = commands(f.config, f.workdir, overrides, f.num_processes, f.devices_per_process, port,
                   flags.FLAGS.module)
  for env, args in procs:
    print(" ".join(f"{k}={v}" for k, v in env.items()), common.show(args), flush=True)
  if not flags.FLAGS.dry_run:
    sys.exit(run(procs, flags.FLAGS.workdir))


if __name__ == "__main__":
  define_flags()
  common.main_guard(app.run, main)
