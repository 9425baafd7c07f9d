r"""The paper's claim in one accelerator window: the 14-layer vanilla model
against the 30-layer hierarchical models (Subramanian et al. 2020) at width
512, sequence 2,048, bfloat16, each trained on the same tokens from one
exported data cache, then scored on the whole validation split.

  # where seqio is installed: the stdlib corpus as one directory to carry (11.6 MiB)
  python -m hiertx.prepare_data --config=configs/vanilla.py --config.data.seq_len=2048 \
      --export=.gpu/stdlib_2048
  # on the accelerator machine: one command, about 8 minutes on one H200
  python experiments/claim_device.py --cache_dir=.gpu/stdlib_2048 --workdir=/tmp/claim_device
  # toy size on CPU (the test suite runs it)
  python experiments/claim_device.py --runlocal --workdir=/tmp/claim_local

Each model trains in its own process (`hiertx.train`, workdir
`<workdir>/<model>`), so its device memory peak is its own; the trainer's
last evaluation reads the whole validation split. A rerun skips finished
models. Prints one table: bits per byte, peak device memory (the allocator's,
on GPU/TPU) next to XLA's compile-time peak, tokens/s, and each against
vanilla. `--attention=auto` uses the fused kernels of the backend (on a GPU
cuDNN for the stacks and the Pallas kernel elsewhere; on a TPU splash
wherever a site can take it and blockwise elsewhere).
"""

import os
import subprocess
import sys
import time

from absl import app, flags

from hiertx import benchmark, checkpoint, cli, exported, results
from hiertx import config as config_lib
from hiertx.errors import FlagError

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
DEFAULT_RUNS = ["vanilla.py:size=paper14", "hourglass.py:size=paper30",
                "top_down.py:size=paper30", "bottom_up.py:size=paper30"]
LOCAL_RUNS = ["vanilla.py:size=tiny", "hourglass.py:size=tiny", "top_down.py:size=tiny",
              "bottom_up.py:size=tiny"]
WIDTH = ["model.d_model=512", "model.num_heads=8", "model.mlp_dim=2048",
         "model.dtype=bfloat16"]
# The backend's kernels: (model.attention, model.attention_fallback) under auto.
KERNELS = {"gpu": ("cudnn", "pallas"), "tpu": ("splash", "blockwise")}


def define_flags() -> None:
  flags.DEFINE_string("workdir", None, "Where the runs train (one folder per model).")
  flags.DEFINE_string("cache_dir", "", "An exported data cache (python -m hiertx.prepare_data "
                      "--export=DIR) at --seq_len; needed except with --runlocal.")
  flags.DEFINE_list("runs", None, "Config files (under configs/) with args; the first is the "
                    "baseline. Default: vanilla paper14 and the paper30 hierarchical models.")
  flags.DEFINE_integer("steps", 300, "Training steps of every model (equal tokens).")
  flags.DEFINE_integer("batch_size", 16, "Global batch, in rows.", lower_bound=1)
  flags.DEFINE_integer("seq_len", 2048, "Tokens per row.", lower_bound=1)
  flags.DEFINE_enum("attention", "auto", ["auto", "blockwise", "dense", "cudnn", "splash",
                                          "pallas"],
                    "model.attention of every run; auto: the backend's fused kernel (GPU: "
                    "cuDNN for same-scale stacks, the Pallas kernel for the other sites).")
  flags.DEFINE_multi_string("set", [], "dotted.field=value applied to every run.")
  flags.DEFINE_bool("runlocal", False, "Toy size on CPU: tiny models, 64 tokens x 8 rows, "
                    "20 steps, the local data cache.")
  flags.mark_flags_as_required(["workdir"])


def run_name(spec: str) -> str:
  return spec.replace(".py", "").replace(":size=", "-").replace(":", "-").replace(",", "-")


def plan(runs, steps, batch, seq_len, attention, cache_dir, sets, runlocal,
         fallback: str = "blockwise") -> list[tuple]:
  """[(spec, overrides)] for every run, each config built and validated here
  (a mistake stops before any accelerator time is spent)."""
  if steps < 1:
    raise FlagError("--steps", f"must be >= 1, got {steps}")
  common = [] if runlocal else list(WIDTH)
  common += [f"model.attention={attention}", f"model.attention_fallback={fallback}",
             f"train.steps={steps}", f"train.warmup_steps={max(1, steps // 10)}",
             f"train.log_every={max(1, min(50, steps // 10))}", f"eval.every={steps}",
             f"train.checkpoint_every={steps}", f"eval.batch_size={batch}",
             "eval.batches=1000000"]  # every row of the validation split
  if cache_dir:
    common.append(f"data.cache_dir={os.path.abspath(cache_dir)}")
  common += list(sets)
  out = []
  for spec in runs:
    config = benchmark.config_for(spec, seq_len, batch, common)
    config_lib.validate(config)
    if cache_dir:
      exported.check(cache_dir, config_lib.resolved(config).data)
    out.append((spec, [f"data.seq_len={seq_len}", f"data.batch_size={batch}",
                       f"model.max_len={config.model.max_len}", *common]))
  return out


