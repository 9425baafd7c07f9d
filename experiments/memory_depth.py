r"""XLA peak training-step memory, compile only (nothing is trained): vanilla at
several depths against each hierarchical model at several depths, all at the
same width, sequence length and batch. Prints a markdown table with each
model's ratio to the vanilla baseline (`--baseline`).

  python experiments/memory_depth.py --seq_len=1024 --batch_size=8
  python experiments/memory_depth.py --runs=vanilla.py:size=paper14,bottom_up.py:size=paper30

Each run is `config_file[:arg]` under configs/ (or a path); `--set` applies an
override to every run (e.g. --set=model.d_model=512).
"""

import os

import jax
from absl import app, flags

from hiertx import config as config_lib
from hiertx import report, train

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

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
  flags.DEFINE_integer("seq_len", 1024, "Sequence length of every run.")
  flags.DEFINE_integer("batch_size", 8, "Global batch of every run.")
  flags.DEFINE_multi_string("set", [], "dotted.field=value applied to every run.")


def config_for(spec: str, seq_len: int, batch: int, sets: list[str]):
  path, _, arg = spec.partition(":")
  if not os.path.exists(path):
    path = os.path.join(ROOT, "configs", path)
  config = config_lib.load(path + (f":{arg}" if arg else ""))
  config.data.seq_len = seq_len
  config.data.batch_size = batch
  config.eval.batch_size = batch
  config.model.max_len = max(config.model.max_len, seq_len)
  for s in sets:
    config_lib.apply_override(config, s)
  return config


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
    config = config_for(spec, seq_len, batch, sets)
    run = train.build_run(config)
    _, facts = train.compile_train_step(run, config)
    params = sum(x.size for x in jax.tree_util.tree_leaves(run.abstract_state.params))
    rows.append({"run": spec, "model": config.model.name, "layers": layers_of(config.model),
                 "width": config.model.d_model,
                 "params": int(params), "peak": facts["memory/xla_peak_bytes"],
                 "temp": facts["memory/xla_temp_bytes"]})
    print(f"{spec}: {rows[-1]['peak'] / 2**20:.1f} MiB", flush=True)
  return rows


def table(rows, baseline: str) -> str:
  base = next((r for r in rows if r["run"] == baseline), rows[0])
  return report.markdown_table(
      ["run", "model", "layers", "params", "XLA peak MiB", "temp MiB", f"peak / {base['run']}"],
      [[r["run"], r["model"], r["layers"], r["params"], r["peak"] / 2**20, r["temp"] / 2**20,
        f"{r['peak'] / base['peak']:.3f}"] for r in rows])


def main(argv):
  del argv
  train.quiet_library_logs()
  f = flags.FLAGS
  rows = measure(f.runs, f.seq_len, f.batch_size, f.set)
  widths = sorted({r["width"] for r in rows})
  print(f"\nseq_len {f.seq_len}, batch {f.batch_size}, width {widths}\n")
  print(table(rows, f.baseline))


if __name__ == "__main__":
  define_flags()
  app.run(main)
