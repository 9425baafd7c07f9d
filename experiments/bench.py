r"""Training throughput of every model side by side: tokens/s, achieved FLOP/s
and MFU, in one process so the numbers share one machine state.

  python experiments/bench.py
  python experiments/bench.py --set=model.d_model=512 --set=model.mlp_dim=2048 \
      --set=model.num_heads=8 --seq_len=512

FLOPs per step are the analytic count (`hiertx.cost`, checked against XLA in
tests). The peak is the data-sheet figure on GPU/TPU; on CPU it is a float32
1024x1024 matmul measured here, before and after the models run (both are
printed: a gap between them means the machine was busy).
"""

from absl import app, flags

from hiertx import benchmark, cli, metrics, report

DEFAULT_RUNS = ["vanilla.py", "bottom_up.py", "top_down.py", "retina.py", "hourglass.py"]


def define_flags() -> None:
  flags.DEFINE_list("runs", DEFAULT_RUNS, "Config files (under configs/) with args.")
  flags.DEFINE_integer("seq_len", 256, "Sequence length of every run.")
  flags.DEFINE_integer("batch_size", 8, "Global batch of every run.")
  flags.DEFINE_integer("steps", 5, "Timed steps per run (after one warm-up step).")
  flags.DEFINE_multi_string("set", [], "dotted.field=value applied to every run.")


def measure(specs, seq_len, batch, steps, sets, peak: float) -> list[dict]:
  rows = []
  for spec in specs:
    config = benchmark.config_for(spec, seq_len, batch, sets)
    run, compiled, facts = benchmark.compile_step(config)
    step_s = benchmark.time_steps(run, compiled, config, steps=steps)
    flops = facts["flops/step_analytic"]
    rows.append({"run": spec, "model": config.model.name, "params": facts["params/total"],
                 "step_s": step_s, "tokens_per_s": batch * seq_len / step_s,
                 "flops_per_s": flops / step_s, "mfu": flops / step_s / peak,
                 "peak_mib": facts["memory/xla_peak_bytes"] / 2**20})
    print(f"{spec}: {step_s:.3f} s/step, MFU {rows[-1]['mfu']:.1%}", flush=True)
  return rows


def table(rows) -> str:
  return report.markdown_table(
      ["run", "params", "s/step", "tokens/s", "GFLOP/s", "MFU", "XLA peak MiB"],
      [[r["run"], r["params"], f"{r['step_s']:.4f}", f"{r['tokens_per_s']:,.0f}",
        f"{r['flops_per_s'] / 1e9:.1f}", f"{r['mfu']:.1%}", r["peak_mib"]] for r in rows])


def main(argv):
  del argv
  cli.quiet_library_logs()
  f = flags.FLAGS
  peak, source = metrics.peak_flops("float32")
  rows = measure(f.runs, f.seq_len, f.batch_size, f.steps, f.set, peak)
  print(f"\nseq_len {f.seq_len}, batch {f.batch_size}, overrides {f.set or 'none'}")
  print(f"peak {peak / 1e9:.1f} GFLOP/s ({source})")
  if source.startswith("measured"):
    again = metrics.measured_matmul_peak("float32")
    print(f"matmul peak measured again after the runs: {again / 1e9:.1f} GFLOP/s")
  print()
  print(table(rows))


if __name__ == "__main__":
  define_flags()
  app.run(main)
