r"""Gathers a sweep's runs into one report: a markdown table (one row per run,
failed and unfinished runs flagged, not dropped; memory relative to the
vanilla runs; `gzip -9` and `xz -9` bits per byte of the same evaluation
text; the Pareto front of memory against bits per byte), a table
averaged over seeds, and PNG plots (loss curves; bits per byte against XLA
peak memory and against training speed).

  python launch/report.py --sweep_dir=/tmp/hiertx_sweeps/compare-paper_claim

A run's final numbers are its last periodic evaluation's, or, where
`python -m hiertx.evaluate` has scored the final checkpoint again
(`eval_<split>_<step>.json`), that evaluation's; the table says which and how
many tokens were scored.

Writes <sweep_dir>/report.md, loss_curves.png and bpb_vs_memory.png.
Works while a sweep is still running, and on sweeps run by any target.
"""

import io
import math
import statistics

from absl import app, flags

from hiertx import cli
from hiertx import grid
from hiertx import results as results_lib
from hiertx import storage

NAN = results_lib.NAN


def define_flags() -> None:
  flags.DEFINE_string("sweep_dir", None, "Directory launch/sweep.py ran in.", required=True)


def _overrides_text(overrides: dict, sep: str = " ", short: bool = False) -> str:
  """`name=value` per override; `short`: each name's last part only."""
  name = (lambda k: k.rsplit(".", 1)[-1]) if short else (lambda k: k.removeprefix("arg."))
  return sep.join(f"{name(k)}={grid.format_value(v)}" for k, v in overrides.items())


def plot_label(r: dict, sep: str = " ") -> str:
  """A run's label in the plots: the settings that vary across the sweep
  (the last part of each name), or its name when none does."""
  return _overrides_text(r["overrides"], sep, short=True) or r["name"]


def _status_text(r: dict) -> str:
  if r["state"] == "finished":
    return "finished"
  if r["state"] == "failed":
    first = r["error"].strip().splitlines()[0][:80] if r["error"] else ""
    return f"**FAILED** {first}".strip()
  held = f"; {r['holder']}" if r.get("holder") else ""
  return f"**{r['state'].upper()}** (step {r['step']}{held})"


def vanilla_memory(rows: list[dict]) -> float:
  """Mean XLA peak of the vanilla runs (the baseline of every ratio), or NaN."""
  base = [r["xla_peak_bytes"] for r in rows if r["model"] == "vanilla"
          and math.isfinite(r["xla_peak_bytes"])]
  return statistics.mean(base) if base else NAN


def vanilla_flops(rows: list[dict]) -> float:
  """Mean training FLOPs per byte of the vanilla runs, or NaN."""
  base = [r["flops_per_byte"] for r in rows if r["model"] == "vanilla"
          and math.isfinite(r["flops_per_byte"])]
  return statistics.mean(base) if base else NAN


def run_table(rows: list[dict]) -> str:
  base, base_flops = vanilla_memory(rows), vanilla_flops(rows)
  front = results_lib.pareto_front([(r["xla_peak_bytes"], r["final_bpb"]) for r in rows])
  return results_lib.markdown_table(
      ["run", "overrides", "status", "params", "XLA peak MiB", "memory / vanilla",
       "analytic MiB", "train MFLOPs/byte", "FLOPs / vanilla", "tokens/s", "final bits/byte",
       "scored tokens", "scored by",
       "best bits/byte", "final perplexity",
       "gzip -9 bits/byte", "xz -9 bits/byte", "Pareto"],
      [[r["name"], _overrides_text(r["overrides"]), _status_text(r),
        r["params"] if r["params"] is not None else "", r["xla_peak_bytes"] / 2**20,
        r["xla_peak_bytes"] / base, r["analytic_peak_bytes"] / 2**20,
        r["flops_per_byte"] / 1e6, r["flops_per_byte"] / base_flops, r["tokens_per_s"],
        r["final_bpb"], r["final_tokens"], r["final_source"], r["best_bpb"],
        r["final_perplexity"], r["gzip_bpb"], r["xz_bpb"],
        "*" if f else ""] for r, f in zip(rows, front)])


def seed_table(rows: list[dict]) -> str | None:
  """Finished runs averaged over `*.seed` overrides; None when nothing varies by seed."""
  groups = results_lib.by_seed(rows, lambda r: _overrides_text(
      {k: v for k, v in r["overrides"].items() if not k.endswith("seed")}))
  if not groups or all(len(g) == 1 for g in groups.values()):
    return None
  base_mem, base_flops = vanilla_memory(rows), vanilla_flops(rows)
  out = []
  for key, g in groups.items():
    bpb = [r["final_bpb"] for r in g]
    mem = statistics.mean(r["xla_peak_bytes"] for r in g)
    flops = statistics.mean(r["flops_per_byte"] for r in g)
    out.append([key or "(all)", len(g), mem / 2**20, mem / base_mem, flops / 1e6,
                flops / base_flops, statistics.mean(r["tokens_per_s"] for r in g),
                statistics.mean(bpb), f"{min(bpb):.4f} - {max(bpb):.4f}"])
  return results_lib.markdown_table(
      ["overrides", "seeds", "XLA peak MiB", "memory / vanilla", "train MFLOPs/byte",
       "FLOPs / vanilla", "tokens/s", "mean final bits/byte", "range"], out)


