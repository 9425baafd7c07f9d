r"""Fixed against content-dependent group boundaries (hiertx.boundaries), per
corpus: one markdown table and one plot from runs of the `boundaries` sweep
(configs/compare.py: hourglass '2@1 4@4 2@1', each boundary source, two seeds).

  python launch/sweep.py --config=configs/compare.py --sweep=boundaries \
      --sweep_dir=/tmp/sweeps/bnd_stdlib
  python launch/sweep.py --config=configs/compare.py --sweep=boundaries \
      --sweep_dir=/tmp/sweeps/bnd_shakespeare \
      -- --config.data.text_files=../shared/data/tinyshakespeare.txt
  python experiments/boundary_sources.py \
      --sweep_dirs=/tmp/sweeps/bnd_stdlib,/tmp/sweeps/bnd_shakespeare

`--calibrate=<workdir>` instead prints, for a run with `boundaries=entropy`,
the entropy head's bits at quantiles of the validation bytes: the threshold
that closes a group at a share 1/k of them gives a mean group length near k.

  python experiments/boundary_sources.py \
      --calibrate=/tmp/sweeps/bnd_stdlib/seed-0.boundaries-entropy

Columns: validation bits per byte at the last step (each seed, and their
mean), XLA peak memory of the train step, median training tokens/s, the
mean group length and share of dropped closes at the last evaluation (fixed
groups are k bytes by construction), and the training step's FLOPs per byte
(XLA's count): each source compares with the others at equal mean group
length and at equal FLOPs per byte (H-Net's and SpaceByte's protocol). Writes
`--plot` (PNG): bits per byte against each.
"""

import math
import os
import statistics
import sys

from absl import app, flags

from hiertx import boundaries as boundaries_lib
from hiertx import cli
from hiertx import results
from hiertx.errors import HiertxError
from hiertx.models import hourglass

SOURCES = boundaries_lib.SOURCES


def define_flags() -> None:
  flags.DEFINE_list("sweep_dirs", [], "Directories the boundaries sweep ran in, one per "
                    "corpus.")
  flags.DEFINE_string("calibrate", None, "A workdir of a boundaries=entropy run: print its "
                      "entropy head's quantiles instead.")
  flags.DEFINE_string("plot", "/tmp/hiertx_boundaries.png", "Where to write the plot.")


def corpus_of(config: dict) -> str:
  data = config["data"]
  files = data.get("text_files") or ""
  return os.path.basename(files) if files else data.get("task", "stdlib")


def arm_of(model: dict) -> str:
  """A run's boundary source with the settings that tell the sweep's arms apart."""
  source = model.get("boundaries", "fixed")
  k = (hourglass.parse_hierarchy(model["hierarchy"])[2][1] if model["name"] == "hourglass"
       else model["pool_factors"][0])
  if source == "fixed":
    return f"fixed k={k}"
  if source == "entropy":
    return f"entropy > {model['entropy_threshold']:g} bits"
  if source == "learned":
    predictor = " (DTP predictor)" if model.get("boundary_predictor") == "dtp" else ""
    noise = model["boundary_temperature"]
    # A run saved before model.boundary_eval evaluated at the threshold.
    threshold = noise > 0 and model.get("boundary_eval", "threshold") == "threshold"
    return f"learned{predictor}, noise {noise:g}" + (", evaluated at logit > 0" if threshold
                                                     else "")
  if source == "dynamic":  # its ratio loss aims at 1/k of the bytes
    factors = (hourglass.parse_hierarchy(model["hierarchy"])[2]
               if model["name"] == "hourglass" else [1, k])
    if len(factors) > 2:  # H-Net's 2-stage model, a target per stage
      return "dynamic 2-stage, targets " + ", ".join(
          f"1/{b // a}" for a, b in zip(factors, factors[1:]))
    return f"dynamic, target 1/{k}"
  return source


def load(sweep_dir: str) -> list[dict]:
  """A finished row per run of one sweep directory (unfinished runs left out, said)."""
  _, runs = results.read_sweep(sweep_dir)
  rows = []
  for row in runs:
    if row["state"] != "finished":
      print(f"  {row['name']}: {row['state']} at step {row['step']}, left out", file=sys.stderr)
      continue
    rows.append({**row, "corpus": corpus_of(row["config"]),
                 "boundaries": arm_of(row["config"]["model"])})
  return rows


