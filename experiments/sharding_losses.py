r"""Trains the same config on 1 device, on N simulated devices in one process,
and in 2 processes (jax.distributed), then prints the per-step losses side by
side: sharding must not change the numbers beyond float32 round-off.

  python experiments/sharding_losses.py --config=configs/bottom_up.py:size=tiny --steps=10
"""

import os
import subprocess
import sys
import tempfile

from absl import app, flags

from hiertx import cli, metrics, results

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def define_flags() -> None:
  flags.DEFINE_string("config", "configs/vanilla.py:size=tiny", "Config file[:arg].")
  flags.DEFINE_integer("steps", 10, "Training steps.", lower_bound=1)
  flags.DEFINE_integer("devices", 8, "Simulated devices for the sharded runs.", lower_bound=1)
  flags.DEFINE_string("mesh", "data=2,fsdp=2,tensor=2", "Mesh of the sharded runs.")


def _overrides(steps: int, mesh: str | None) -> list[str]:
  out = [f"--config.train.steps={steps}", "--config.train.log_every=1",
         f"--config.train.checkpoint_every={steps}", f"--config.eval.every={steps}"]
  for item in filter(None, (mesh or "").split(",")):
    axis, _, size = item.partition("=")
    out.append(f"--config.mesh.{axis}={size}")
  return out


def _run(args: list[str], devices: int | None) -> None:
  env = {**os.environ, "JAX_PLATFORMS": "cpu"}
  env.pop("XLA_FLAGS", None)
  if devices:
    env["XLA_FLAGS"] = f"--xla_force_host_platform_device_count={devices}"
  r = subprocess.run([sys.executable, *args], cwd=ROOT, env=env, capture_output=True, text=True)
  if r.returncode:
    sys.exit(f"error: {' '.join(args)} failed:\n{(r.stdout + r.stderr)[-3000:]}")


def _losses(workdir: str) -> dict[int, float]:
  return {r["step"]: r["train/loss"] for r in metrics.read_jsonl(
      os.path.join(workdir, "metrics.jsonl")) if "train/loss" in r}


def main(argv):
  del argv
  f = flags.FLAGS
  tmp = tempfile.mkdtemp(prefix="hiertx_sharding_")
  one, many, procs = (os.path.join(tmp, n) for n in ("one", "many", "procs"))
  base = ["-m", "hiertx.train", f"--config={f.config}"]
  _run([*base, f"--workdir={one}", *_overrides(f.steps, "data=1")], None)
  _run([*base, f"--workdir={many}", *_overrides(f.steps, f.mesh)], f.devices)
  per_process = f.devices // 2
  _run(["launch/multiprocess.py", "--num_processes=2", f"--devices_per_process={per_process}",
        f"--config={f.config}", f"--workdir={procs}", "--",
        *_overrides(f.steps, f.mesh)], None)
  a, b, c = _losses(one), _losses(many), _losses(procs)
  rows = [[s, a[s], b[s], c[s], max(abs(b[s] - a[s]), abs(c[s] - a[s])) / abs(a[s])]
          for s in sorted(a)]
  print(f"{f.config}, mesh {f.mesh} over {f.devices} devices\n")
  print(results.markdown_table(
      ["step", "1 device", f"{f.devices} devices, 1 process",
       f"2 processes x {per_process} devices", "max rel. diff"],
      [[r[0], f"{r[1]:.6f}", f"{r[2]:.6f}", f"{r[3]:.6f}", f"{r[4]:.1e}"] for r in rows]))


if __name__ == "__main__":
  define_flags()
  app.run(main, flags_parser=cli.parse_flags)