def train_one(spec: str, overrides: list[str], workdir: str) -> tuple[int, float]:
  """Trains one model in its own process, its progress lines passed through
  and all of its output kept in `<workdir>/train.log`; (exit code, seconds)."""
  path, _, arg = spec.partition(":")
  cmd = [sys.executable, "-m", "hiertx.train",
         f"--config={os.path.join(benchmark.CONFIG_DIR, path)}" + (f":{arg}" if arg else ""),
         f"--workdir={workdir}", *[f"--config.{o}" for o in overrides]]
  t0 = time.time()
  os.makedirs(workdir, exist_ok=True)
  proc = subprocess.Popen(cmd, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                          text=True)
  with open(os.path.join(workdir, "train.log"), "a") as log:
    for line in proc.stdout:
      log.write(line)
      if line.startswith(("step ", "eval ", "done", "error", "model ", "resumed", "already")):
        print(f"  {run_name(spec)}: {line.rstrip()}", flush=True)
  return proc.wait(), time.time() - t0


def table(names: list[str], rows: list[dict | None], batch: int, seq_len: int) -> str:
  base = rows[0]
  out = []
  for name, r in zip(names, rows):
    if r is None:
      out.append([name, "failed (see its train.log)", *[""] * 9])
      continue
    dev = r["device_peak_bytes"]
    mem = dev or r["xla_peak_bytes"]
    base_mem = base and (base["device_peak_bytes"] or base["xla_peak_bytes"])
    out.append([name, f"{r['params'] / 1e6:.1f}M", r["step"],
                f"{r['step'] * batch * seq_len:,}", f"{r['final_bpb']:.4f}",
                f"{r['final_bpb'] - base['final_bpb']:+.4f}" if base else "",
                f"{dev / 2**20:,.0f}" if dev else "n/a",
                f"{r['xla_peak_bytes'] / 2**20:,.1f}",
                f"{mem / base_mem:.2f}" if base_mem else "",
                f"{r['tokens_per_s']:,.0f}",
                f"{r['tokens_per_s'] / base['tokens_per_s']:.2f}" if base else ""])
  return results.markdown_table(
      ["model", "params", "steps", "train tokens", "val bits/byte", "vs first",
       "device peak MiB", "XLA peak MiB", "memory / first", "tokens/s", "speed / first"], out)


def check_cache(cache_dir: str, runlocal: bool) -> None:
  if not runlocal and not cache_dir:
    raise FlagError("--cache_dir", "needs an exported data cache (python -m "
                    "hiertx.prepare_data --config=... --export=DIR), or use --runlocal")
  if cache_dir and not exported.is_export(cache_dir):
    raise FlagError("--cache_dir", f"{cache_dir!r} is not an exported cache (no "
                    f"{exported.MANIFEST}); make one with python -m hiertx.prepare_data "
                    "--config=... --export=DIR")


def main(argv):
  cli.start(argv)
  f = flags.FLAGS
  cli.run(check_cache, f.cache_dir, f.runlocal)
  runs = f.runs or (LOCAL_RUNS if f.runlocal else DEFAULT_RUNS)
  batch, seq_len, steps = ((8, 64, min(f.steps, 20)) if f.runlocal
                           else (f.batch_size, f.seq_len, f.steps))
  attention, fallback = f.attention, "blockwise"
  if attention == "auto":
    import jax  # the backend only; each run allocates in its own process
    attention, fallback = KERNELS.get(jax.default_backend(), ("blockwise", "blockwise"))
  planned = cli.run(plan, runs, steps, batch, seq_len, attention, f.cache_dir, f.set,
                    f.runlocal, fallback)
  print(f"{len(planned)} models, {steps} steps of {batch} x {seq_len} tokens each, "
        f"attention {attention}, in {f.workdir}", flush=True)
  rows = []
  for spec, overrides in planned:
    workdir = os.path.join(f.workdir, run_name(spec))
    state = checkpoint.read_status(workdir).get("state") if os.path.isdir(workdir) else None
    if state == "finished":
      print(f"{run_name(spec)}: finished before, not rerun", flush=True)
      code = 0
    else:
      code, seconds = train_one(spec, overrides, workdir)
      print(f"{run_name(spec)}: {'done' if code == 0 else f'failed (exit {code})'} in "
            f"{seconds:.0f}s", flush=True)
    rows.append(results.read_run(workdir) if code == 0 else None)
  print()
  print(table([run_name(s) for s, _ in planned], rows, batch, seq_len), flush=True)
  if any(r is None for r in rows):
    sys.exit(1)


if __name__ == "__main__":
  define_flags()
  app.run(main, flags_parser=cli.parse_flags)