def table(rows: list[dict]) -> tuple[str, list[dict]]:
  groups = results.by_seed(rows, lambda r: (r["corpus"], r["boundaries"]))
  out, summary = [], []
  for (corpus, source), rs in sorted(groups.items(), key=lambda kv: (
      kv[0][0], SOURCES.index(kv[0][1].split()[0].rstrip(",")), kv[0][1])):
    bpb = [r["final_bpb"] for r in rs]
    mean = statistics.mean(bpb)
    group = statistics.mean(r["mean_group_length"] for r in rs)
    dropped = statistics.mean(r["dropped_closes"] for r in rs)
    if source.startswith("fixed"):
      group = float(source.split("=")[1])
    flops = statistics.mean(r["flops_per_byte"] for r in rs)
    summary.append({"corpus": corpus, "boundaries": source, "bpb": bpb, "mean": mean,
                    "group": group, "flops": flops})
    out.append([corpus, source, len(rs), ", ".join(f"{b:.3f}" for b in bpb), f"{mean:.3f}",
                statistics.mean(r["xla_peak_bytes"] for r in rs) / 2**20,
                statistics.median(r["tokens_per_s"] for r in rs), group,
                "0" if source.startswith("fixed") or math.isnan(dropped) else f"{dropped:.2%}",
                "n/a" if math.isnan(flops) else f"{flops / 1e6:.2f}"])
  header = ["corpus", "boundaries", "seeds", "bits/byte per seed", "mean bits/byte",
            "XLA peak MiB", "tokens/s", "mean group bytes", "dropped closes",
            "training MFLOPs/byte"]
  return results.markdown_table(header, out), summary


def plot(summary: list[dict], path: str) -> None:
  """Per corpus (a column each): bits per byte against mean group length
  (top) and against training FLOPs per byte (bottom, where measured), a
  point per seed and a bar at their mean, each arm labelled at its mean and
  coloured by its source."""
  import matplotlib
  matplotlib.use("Agg")
  import matplotlib.pyplot as plt
  corpora = sorted({s["corpus"] for s in summary})
  fig, axes = plt.subplots(2, len(corpora), figsize=(5.5 * len(corpora), 8), squeeze=False)
  for col, corpus in enumerate(corpora):
    for row, (key, label) in enumerate((("group", "mean group length (bytes)"),
                                        ("flops", "training MFLOPs per byte"))):
      ax = axes[row][col]
      for s in (s for s in summary if s["corpus"] == corpus and not math.isnan(s[key])):
        x = s[key] / (1e6 if key == "flops" else 1)
        color = f"C{SOURCES.index(s['boundaries'].split()[0].rstrip(','))}"
        ax.scatter([x] * len(s["bpb"]), s["bpb"], color=color, s=14)
        ax.scatter([x], [s["mean"]], color=color, marker="_", s=120)
        ax.annotate(s["boundaries"].replace(", target", "\ntarget"), (x, s["mean"]),
                    fontsize=7, xytext=(5, 0), textcoords="offset points", va="center")
      ax.margins(x=0.35, y=0.08)
      ax.set_title(corpus)
      ax.set_xlabel(label)
      ax.set_ylabel("validation bits/byte (a point per seed)")
  fig.tight_layout()
  fig.savefig(path, dpi=120)


def entropy_quantiles(workdir: str, batches: int = 16) -> dict[float, float]:
  """Bits of the entropy head of a `boundaries=entropy` run's newest checkpoint
  at quantiles of the real bytes of `batches` validation batches."""
  import jax
  import jax.numpy as jnp
  import numpy as np
  from hiertx import data, steps
  config, run, _, params = steps.load_params(workdir)
  if config.model.get("boundaries") != "entropy":
    raise HiertxError(f"--calibrate: {workdir} is not a boundaries=entropy run")
  model = run.model

  @jax.jit
  def bits(params, b):
    # The states the head reads: what the first shortening pools.
    _, sown = model.apply({"params": params}, b["inputs"], b["segment_ids"], b["positions"],
                          mutable=["decode"])
    x = sown["decode"]["x_0" if "x_0" in sown["decode"] else "e_0"]
    return model.apply({"params": params}, x, b["segment_ids"], method=lambda m, x, seg: (
        m.content_groups.source.entropy_bits(x)))

  out = []
  for b in data.eval_batches(config.data, "validation", config.eval.batch_size, batches,
                             align=run.align):
    h = bits(params, {k: jnp.asarray(v) for k, v in b.items()})
    out.append(np.asarray(h)[np.asarray(b["segment_ids"]) > 0])
  values = np.concatenate(out)
  return {q: float(np.quantile(values, q)) for q in (0.5, 0.6, 2 / 3, 0.75, 0.8, 5 / 6, 0.875)}


def main(argv):
  cli.start(argv)
  if flags.FLAGS.calibrate:
    print("share of bytes below | entropy head bits | mean group bytes at this threshold")
    for q, v in cli.run(entropy_quantiles, flags.FLAGS.calibrate).items():
      print(f"{q:.3f} | {v:.3f} | {1 / (1 - q):.1f}")
    return
  if not flags.FLAGS.sweep_dirs:
    raise app.UsageError("give --sweep_dirs (or --calibrate)")
  rows = []
  for d in flags.FLAGS.sweep_dirs:
    rows += cli.run(load, d)
  if not rows:
    raise SystemExit("no finished runs in --sweep_dirs yet")
  text, summary = table(rows)
  print(text)
  plot(summary, flags.FLAGS.plot)
  print(f"plot: {flags.FLAGS.plot}")


if __name__ == "__main__":
  define_flags()
  app.run(main, flags_parser=cli.parse_flags)
