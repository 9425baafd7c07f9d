"""Summaries of finished runs: one row per workdir, markdown tables, Pareto fronts."""

import json
import math
import os
import statistics

from hiertx import metrics


def summarize(workdir: str) -> dict:
  """Headline numbers of one run from its metrics.jsonl and run_info.json."""
  rows = metrics.read_jsonl(os.path.join(workdir, "metrics.jsonl"))
  with open(os.path.join(workdir, "run_info.json")) as f:
    info = json.load(f)
  facts = info["facts"]
  train_rows = [r for r in rows if "train/tokens_per_s" in r]
  evals = [r for r in rows if "eval/bits_per_byte" in r]
  # The first logged interval holds warm-up noise; the median of the rest is steadier.
  speeds = [r["train/tokens_per_s"] for r in train_rows[1:]] or [
      r["train/tokens_per_s"] for r in train_rows]
  return {
      "workdir": workdir,
      "model": info["config"]["model"]["name"],
      "params": int(facts["params/total"]),
      "xla_peak_bytes": int(facts.get("memory/xla_peak_bytes", 0)),
      "tokens_per_s": statistics.median(speeds) if speeds else float("nan"),
      "step": max((r["step"] for r in rows), default=0),
      "final_bpb": evals[-1]["eval/bits_per_byte"] if evals else float("nan"),
      "best_bpb": min((r["eval/bits_per_byte"] for r in evals), default=float("nan")),
      "final_perplexity": evals[-1]["eval/perplexity"] if evals else float("nan"),
      # Content groups (hiertx.boundaries) at the last evaluation.
      "mean_group_length": evals[-1].get("eval/mean_group_length", float("nan"))
                           if evals else float("nan"),
      "dropped_closes": evals[-1].get("eval/dropped_closes", float("nan"))
                        if evals else float("nan"),
      "config": info["config"],
  }


def pareto_front(points: list[tuple[float, float]]) -> list[bool]:
  """True where no other point is <= in both coordinates and < in one (minimising)."""
  out = []
  for i, (x, y) in enumerate(points):
    dominated = any((a <= x and b <= y) and (a < x or b < y)
                    for j, (a, b) in enumerate(points) if j != i)
    out.append(not dominated and math.isfinite(x) and math.isfinite(y))
  return out


def markdown_table(header: list[str], rows: list[list]) -> str:
  def cell(v):
    if isinstance(v, float):
      return "nan" if not math.isfinite(v) else (f"{v:,.0f}" if abs(v) >= 1000 else f"{v:.4g}")
    return f"{v:,}" if isinstance(v, int) else str(v)
  lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
  lines += ["| " + " | ".join(cell(v) for v in row) + " |" for row in rows]
  return "\n".join(lines)
