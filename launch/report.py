r"""Gathers a sweep's runs into one report: a markdown table (one row per run,
failed and unfinished runs flagged, not dropped; memory relative to the
vanilla runs; `gzip -9` and `xz -9` bits per byte of the same evaluation
text; the Pareto front of memory against bits per byte), a table
averaged over seeds, and PNG plots (loss curves; bits per byte against XLA
peak memory and against training speed).

  python launch/report.py --sweep_dir=/tmp/hiertx_sweeps/compare-paper_claim

Writes <sweep_dir>/report.md, loss_curves.png and bpb_vs_memory.png.
Works while a sweep is still running, and on sweeps run by any target.
"""

import json
import math
import os
import statistics
import sys

from absl import app, flags

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from hiertx import checkpoint  # noqa: E402
from hiertx import cli  # noqa: E402
from hiertx import metrics  # noqa: E402
from hiertx import report as report_lib  # noqa: E402
from hiertx import sweep  # noqa: E402

NAN = float("nan")


def define_flags() -> None:
  flags.DEFINE_string("sweep_dir", None, "Directory launch/sweep.py ran in.", required=True)


def load_run(run: dict) -> dict:
  """One run's status, headline numbers and curves; missing files give NaNs."""
  workdir = run["workdir"]
  status = checkpoint.read_status(workdir)
  row = {"name": run["name"], "overrides": run["overrides"], "state": status["state"],
         "error": status.get("error", ""), "model": "", "params": None, "xla_peak_bytes": NAN,
         "analytic_peak_bytes": NAN, "tokens_per_s": NAN, "step": 0, "final_bpb": NAN,
         "best_bpb": NAN, "final_perplexity": NAN, "gzip_bpb": NAN, "xz_bpb": NAN,
         "train_curve": [], "eval_curve": []}
  path = os.path.join(workdir, "metrics.jsonl")
  if not os.path.exists(path):
    return row
  rows = metrics.read_jsonl(path)
  facts = {}
  if os.path.exists(os.path.join(workdir, "run_info.json")):
    with open(os.path.join(workdir, "run_info.json")) as f:
      info = json.load(f)
    facts = info["facts"]
    row["model"] = info["config"]["model"]["name"]
  speeds = [r["train/tokens_per_s"] for r in rows if "train/tokens_per_s" in r]
  evals = [r for r in rows if "eval/bits_per_byte" in r]
  row.update(
      params=int(facts["params/total"]) if "params/total" in facts else None,
      xla_peak_bytes=facts.get("memory/xla_peak_bytes", NAN),
      analytic_peak_bytes=facts.get("memory/analytic_peak_bytes", NAN),
      # The first interval holds warm-up; the median of the rest is steadier.
      tokens_per_s=statistics.median(speeds[1:] or speeds) if speeds else NAN,
      step=max((r["step"] for r in rows), default=0),
      final_bpb=evals[-1]["eval/bits_per_byte"] if evals else NAN,
      best_bpb=min((r["eval/bits_per_byte"] for r in evals), default=NAN),
      final_perplexity=evals[-1]["eval/perplexity"] if evals else NAN,
      # The compressors on the same evaluation text, logged at the last evaluation.
      gzip_bpb=next((r["eval/gzip_bits_per_byte"] for r in reversed(evals)
                     if "eval/gzip_bits_per_byte" in r), NAN),
      xz_bpb=next((r["eval/xz_bits_per_byte"] for r in reversed(evals)
                   if "eval/xz_bits_per_byte" in r), NAN),
      train_curve=[(r["step"], r["train/loss"]) for r in rows if "train/loss" in r],
      eval_curve=[(r["step"], r["eval/bits_per_byte"]) for r in evals])
  return row


def _overrides_text(overrides: dict) -> str:
  return " ".join(f"{k.removeprefix('arg.')}={sweep.format_value(v)}"
                  for k, v in overrides.items())


def _status_text(r: dict) -> str:
  if r["state"] == "finished":
    return "finished"
  if r["state"] == "failed":
    first = r["error"].strip().splitlines()[0][:80] if r["error"] else ""
    return f"**FAILED** {first}".strip()
  return f"**{r['state'].upper()}** (step {r['step']})"


def vanilla_memory(rows: list[dict]) -> float:
  """Mean XLA peak of the vanilla runs (the baseline of every ratio), or NaN."""
  base = [r["xla_peak_bytes"] for r in rows if r["model"] == "vanilla"
          and math.isfinite(r["xla_peak_bytes"])]
  return statistics.mean(base) if base else NAN


def run_table(rows: list[dict]) -> str:
  base = vanilla_memory(rows)
  front = report_lib.pareto_front([(r["xla_peak_bytes"], r["final_bpb"]) for r in rows])
  return report_lib.markdown_table(
      ["run", "overrides", "status", "params", "XLA peak MiB", "memory / vanilla",
       "analytic MiB", "tokens/s", "final bits/byte", "best bits/byte", "final perplexity",
       "gzip -9 bits/byte", "xz -9 bits/byte", "Pareto"],
      [[r["name"], _overrides_text(r["overrides"]), _status_text(r),
        r["params"] if r["params"] is not None else "", r["xla_peak_bytes"] / 2**20,
        r["xla_peak_bytes"] / base, r["analytic_peak_bytes"] / 2**20, r["tokens_per_s"],
        r["final_bpb"], r["best_bpb"], r["final_perplexity"], r["gzip_bpb"], r["xz_bpb"],
        "*" if f else ""] for r, f in zip(rows, front)])