def baseline_table(rows: list[dict]) -> str | None:
  """Each other setting (finished runs, seeds averaged) against the vanilla
  setting nearest it in XLA peak memory and the one nearest in training
  FLOPs per byte (nearest by ratio), with the difference in mean final
  bits/byte (negative: the other model is ahead). None without both."""
  groups = results_lib.by_seed(rows, lambda r: _overrides_text(
      {k: v for k, v in r["overrides"].items() if not k.endswith("seed")}))

  def mean(g, key):
    return statistics.mean(r[key] for r in g)

  settings = {k: {"model": g[0]["model"], "seeds": len(g), "bpb": mean(g, "final_bpb"),
                  "memory": mean(g, "xla_peak_bytes"), "flops": mean(g, "flops_per_byte")}
              for k, g in groups.items()}
  settings = {k: s for k, s in settings.items()
              if all(math.isfinite(s[m]) and s[m] > 0 for m in ("bpb", "memory", "flops"))}
  vanillas = {k: s for k, s in settings.items() if s["model"] == "vanilla"}
  others = {k: s for k, s in settings.items() if s["model"] != "vanilla"}
  if not vanillas or not others:
    return None
  out = []
  for key, s in others.items():
    row = [key or "(all)", s["seeds"], s["bpb"]]
    for measure in ("memory", "flops"):
      near = min(vanillas, key=lambda v: abs(math.log(s[measure] / vanillas[v][measure])))
      v = vanillas[near]
      row += [near, s[measure] / v[measure], v["bpb"], s["bpb"] - v["bpb"]]
    out.append(row)
  return results_lib.markdown_table(
      ["setting", "seeds", "mean final bits/byte",
       "vanilla nearest in memory", "memory / it", "its bits/byte", "difference",
       "vanilla nearest in FLOPs", "FLOPs / it", "its bits/byte", "difference"], out)


def rate_table(rows: list[dict], key: str = "train.learning_rate") -> str | None:
  """For each setting (finished runs grouped by their other overrides, seeds
  averaged), the rate with the lowest mean final bits/byte and every rate's
  mean; None when no setting tries more than one rate. Unfinished rates are counted,
  so a choice from part of the grid says so, and so does a best rate at the
  edge of the rates that setting tried."""
  groups: dict = {}
  scheduled: dict = {}  # every rate a setting's runs use, finished or not
  for r in rows:
    if key not in r["overrides"]:
      continue
    # Sorted, so runs that list the same overrides in another order group together.
    rest = {k: v for k, v in sorted(r["overrides"].items()) if k != key and not k.endswith("seed")}
    setting = _overrides_text(rest)
    scheduled.setdefault(setting, set()).add(r["overrides"][key])
    if r["state"] == "finished" and math.isfinite(r["final_bpb"]):
      groups.setdefault(setting, {}).setdefault(r["overrides"][key], []).append(r["final_bpb"])
  if all(len(tried) < 2 for tried in scheduled.values()):
    return None  # each setting at its own rate (a comparison at chosen rates): nothing to pick
  out = []
  for setting, by_rate in groups.items():
    means = {rate: statistics.mean(bpb) for rate, bpb in sorted(by_rate.items())}
    best = min(means, key=means.get)
    tried = scheduled[setting]
    # A best rate at the grid's edge may not be the best rate: say so.
    edge = (" (highest tried)" if best == max(tried) and len(tried) > 1 else
            " (lowest tried)" if best == min(tried) and len(tried) > 1 else "")
    out.append([setting or "(all)", grid.format_value(best) + edge, means[best],
                ", ".join(f"{grid.format_value(rate)}: {m:.4f}" for rate, m in means.items()),
                f"{len(means)} of {len(tried)}"])
  return results_lib.markdown_table(
      ["overrides", f"best {key}", "mean final bits/byte", "mean final bits/byte per rate",
       "rates finished"], out)


