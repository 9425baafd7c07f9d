r"""Training throughput of models side by side: tokens/s, achieved FLOP/s and
MFU, in one process so the numbers share one machine state.

  python experiments/bench.py
  python experiments/bench.py --set=model.d_model=512 --set=model.mlp_dim=2048 \
      --set=model.num_heads=8 --shapes=8x512
  # vanilla with 8 layers against hourglass 2@1 4@4 2@1 at two shapes
  python experiments/bench.py --shapes=8x1024,16x256 \
      --run='vanilla.py:size=base;model.num_layers=8' \
      --run='hourglass.py:size=base;model.hierarchy=2@1 4@4 2@1'

A run is a config file under configs/ (with its `:arg`), optionally followed
by `;field=value` overrides of its own; `--set` applies to every run. FLOPs
per step are analytic (`hiertx.cost`: attention chunk pairs that are skipped
are not work): MFU divides the model FLOPs (nothing recomputed), HFU the
hardware FLOPs (with the scores the backward pass recomputes and any remat),
and the dense-equivalent MFU counts every score of full maps. The peak is the
data-sheet figure of the run's dtype on GPU/TPU (bfloat16 and float16 runs
against the half-precision column); on CPU it is a 1024x1024 matmul of that
dtype measured here, before and after the models run (both are printed: a gap
between them means the machine was busy). Each run prints which
implementation every attention site got.
"""

import json
import sys

from absl import app, flags

from hiertx import benchmark, cli, device_stats, results
from hiertx.errors import FlagError

DEFAULT_RUNS = ["vanilla.py", "bottom_up.py", "top_down.py", "retina.py", "hourglass.py"]


def define_flags() -> None:
  flags.DEFINE_list("runs", DEFAULT_RUNS, "Config files (under configs/) with args.")
  flags.DEFINE_multi_string("run", [], "A run with its own overrides: 'file[:arg];field=value;"
                            "...' (replaces --runs).")
  flags.DEFINE_list("shapes", ["8x256"], "Batch x sequence length of every run, e.g. 8x1024.")
  flags.DEFINE_integer("steps", 5, "Timed steps per run (after one warm-up step).", lower_bound=1)
  flags.DEFINE_multi_string("set", [], "dotted.field=value applied to every run.")
  flags.DEFINE_string("json_out", None, "Also write the rows (with each run's attention "
                      "sites) to this JSON file, e.g. for experiments/gpu_summary.py.")


def parse_shape(text: str) -> tuple[int, int]:
  batch, _, seq = text.partition("x")
  if not (batch.isdigit() and seq.isdigit() and int(batch) > 0 and int(seq) > 0):
    raise FlagError("--shapes", f"{text!r} is not BATCHxLENGTH, e.g. 8x1024")
  return int(batch), int(seq)


def measure(runs, shapes, steps, sets) -> list[dict]:
  """`runs`: 'file[:arg][;field=value...]' each; `shapes`: (batch, length) pairs."""
  rows = []
  for spec in runs:
    file_arg, *own = spec.split(";")
    for batch, seq_len in shapes:
      config = benchmark.config_for(file_arg, seq_len, batch, [*sets, *own])
      run, compiled, facts = benchmark.compile_step(config)
      print(f"{spec} {batch}x{seq_len} attention sites:\n  "
            + facts["attention/sites"].replace("\n", "\n  "), flush=True)
      step_s = benchmark.time_steps(run, compiled, config, steps=steps)
      peak, _ = device_stats.peak_flops(config.model.dtype)
      model, hardware = facts["flops/step_model"], facts["flops/step_analytic"]
      rows.append({"run": spec, "model": config.model.name, "shape": f"{batch}x{seq_len}",
                   "dtype": config.model.dtype, "params": facts["params/total"],
                   "step_s": step_s, "tokens_per_s": batch * seq_len / step_s,
                   "flops_per_s": model / step_s, "peak": peak, "mfu": model / step_s / peak,
                   "hfu": hardware / step_s / peak,
                   "mfu_dense": facts["flops/step_analytic_dense"] / step_s / peak,
                   "peak_mib": facts["memory/xla_peak_bytes"] / 2**20,
                   "while_loops": facts["xla/while_loops"],
                   "sites": facts["attention/sites"]})
      print(f"{spec} {batch}x{seq_len}: {step_s:.3f} s/step, "
            f"{rows[-1]['tokens_per_s']:,.0f} tokens/s", flush=True)
  return rows


def table(rows) -> str:
  return results.markdown_table(
      ["run", "batch x length", "dtype", "params", "s/step", "tokens/s", "model GFLOP/s",
       "MFU", "HFU", "MFU (dense-equivalent FLOPs)", "XLA peak MiB", "while loops"],
      [[r["run"], r["shape"], r["dtype"], r["params"], f"{r['step_s']:.4f}",
        f"{r['tokens_per_s']:,.0f}", f"{r['flops_per_s'] / 1e9:.1f}", f"{r['mfu']:.1%}",
        f"{r['hfu']:.1%}", f"{r['mfu_dense']:.1%}", r["peak_mib"], r["while_loops"]]
       for r in rows])


def by_shape(rows) -> str:
  """tokens/s, one row per shape and one column per run."""
  runs = list(dict.fromkeys(r["run"] for r in rows))
  shapes = list(dict.fromkeys(r["shape"] for r in rows))
  speed = {(r["run"], r["shape"]): r["tokens_per_s"] for r in rows}
  return results.markdown_table(
      ["batch x length", *[f"{r} tokens/s" for r in runs]],
      [[s, *[f"{speed[(r, s)]:,.0f}" for r in runs]] for s in shapes])


def main(argv):
  del argv
  cli.quiet_library_logs()
  f = flags.FLAGS
  shapes = [cli.run(parse_shape, s) for s in f.shapes]
  _, source = device_stats.peak_flops("float32")  # on CPU: measured before the runs
  rows = cli.run(measure, f.run or f.runs, shapes, f.steps, f.set)
  print(f"\noverrides {f.set or 'none'}")
  for dtype in dict.fromkeys(r["dtype"] for r in rows):
    peak = next(r["peak"] for r in rows if r["dtype"] == dtype)
    print(f"{dtype} peak {peak / 1e9:.1f} GFLOP/s ({source})")
    if source.startswith("measured"):
      again = device_stats.measured_matmul_peak(dtype)
      print(f"{dtype} matmul peak measured again after the runs: {again / 1e9:.1f} GFLOP/s")
  print()
  print(table(rows))
  print()
  print(by_shape(rows))
  sys.stdout.flush()
  if f.json_out:
    with open(f.json_out, "w") as out:
      json.dump(rows, out, indent=1)


if __name__ == "__main__":
  define_flags()
  app.run(main, flags_parser=cli.parse_flags)
