r"""Trains several configs for the same budget and compares bits per byte with
memory and speed, marking the Pareto front.

  python experiments/pareto.py --text_files=../shared/data/tinyshakespeare.txt \
      --configs=configs/vanilla.py,configs/bottom_up.py,configs/top_down.py,\
configs/retina.py,configs/hourglass.py --steps=300 --out=/tmp/pareto

Every config gets the same data, sequence length, batch and steps (`--set`
applies further overrides to all, e.g. --set=data.seq_len=512). Runs happen
one after another in this process, so tokens/s compare on the same machine
state. Writes <out>/pareto.md and <out>/pareto.png (bits per byte vs XLA peak
memory and vs tokens/s); an existing finished run in <out>/<name> is reused.
"""

import os
import sys

from absl import app, flags

from hiertx import config as config_lib
from hiertx import report, train
from hiertx.errors import HiertxError

def define_flags() -> None:
  flags.DEFINE_list("configs", None, "Config files (path[:arg]) to compare.")
  flags.DEFINE_string("text_files", None, "Glob of text files (default: stdlib corpus).")
  flags.DEFINE_integer("steps", 300, "Training steps for every config.")
  flags.DEFINE_multi_string("set", [], "dotted.field=value applied to every config.")
  flags.DEFINE_string("out", "/tmp/hiertx_pareto", "Output directory.")


def run_name(spec: str) -> str:
  path, _, arg = spec.partition(":")
  name = os.path.splitext(os.path.basename(path))[0]
  return name + ("_" + arg.replace("=", "-").replace(",", "_") if arg else "")


def prepare(spec: str, steps: int, text_files: str | None, sets: list[str]):
  config = config_lib.load(spec)
  config.train.steps = steps
  config.train.checkpoint_every = steps
  config.eval.every = steps
  if text_files:
    config.data.text_files = text_files
  for s in sets:
    config_lib.apply_override(config, s)
  return config


def compare(specs, steps, text_files, sets, out) -> list[dict]:
  rows = []
  for spec in specs:
    workdir = os.path.join(out, run_name(spec))
    config = prepare(spec, steps, text_files, sets)
    print(f"== {spec} -> {workdir}", flush=True)
    train.train_and_evaluate(config, workdir)
    rows.append({"name": run_name(spec), **report.summarize(workdir)})
  return rows


def write_report(rows: list[dict], out: str, title: str) -> str:
  base = next((r for r in rows if r["model"] == "vanilla"), rows[0])
  front = report.pareto_front([(r["xla_peak_bytes"], r["final_bpb"]) for r in rows])
  table = report.markdown_table(
      ["run", "model", "params", "XLA peak MiB", "memory / " + base["name"], "tokens/s",
       "val bits/byte", "Pareto"],
      [[r["name"], r["model"], r["params"], r["xla_peak_bytes"] / 2**20,
        r["xla_peak_bytes"] / base["xla_peak_bytes"], r["tokens_per_s"], r["final_bpb"],
        "*" if f else ""] for r, f in zip(rows, front)])
  text = f"# {title}\n\n{table}\n"
  with open(os.path.join(out, "pareto.md"), "w") as f:
    f.write(text)
  plot(rows, front, os.path.join(out, "pareto.png"))
  return text


def plot(rows, front, path):
  import matplotlib  # noqa: PLC0415

  matplotlib.use("Agg")
  import matplotlib.pyplot as plt  # noqa: PLC0415

  fig, axes = plt.subplots(1, 2, figsize=(11, 4.2))
  for ax, key, label in ((axes[0], "xla_peak_bytes", "XLA peak train-step memory (MiB)"),
                         (axes[1], "tokens_per_s", "training tokens/s")):
    for r, f in zip(rows, front):
      x = r[key] / 2**20 if key == "xla_peak_bytes" else r[key]
      ax.scatter(x, r["final_bpb"], marker="*" if f else "o", s=120 if f else 40)
      ax.annotate(r["name"], (x, r["final_bpb"]), fontsize=8, xytext=(4, 3),
                  textcoords="offset points")
    ax.set_xlabel(label)
    ax.set_ylabel("validation bits per byte")
    ax.grid(alpha=0.3)
  axes[0].set_title("bits/byte vs memory (* = Pareto front)")
  axes[1].set_title("bits/byte vs speed")
  fig.tight_layout()
  fig.savefig(path, dpi=120)
  plt.close(fig)


def main(argv):
  del argv
  f = flags.FLAGS
  cli.quiet_library_logs()
  if not f.configs:
    sys.exit("error: --configs is required")
  os.makedirs(f.out, exist_ok=True)
  try:
    rows = compare(f.configs, f.steps, f.text_files, f.set, f.out)
  except HiertxError as e:
    sys.exit(f"error: {e}")
  corpus = f.text_files or "the stdlib corpus"
  print(write_report(rows, f.out, f"{f.steps} steps on {corpus}"))
  print(f"plot: {os.path.join(f.out, 'pareto.png')}")


if __name__ == "__main__":
  define_flags()
  app.run(main)
