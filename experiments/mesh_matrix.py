r"""Every mesh of N devices over (data, fsdp, tensor), in one process and in
two, for each tiny model: trains with one device's first-step loss, or is
refused in one line. A cell that does anything else (a traceback, another
loss) is a defect.

  python experiments/mesh_matrix.py                       # 8 devices; 1 and 2 processes
  python experiments/mesh_matrix.py --set=model.num_heads=8 --set=model.d_model=64 \
      --set=model.mlp_dim=128                             # widths every tensor size fits
  python experiments/mesh_matrix.py --models='vanilla.py:size=tiny' --processes=1

Each model is built from `configs/<file>` (overrides after ';', `--set` for
all), and trained one step on a fixed batch of random bytes, two documents a
row; each process feeds the rows of its place along the batch axes.
"""

import json
import os
import subprocess
import sys
import tempfile
import traceback

import numpy as np
from absl import app, flags

from hiertx import cli, results, sharding

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
MODELS = ("vanilla.py:size=tiny", "bottom_up.py:size=tiny", "top_down.py:size=tiny",
          "retina.py:size=tiny", "hourglass.py:size=tiny",
          "hourglass.py:size=tiny;model.hierarchy='1@1 1@4 1@1';model.boundaries=dynamic")
RTOL = 2e-5  # float32 round-off of other reduction orders (tests/test_sharding.py)


def define_flags() -> None:
  flags.DEFINE_multi_string("models", list(MODELS), "configs/<file>[:arg][;field=value...] "
                            "of each model.")
  flags.DEFINE_multi_string("set", [], "dotted.field=value applied to every model.")
  flags.DEFINE_integer("devices", 8, "Devices of every mesh.", lower_bound=1)
  flags.DEFINE_multi_integer("processes", [1, 2], "Process counts to run the meshes on "
                             "(each must divide --devices).", lower_bound=1)
  flags.DEFINE_string("worker", None, "Internal: a JSON job for one process of a run.")


def load(spec: str, common: list[str]):
  from hiertx import config as config_lib  # after the worker's jax setup
  path, *overrides = spec.split(";")
  config = config_lib.load(os.path.join(ROOT, "configs", path))
  for item in [*common, *overrides]:
    config_lib.apply_override(config, item)
  return config


