r"""XLA peak training-step memory, compile only (nothing is trained): vanilla at
several depths against each hierarchical model at several depths, all at the
same width, sequence length and batch. Prints a markdown table with each
model's ratio to the vanilla baseline (`--baseline`).

  python experiments/memory_depth.py --seq_len=1024 --batch_size=8
  python experiments/memory_depth.py --runs=vanilla.py:size=paper14,bottom_up.py:size=paper30

Each run is `config_file[:arg]` under configs/ (or a path); `--set` applies an
override to every run (e.g. --set=model.d_model=512).
"""

from absl import app, flags

from hiertx import benchmark, cli, results

DEFAULT_RUNS = [
    "vanilla.py:size=base", "vanilla.py:size=paper14",
    "bottom_up.py:size=base", "bottom_up.py:size=paper30",
    "top_down.py:size=base", "top_down.py:size=paper30",
    "retina.py:size=base", "retina.py:size=paper30",
    "hourglass.py:size=base", "hourglass.py:size=paper30",
]


def define_flags() -> None:
  flags.DEFINE_list("runs", DEFAULT_RUNS, "Config files (under configs/) with args.")
  flags.DEFINE_string("baseline", "vanilla.py:size=paper14", "Run the ratios use.")
  flags.DEFINE_integer("seq_len", 1024, "Sequence length of every run.", lower_bound=1)
  flags.DEFINE_integer("batch_size", 8, "Global batch of every run.", lower_bound=1)
  flags.DEFINE_multi_string("set", [], "dotted.field=value applied to every run.")


def layers_of(model_cfg) -> int:
  m = model_cfg
  if m.name == "vanilla" or m.name == "retina":
    return m.num_layers
  if m.name == "bottom_up":
    return sum(m.layers_per_scale) + 1 + m.post_layers
  if m.name == "top_down":
    return sum(m.layers_per_scale)
  return sum(int(item.split("@")[0]) for item in m.hierarchy.split())


def measure(specs, seq_len, batch, sets) -> list[dict]:
  rows = []
  for spec in specs:
    config = benchmark.config_for(spec, seq_len, batch, sets)
    _, _, facts = benchmark.compile_step(config)
    rows.append({"run": spec, "model": config.model.name, "layers": layers_of(config.model),
                 "width": config.model.d_model,
                 "params": int(facts["params/total"]), "peak": facts["memory/xla_peak_bytes"],
                 "temp": facts["memory/xla_temp_bytes"],
                 "analytic": facts["memory/analytic_peak_bytes"]})
    print(f"{spec}: {rows[-1]['peak'] / 2**20:.1f} MiB", flush=True)
  return rows


def table(rows, baseline: str) -> str:
  base = next((r for r in rows if r["run"] == baseline), rows[0])
  return results.markdown_table(
      ["run", "model", "layers", "params", "XLA peak MiB", "analytic MiB", "analytic / XLA",
       f"peak / {base['run']}"],
      [[r["run"], r["model"], r["layers"], r["params"], r["peak"] / 2**20,
        r["analytic"] / 2**20, f"{r['analytic'] / r['peak']:.3f}",
        f"{r['peak'] / base['peak']:.3f}"] for r in rows])


def main(argv):
  del argv
  cli.quiet_library_logs()
  f = flags.FLAGS
  rows = cli.run(measure, f.runs, f.seq_len, f.batch_size, f.set)
  widths = sorted({r["width"] for r in rows})
  print(f"\nseq_len {f.seq_len}, batch {f.batch_size}, width {widths}, "
        f"overrides {f.set or 'none'}\n")
  print(table(rows, f.baseline))


if __name__ == "__main__":
  define_flags()
  app.run(main, flags_parser=cli.parse_flags)
