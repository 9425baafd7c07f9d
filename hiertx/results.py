"""Reading runs back: one row per run directory (the one reader launch/report.py,
experiments and sweeps share), seed groups, markdown tables, Pareto fronts."""

import json
import math
import statistics

from hiertx import checkpoint
from hiertx import lease as lease_lib
from hiertx import metrics
from hiertx import storage
from hiertx.errors import HiertxError


NAN = float("nan")


class ReportError(HiertxError):
  """A directory to report on is not what the report needs."""


def run_state(workdir: str) -> dict:
  """A run's status.json, corrected by its lease: a run whose status says
  running but whose lease nobody holds any more (killed before it could say
  so) is 'stopped'; one whose status is older than its live lease (a second
  start, still compiling) is 'running'. Adds 'holder' (hiertx.lease.describe)
  while a process holds the run."""
  status = dict(checkpoint.read_status(workdir))
  record = lease_lib.current(workdir)
  held = lease_lib.state(record) == "held"
  if held:
    status["holder"] = lease_lib.describe(record)
    if status["state"] != "running":
      status["state"] = "running"
  elif status["state"] == "running":
    status["state"] = "stopped"
  return status


def read_run(workdir: str, name: str | None = None, overrides: dict | None = None) -> dict:
  """One run's state, headline numbers and curves from its directory
  (status.json, run_info.json, metrics.jsonl); what is missing reads as NaN,
  None or empty, so a run that failed or never started still has a row."""
  status = run_state(workdir)
  row = {"name": name or storage.name(workdir), "workdir": workdir,
         "overrides": dict(overrides or {}), "state": status["state"],
         "holder": status.get("holder", ""),
         "error": status.get("error", ""), "model": "", "config": {}, "seed": None,
         "steps": None, "params": None, "xla_peak_bytes": NAN, "analytic_peak_bytes": NAN,
         "device_peak_bytes": None, "tokens_per_s": NAN, "step": 0, "final_bpb": NAN,
         "best_bpb": NAN, "final_perplexity": NAN, "gzip_bpb": NAN, "xz_bpb": NAN,
         "final_tokens": NAN, "final_source": "", "mean_group_length": NAN,
         "dropped_closes": NAN, "flops_per_byte": NAN, "train_curve": [], "eval_curve": []}
  info_path = storage.join(workdir, "run_info.json")
  if storage.exists(info_path):
    info = json.loads(storage.read_text(info_path))
    facts, config = info.get("facts", {}), info.get("config", {})
    row.update(config=config, model=config.get("model", {}).get("name", ""),
               seed=config.get("train", {}).get("seed"),
               steps=config.get("train", {}).get("steps"),
               params=int(facts["params/total"]) if "params/total" in facts else None,
               xla_peak_bytes=facts.get("memory/xla_peak_bytes", NAN),
               analytic_peak_bytes=facts.get("memory/analytic_peak_bytes", NAN),
               # Model FLOPs of a step per token; per byte once the bytes a
               # token stands for are known (below).
               flops_per_byte=facts.get("flops/step_model", NAN) / info.get(
                   "tokens_per_step", NAN))
  path = storage.join(workdir, "metrics.jsonl")
  if not storage.exists(path):
    return row
  rows = metrics.read_jsonl(path)
  speeds = [r["train/tokens_per_s"] for r in rows if "train/tokens_per_s" in r]
  evals = [r for r in rows if "eval/bits_per_byte" in r]
  last = evals[-1] if evals else {}
  device = [r["memory/device_peak_bytes"] for r in rows if "memory/device_peak_bytes" in r]
  row.update(
      # The first logged interval holds warm-up noise; the median of the rest is steadier.
      tokens_per_s=statistics.median(speeds[1:] or speeds) if speeds else NAN,
      step=max((r["step"] for r in rows), default=0),
      device_peak_bytes=device[-1] if device else None,
      final_bpb=last.get("eval/bits_per_byte", NAN),
      best_bpb=min((r["eval/bits_per_byte"] for r in evals), default=NAN),
      final_perplexity=last.get("eval/perplexity", NAN),
      # The compressors on the same evaluation text, logged at the last evaluation.
      gzip_bpb=next((r["eval/gzip_bits_per_byte"] for r in reversed(evals)
                     if "eval/gzip_bits_per_byte" in r), NAN),
      xz_bpb=next((r["eval/xz_bits_per_byte"] for r in reversed(evals)
                   if "eval/xz_bits_per_byte" in r), NAN),
      # Content groups (hiertx.boundaries) at the last evaluation.
      mean_group_length=last.get("eval/mean_group_length", NAN),
      dropped_closes=last.get("eval/dropped_closes", NAN),
      train_curve=[(r["step"], r["train/loss"]) for r in rows if "train/loss" in r],
      eval_curve=[(r["step"], r["eval/bits_per_byte"]) for r in evals])
  # Bytes per token from the last evaluation (loss / (bits per byte x ln 2));
  # 1 for bytes but for EOS, about 4 for a SentencePiece vocabulary.
  bytes_per_token = (last["eval/loss"] / (last["eval/bits_per_byte"] * math.log(2))
                     if last.get("eval/bits_per_byte") and "eval/loss" in last else NAN)
  row["flops_per_byte"] = row["flops_per_byte"] / bytes_per_token
  if last:
    row.update(final_tokens=last.get("eval/tokens", NAN), final_source="training")
    _prefer_later_evaluation(row, workdir, last["step"])
  return row


def _prefer_later_evaluation(row: dict, workdir: str, step: int) -> None:
  """Takes the final numbers from `hiertx.evaluate`'s result for the final
  checkpoint (`eval_<split>_<step>.json`, usually scored on more text than
  the trainer's periodic evaluation) where there is one."""
  split = row["config"].get("eval", {}).get("split", "validation")
  path = storage.join(workdir, f"eval_{split}_{step}.json")
  if not storage.exists(path):
    return
  result = json.loads(storage.read_text(path))
  row.update(final_bpb=result["eval/bits_per_byte"], final_perplexity=result["eval/perplexity"],
             final_tokens=result["eval/tokens"], final_source=storage.name(path),
             gzip_bpb=result.get("gzip_bits_per_byte", row["gzip_bpb"]),
             xz_bpb=result.get("xz_bits_per_byte", row["xz_bpb"]))


def read_sweep(sweep_dir: str) -> tuple[dict, list[dict]]:
  """(sweep.json, a read_run row per run) of a directory launch/sweep.py ran in."""
  path = storage.join(storage.check(sweep_dir, "--sweep_dir"), "sweep.json")
  if not storage.exists(path):
    raise ReportError(f"{sweep_dir} has no sweep.json: run launch/sweep.py there first "
                      "(or give the directory it ran in)")
  spec = json.loads(storage.read_text(path))
  return spec, [read_run(r["workdir"], r["name"], r.get("overrides")) for r in spec["runs"]]


def by_seed(rows: list[dict], key) -> dict:
  """Finished runs grouped by `key(row)` (what is left when the seed is set
  aside), each group ordered by seed; groups in first-seen order."""
  groups: dict = {}
  for r in rows:
    if r["state"] == "finished":
      groups.setdefault(key(r), []).append(r)
  return {k: sorted(g, key=lambda r: (r["seed"] is None, r["seed"] or 0))
          for k, g in groups.items()}


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