def fixed_batch(config) -> dict:
  """[B, T] random bytes, two documents per row (a cut a third of the way in)."""
  from hiertx import data, vocab
  b, t = config.data.batch_size, config.data.seq_len
  rng = np.random.default_rng(0)
  targets = rng.integers(vocab.BYTE_OFFSET, 256 + vocab.BYTE_OFFSET, (b, t)).astype(np.int32)
  segments = np.where(np.arange(t) < t // 3, 1, 2).astype(np.int32)
  return data.batch_of(targets, np.broadcast_to(segments, (b, t)))


def first_loss(config, devices) -> float:
  """One training step's loss from the seed-0 initialisation on `devices`."""
  import jax

  from hiertx import steps
  run = steps.build_run(config, devices, check_data=False)
  state = run.init(jax.random.PRNGKey(0))
  batch = fixed_batch(config)
  shard = run.data_shard
  rows = config.data.batch_size // shard.count
  mine = {k: v[shard.index * rows:(shard.index + 1) * rows] for k, v in batch.items()}
  _, m = run.train_step(state, run.put_batch(mine))
  return float(m["train/loss"])


def cells(job: dict) -> list[dict]:
  """Every (model, mesh) of `job` on this process's view of the devices."""
  from hiertx.errors import HiertxError
  out = []
  for spec in job["models"]:
    for mesh in job["meshes"]:
      try:
        config = load(spec, job["set"])
        config.mesh.update(mesh)
        out.append({"model": spec, "mesh": mesh, "loss": first_loss(config, None)})
      except HiertxError as e:
        out.append({"model": spec, "mesh": mesh, "refused": str(e)})
      except Exception:  # noqa: BLE001  (a defect: the table shows it instead of stopping)
        out.append({"model": spec, "mesh": mesh, "failed": traceback.format_exc()})
  return out


def worker(job_json: str) -> None:
  from hiertx import distributed
  job = json.loads(job_json)
  if job["processes"] > 1:
    distributed.initialize(job["coordinator"], job["processes"], job["process_id"])
  results = cells(job)
  if job["process_id"] == 0:
    with open(job["out"], "w") as f:
      json.dump(results, f)


def run_processes(job: dict, processes: int, devices: int) -> list[dict]:
  """The job's cells over `processes` processes of `devices / processes` CPU devices."""
  sys.path.insert(0, os.path.join(ROOT, "launch"))
  import multiprocess  # a launcher script, not a package
  out = tempfile.mktemp(suffix=".json", prefix="hiertx_mesh_matrix_")
  port = multiprocess.free_port()
  env = {**os.environ, "JAX_PLATFORMS": "cpu",
         "XLA_FLAGS": f"--xla_force_host_platform_device_count={devices // processes}"}
  running = []
  for i in range(processes):
    spec = dict(job, processes=processes, process_id=i, coordinator=f"localhost:{port}", out=out)
    running.append(subprocess.Popen([sys.executable, os.path.abspath(__file__),
                                     f"--worker={json.dumps(spec)}"], cwd=ROOT, env=env,
                                    stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True))
  logs = [p.communicate()[0] for p in running]
  if any(p.returncode for p in running) or not os.path.exists(out):
    sys.exit(f"error: the {processes}-process run failed:\n" + "\n".join(t[-2000:] for t in logs))
  with open(out) as f:
    return json.load(f)


def verdict(cell: dict, reference: float | None) -> str:
  if "refused" in cell:
    return "refused: " + cell["refused"]
  if "failed" in cell:
    return "FAILED: " + cell["failed"].strip().splitlines()[-1]
  if reference is None:
    return f"trains ({cell['loss']:.6f}; no 1-device loss)"
  rel = abs(cell["loss"] - reference) / abs(reference)
  return (f"trains ({rel:.0e})" if rel <= RTOL
          else f"WRONG LOSS {cell['loss']:.6f} vs {reference:.6f} ({rel:.0e})")


def main(argv):
  cli.start(argv)
  f = flags.FLAGS
  if f.worker:
    worker(f.worker)
    return
  for p in f.processes:
    if f.devices % p:
      sys.exit(f"error: --processes={p} does not divide --devices={f.devices}")
  for spec in f.models:  # a bad model or override is one line before anything runs
    cli.run(load, spec, f.set)
  job = {"models": f.models, "set": f.set, "meshes": sharding.factorisations(f.devices)}
  print(f"{len(f.models)} models x {len(job['meshes'])} meshes of {f.devices} devices, "
        f"in {' and '.join(map(str, f.processes))} process(es) ...", flush=True)
  reference = {c["model"]: c.get("loss") for c in run_processes(
      dict(job, meshes=[dict(data=1, fsdp=1, tensor=1)]), 1, 1)}
  rows, defects = [], 0
  for p in f.processes:
    for c in run_processes(job, p, f.devices):
      v = verdict(c, reference[c["model"]])
      defects += v.startswith(("FAILED", "WRONG"))
      rows.append([c["model"], p, " ".join(f"{a}={c['mesh'][a]}" for a in sharding.AXES), v])
  print(results.markdown_table(["model", "processes", "mesh", "first step"], rows))
  print(f"\n{len(rows)} cells: {sum(r[3].startswith('trains') for r in rows)} train, "
        f"{sum(r[3].startswith('refused') for r in rows)} refused in one line, {defects} defects")
  if defects:
    sys.exit(1)


if __name__ == "__main__":
  define_flags()
  app.run(main, flags_parser=cli.parse_flags)