def plot(rows: list[dict], out_dir: str) -> list[str]:
  import matplotlib

  matplotlib.use("Agg")
  import matplotlib.pyplot as plt

  fig, (ax_train, ax_eval) = plt.subplots(1, 2, figsize=(12, 4.5))
  for r in rows:
    style = "-" if r["state"] == "finished" else ":"
    label = plot_label(r) + ("" if r["state"] == "finished" else f" [{r['state']}]")
    if r["train_curve"]:
      ax_train.plot(*zip(*r["train_curve"]), style, label=label, lw=1)
    if r["eval_curve"]:
      ax_eval.plot(*zip(*r["eval_curve"]), style + "o", label=label, ms=3, lw=1)
  ax_train.set(xlabel="step", ylabel="train loss (nats/token)", title="training loss")
  ax_eval.set(xlabel="step", ylabel="validation bits per byte", title="validation")
  for ax in (ax_train, ax_eval):
    ax.grid(alpha=0.3)
  if any(r["eval_curve"] for r in rows):  # a legend needs a curve
    ax_eval.legend(fontsize=7)
  fig.tight_layout()
  curves = _save(fig, storage.join(out_dir, "loss_curves.png"))

  fig, axes = plt.subplots(1, 3, figsize=(18, 4.5))
  done = [r for r in rows if math.isfinite(r["final_bpb"]) and math.isfinite(r["xla_peak_bytes"])]
  front = results_lib.pareto_front([(r["xla_peak_bytes"], r["final_bpb"]) for r in done])
  scale = {"xla_peak_bytes": 2**20, "flops_per_byte": 1e6, "tokens_per_s": 1}
  for ax, key, label in ((axes[0], "xla_peak_bytes", "XLA peak train-step memory (MiB)"),
                         (axes[1], "flops_per_byte", "training MFLOPs per byte"),
                         (axes[2], "tokens_per_s", "training tokens/s")):
    for r, f in zip(done, front):
      if not math.isfinite(r[key]):
        continue
      x = r[key] / scale[key]
      ax.scatter(x, r["final_bpb"],
                 marker="*" if f else ("o" if r["state"] == "finished" else "x"),
                 s=120 if f else 40)
      note = ax.annotate(plot_label(r, "\n"), (x, r["final_bpb"]), fontsize=6,
                         xytext=(4, 3), textcoords="offset points", va="top")
      note.set_in_layout(False)  # long labels must not squeeze the axes
    ax.set(xlabel=label, ylabel="final validation bits per byte")
    ax.margins(x=0.3, y=0.1)  # room for the labels right of and below the points
    ax.grid(alpha=0.3)
  axes[0].set_title("bits/byte vs memory (* Pareto front, x unfinished)")
  axes[1].set_title("bits/byte vs training FLOPs")
  axes[2].set_title("bits/byte vs speed")
  fig.tight_layout()
  scatter = _save(fig, storage.join(out_dir, "bpb_vs_memory.png"))
  return [curves, scatter]


def _save(fig, path: str) -> str:
  """Writes a figure as PNG to a local path or a URL."""
  import matplotlib.pyplot as plt

  png = io.BytesIO()
  fig.savefig(png, format="png", dpi=110)
  plt.close(fig)
  storage.write_bytes(path, png.getvalue())
  return path


def write(sweep_dir: str) -> tuple[str, list[dict]]:
  """Reads the sweep, writes report.md and the plots; returns (markdown, rows)."""
  spec, rows = results_lib.read_sweep(sweep_dir)
  # Overrides every run shares are stated once; the table shows what differs.
  shared = {k: v for k, v in rows[0]["overrides"].items()
            if all(k in r["overrides"] and r["overrides"][k] == v for r in rows)} if rows else {}
  for r in rows:
    r["overrides"] = {k: v for k, v in r["overrides"].items() if k not in shared}
  counts = {s: sum(r["state"] == s for r in rows) for s in dict.fromkeys(r["state"] for r in rows)}
  text = [f"# Sweep `{spec['sweep']}` of `{spec['config']}`", "",
          f"{len(rows)} runs: " + ", ".join(f"{n} {s}" for s, n in counts.items()), "",
          f"Every run: `{_overrides_text(shared)}` {' '.join(spec.get('extra_flags', []))}"
          if shared or spec.get("extra_flags") else "", "",
          run_table(rows)]
  seeds = seed_table(rows)
  if seeds:
    text += ["", "## Averaged over seeds (finished runs)", "", seeds]
  against = baseline_table(rows)
  if against:
    text += ["", "## Against vanilla at equal memory and at equal FLOPs (finished runs, seeds "
             "averaged; difference < 0: the model is ahead)", "", against]
  rates = rate_table(rows)
  if rates:
    text += ["", "## Best learning rate per setting (finished runs)", "", rates]
  text += ["", "![loss curves](loss_curves.png)", "", "![bits per byte vs memory]"
           "(bpb_vs_memory.png)", ""]
  plot(rows, sweep_dir)
  md = "\n".join(text)
  storage.write_text(storage.join(sweep_dir, "report.md"), md)
  return md, rows


def main(argv):
  cli.start(argv)
  md, _ = cli.run(write, flags.FLAGS.sweep_dir)
  print(md)
  print(f"written: {storage.join(flags.FLAGS.sweep_dir, 'report.md')} and its plots")


if __name__ == "__main__":
  define_flags()
  app.run(main, flags_parser=cli.parse_flags)