def seed_table(rows: list[dict]) -> str | None:
  """Finished runs averaged over `*.seed` overrides; None when nothing varies by seed."""
  groups: dict[str, list[dict]] = {}
  for r in rows:
    if r["state"] != "finished":
      continue
    key = _overrides_text({k: v for k, v in r["overrides"].items() if not k.endswith("seed")})
    groups.setdefault(key, []).append(r)
  if not groups or all(len(g) == 1 for g in groups.values()):
    return None
  base_mem = vanilla_memory(rows)
  out = []
  for key, g in groups.items():
    bpb = [r["final_bpb"] for r in g]
    mem = statistics.mean(r["xla_peak_bytes"] for r in g)
    out.append([key or "(all)", len(g), mem / 2**20, mem / base_mem,
                statistics.mean(r["tokens_per_s"] for r in g), statistics.mean(bpb),
                f"{min(bpb):.4f} - {max(bpb):.4f}"])
  return report_lib.markdown_table(
      ["overrides", "seeds", "XLA peak MiB", "memory / vanilla", "tokens/s",
       "mean final bits/byte", "range"], out)


def plot(rows: list[dict], out_dir: str) -> list[str]:
  import matplotlib  # noqa: PLC0415

  matplotlib.use("Agg")
  import matplotlib.pyplot as plt  # noqa: PLC0415

  fig, (ax_train, ax_eval) = plt.subplots(1, 2, figsize=(12, 4.5))
  for r in rows:
    style = "-" if r["state"] == "finished" else ":"
    label = r["name"] + ("" if r["state"] == "finished" else f" [{r['state']}]")
    if r["train_curve"]:
      ax_train.plot(*zip(*r["train_curve"]), style, label=label, lw=1)
    if r["eval_curve"]:
      ax_eval.plot(*zip(*r["eval_curve"]), style + "o", label=label, ms=3, lw=1)
  ax_train.set(xlabel="step", ylabel="train loss (nats/token)", title="training loss")
  ax_eval.set(xlabel="step", ylabel="validation bits per byte", title="validation")
  for ax in (ax_train, ax_eval):
    ax.grid(alpha=0.3)
  ax_eval.legend(fontsize=7)
  fig.tight_layout()
  curves = os.path.join(out_dir, "loss_curves.png")
  fig.savefig(curves, dpi=110)
  plt.close(fig)

  fig, axes = plt.subplots(1, 2, figsize=(12, 4.5))
  done = [r for r in rows if math.isfinite(r["final_bpb"]) and math.isfinite(r["xla_peak_bytes"])]
  front = report_lib.pareto_front([(r["xla_peak_bytes"], r["final_bpb"]) for r in done])
  for ax, key, label in ((axes[0], "xla_peak_bytes", "XLA peak train-step memory (MiB)"),
                         (axes[1], "tokens_per_s", "training tokens/s")):
    for r, f in zip(done, front):
      x = r[key] / 2**20 if key == "xla_peak_bytes" else r[key]
      ax.scatter(x, r["final_bpb"],
                 marker="*" if f else ("o" if r["state"] == "finished" else "x"),
                 s=120 if f else 40)
      ax.annotate(r["name"], (x, r["final_bpb"]), fontsize=7, xytext=(4, 3),
                  textcoords="offset points")
    ax.set(xlabel=label, ylabel="final validation bits per byte")
    ax.grid(alpha=0.3)
  axes[0].set_title("bits/byte vs memory (* Pareto front, x unfinished)")
  axes[1].set_title("bits/byte vs speed")
  fig.tight_layout()
  scatter = os.path.join(out_dir, "bpb_vs_memory.png")
  fig.savefig(scatter, dpi=110)
  plt.close(fig)
  return [curves, scatter]


def write(sweep_dir: str) -> tuple[str, list[dict]]:
  """Reads the sweep, writes report.md and the plots; returns (markdown, rows)."""
  path = os.path.join(sweep_dir, "sweep.json")
  if not os.path.exists(path):
    raise FileNotFoundError(f"{path} not found: is {sweep_dir} a directory launch/sweep.py "
                            "ran in?")
  with open(path) as f:
    spec = json.load(f)
  rows = [load_run(r) for r in spec["runs"]]
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
  text += ["", "![loss curves](loss_curves.png)", "", "![bits per byte vs memory]"
           "(bpb_vs_memory.png)", ""]
  plot(rows, sweep_dir)
  md = "\n".join(text)
  with open(os.path.join(sweep_dir, "report.md"), "w") as f:
    f.write(md)
  return md, rows


def main(argv):
  del argv
  try:
    md, _ = write(flags.FLAGS.sweep_dir)
  except FileNotFoundError as e:
    sys.exit(f"error: {e}")
  print(md)
  print(f"written: {os.path.join(flags.FLAGS.sweep_dir, 'report.md')} and its plots")


if __name__ == "__main__":
  define_flags()
  app.run(main, flags_parser=cli.parse_flags)
