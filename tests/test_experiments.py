"""The experiment scripts on tiny shapes: they run and report what they claim."""

import json
import math
import os
import subprocess
import sys

import pytest

from conftest import PRODUCTION_EMITTERS, ROOT, one_device_env
from hiertx import device_stats, metrics, results, xla_options
from hiertx.errors import HiertxError

# experiments/ (pytest.ini's pythonpath)
import bench
import boundary_sources as boundaries_experiment
import decode_bench
import memory_depth
import seq_scaling


def test_pareto_front():
  points = [(1.0, 3.0), (2.0, 2.0), (3.0, 3.0), (2.0, 1.5), (4.0, 1.0)]
  assert results.pareto_front(points) == [True, False, False, True, True]


def test_memory_depth_compiles_and_compares():
  rows = memory_depth.measure(["vanilla.py:size=tiny", "bottom_up.py:size=tiny"], 64, 8, [])
  assert [r["model"] for r in rows] == ["vanilla", "bottom_up"]
  assert all(r["peak"] > r["temp"] > 0 for r in rows)
  assert rows[1]["layers"] == 5  # 3 scales x 1 + aggregation + 1 post
  assert all(r["analytic"] > 0 for r in rows)
  text = memory_depth.table(rows, "vanilla.py:size=tiny")
  assert "| vanilla.py:size=tiny | vanilla | 2 |" in text and "1.000" in text
  assert "analytic / XLA" in text


def test_seq_scaling_reports_growth_per_doubling():
  rows = seq_scaling.measure(["vanilla.py:size=tiny"], [64, 128, 256], 8, 64, [])
  assert [(r["run"], r["seq_len"]) for r in rows] == [
      ("vanilla.py:size=tiny", 64), ("vanilla.py:size=tiny", 128), ("vanilla.py:size=tiny", 256)]
  assert rows[0]["step_s"] > 0 and rows[1]["step_s"] is None  # timed only up to 64
  vanilla = [r["activations"] for r in rows[:3]]
  assert vanilla[0] < vanilla[1] < vanilla[2]
  per, total = seq_scaling.growth(rows, "activations", 64)["vanilla.py:size=tiny"]
  assert per[128] == pytest.approx(vanilla[1] / vanilla[0])
  assert total == pytest.approx(vanilla[2] / vanilla[0])
  text = seq_scaling.table(rows)
  assert "activation x 64->256" in text and text.count("\n| vanilla.py:size=tiny |") == 4


def test_bench_measures_mfu_against_the_peak_of_its_dtype(monkeypatch):
  options = {**xla_options.compile_options(), **PRODUCTION_EMITTERS}  # its loop count
  monkeypatch.setattr(xla_options, "compile_options", lambda: options)
  rows = bench.measure(["top_down.py:size=tiny",
                        "vanilla.py:size=tiny;model.num_layers=3;model.dtype=bfloat16"],
                       [(8, 64)], 2, [])
  assert [r["model"] for r in rows] == ["top_down", "vanilla"]
  for r, dtype in zip(rows, ("float32", "bfloat16")):
    assert r["step_s"] > 0 and r["dtype"] == dtype
    assert r["peak"] == device_stats.peak_flops(dtype)[0]
    assert r["mfu"] == pytest.approx(r["flops_per_s"] / r["peak"])
    # Blockwise attention recomputes its scores: hardware FLOPs exceed model FLOPs.
    assert r["hfu"] > r["mfu"]
    assert r["tokens_per_s"] == pytest.approx(8 * 64 / r["step_s"])
  assert rows[0]["peak"] != rows[1]["peak"]
  assert all(r["while_loops"] == 0 for r in rows)  # blockwise attention runs no loop
  assert rows[1]["params"] > rows[0]["params"] - 10**6  # the per-run override took
  assert "| top_down.py:size=tiny | 8x64 | float32 |" in bench.table(rows)
  assert bench.by_shape(rows).count("\n| 8x64 |") == 1


def test_decode_bench_compares_cached_and_recomputed_generation():
  rows = decode_bench.measure(["vanilla.py:size=tiny", "retina.py:size=tiny"], [64, 128], 4, 1,
                              [])
  assert [(r["model"], r["context"]) for r in rows] == [
      ("vanilla", 64), ("vanilla", 128), ("retina", 64), ("retina", 128)]
  for r in rows:
    assert r["cached_tok_s"] > 0 and r["recompute_tok_s"] > 0
    assert r["speedup"] == pytest.approx(r["cached_tok_s"] / r["recompute_tok_s"])
    assert r["prefill_s"] > 0 and r["feed_s"] > 0
  # Vanilla keeps every key: its cache grows with the positions it holds
  # (context + new tokens, 68 then 132); retina's window rings do not grow.
  assert rows[1]["cache_bytes"] * 68 == rows[0]["cache_bytes"] * 132
  assert rows[3]["cache_bytes"] / rows[2]["cache_bytes"] < 132 / 68
  table = decode_bench.table(rows)
  assert "cache / first context" in table and "prompt s (parallel)" in table


def _fake_run(workdir, corpus, model, seed, bpb, group, reached=1000):
  """A finished (or not) run's files as the trainer writes them."""
  os.makedirs(workdir)
  config = {"model": {"name": "hourglass", "hierarchy": "2@1 4@4 2@1", "entropy_threshold": 4.4,
                      "boundary_temperature": 0.0, **model},
            "data": {"text_files": corpus, "task": "stdlib"},
            "train": {"seed": seed, "steps": 1000}}
  with open(os.path.join(workdir, "run_info.json"), "w") as f:
    json.dump({"config": config, "facts": {"params/total": 10,
                                           "memory/xla_peak_bytes": 2**20 * 100,
                                           "flops/step_model": 2e9 * (1 + seed)},
               "tokens_per_step": 2000}, f)
  ev = {"eval/bits_per_byte": bpb, "eval/perplexity": 2.0, "eval/loss": bpb * math.log(2)}
  if model.get("boundaries", "fixed") != "fixed":
    ev.update({"eval/mean_group_length": group, "eval/dropped_closes": 0.01})
  with open(os.path.join(workdir, "status.json"), "w") as f:
    json.dump({"state": "finished" if reached == 1000 else "interrupted"}, f)
  with open(os.path.join(workdir, "metrics.jsonl"), "w") as f:
    for step, row in ((10, {"train/tokens_per_s": 1.0, "train/loss": 3.0}),
                      (20, {"train/tokens_per_s": 1000.0, "train/loss": 2.0}), (reached, ev)):
      f.write(json.dumps({"step": step, **row}) + "\n")


def test_boundaries_table_per_corpus_and_arm(tmp_path):
  """Arms are told apart by their settings, seeds are averaged, unfinished
  runs are left out, and the plot is written."""
  runs = []
  for corpus in ("", "/data/tiny.txt"):
    d = tmp_path / (corpus.strip("/").replace("/", "_") or "stdlib")
    arms = [({}, 3.0, 0), ({"hierarchy": "2@1 4@8 2@1"}, 3.2, 0),
            ({"boundaries": "whitespace"}, 3.1, 6.0), ({"boundaries": "learned"}, 3.3, 4.2),
            ({"boundaries": "dynamic"}, 2.9, 3.3),
            ({"boundaries": "dynamic", "hierarchy": "2@1 4@8 2@1"}, 3.0, 6.5),
            ({"boundaries": "dynamic", "hierarchy": "2@1 1@2 4@4 1@2 2@1"}, 2.8, 2.1),
            ({"boundaries": "learned", "boundary_predictor": "dtp"}, 3.2, 4.0),
            # with noise: sampled at evaluation, or saved before that (a threshold)
            ({"boundaries": "learned", "boundary_temperature": 1.0, "boundary_eval": "sample"},
             3.0, 4.1),
            ({"boundaries": "learned", "boundary_temperature": 1.0}, 3.4, 15.0)]
    runs = []
    for i, (model, bpb, group) in enumerate(arms):
      for seed in (0, 1):
        name = f"run{i}-{seed}"
        _fake_run(str(d / name), corpus, model, seed, bpb + 0.1 * seed, group,
                  reached=1000 if (i, seed) != (3, 1) else 500)
        runs.append({"name": name, "workdir": str(d / name)})
    runs.append({"name": "never", "workdir": str(d / "never")})
    with open(d / "sweep.json", "w") as f:
      json.dump({"runs": runs}, f)
  rows = (boundaries_experiment.load(str(tmp_path / "stdlib"))
          + boundaries_experiment.load(str(tmp_path / "data_tiny.txt")))
  text, summary = boundaries_experiment.table(rows)
  assert "| stdlib | fixed k=4 | 2 | 3.000, 3.100 | 3.050 | 100 | 1,000 | 4 | 0 |" in text
  assert "| tiny.txt | fixed k=8 | 2 |" in text
  assert "| stdlib | whitespace | 2 | 3.100, 3.200 | 3.150 | 100 | 1,000 | 6 | 1.00% |" in text
  assert "| stdlib | learned, noise 0 | 1 | 3.300 |" in text  # seed 1 did not finish
  assert "| stdlib | dynamic, target 1/4 | 2 | 2.900, 3.000 |" in text
  assert "| tiny.txt | dynamic, target 1/8 | 2 | 3.000, 3.100 |" in text
  assert "| stdlib | dynamic 2-stage, targets 1/2, 1/2 | 2 | 2.800, 2.900 |" in text
  assert "| stdlib | learned (DTP predictor), noise 0 | 2 | 3.200, 3.300 |" in text
  assert "| stdlib | learned, noise 1 | 2 | 3.000, 3.100 |" in text
  assert "| stdlib | learned, noise 1, evaluated at logit > 0 | 2 | 3.400, 3.500 |" in text
  # Training FLOPs per byte, the seeds' mean: (2e9 + 4e9) / 2 per step over
  # the bytes a step reads (2,000 tokens of one byte each).
  flops = [s["flops"] for s in summary if s["boundaries"] == "whitespace"]
  assert flops == pytest.approx([1.5e6, 1.5e6]) and "| 1.50 |" in text
  plot = tmp_path / "plot.png"
  boundaries_experiment.plot(summary, str(plot))
  assert plot.stat().st_size > 1000
  with pytest.raises(HiertxError, match="has no sweep.json: run launch/sweep.py"):
    boundaries_experiment.load(str(tmp_path / "nothing"))


def test_claim_device_trains_in_its_own_process_and_scores_the_whole_split(tmp_path):
  """--runlocal: the accelerator command at toy size (one model here: each
  trains in its own process, so a second adds only time), scored on the
  whole validation split; a rerun reports the finished model without
  training it again."""
  cmd = [sys.executable, "experiments/claim_device.py", "--runlocal", "--steps=4",
         "--runs=hourglass.py:size=tiny", f"--workdir={tmp_path}"]
  first = subprocess.run(cmd, cwd=ROOT, env=one_device_env(), capture_output=True, text=True,
                         timeout=300)
  assert first.returncode == 0, first.stdout[-2000:] + first.stderr[-2000:]
  rows = [[c.strip() for c in line.strip("|").split("|")] for line in first.stdout.splitlines()
          if line.startswith("| hourglass-tiny |")]
  assert len(rows) == 1
  assert rows[0][2:4] == ["4", f"{4 * 8 * 64:,}"]  # steps, train tokens
  assert 0 < float(rows[0][4]) < 9  # bits per byte on the validation split
  assert rows[0][5] == "+0.0000" and rows[0][10] == "1.00"  # against itself, the first run
  scored = metrics.read_jsonl(str(tmp_path / "hourglass-tiny" / "metrics.jsonl"))[-1]
  assert scored["eval/tokens"] > 100_000  # the whole split (136,390 bytes), not a sample
  again = subprocess.run(cmd, cwd=ROOT, env=one_device_env(), capture_output=True, text=True,
                         timeout=300)
  assert again.returncode == 0 and "finished before, not rerun" in again.stdout
  assert rows[0][4] in again.stdout


def test_gpu_check_dry_run_ends_in_one_summary_table(tmp_path):
  """experiments/gpu_check.sh at tiny sizes on CPU: its bench parts and the
  profile (trained from an exported cache, so no TensorFlow is needed where
  it runs) finish, and it ends in the summary table with tokens/s, MFU, the
  hourglass/vanilla ratio and each site's kernel; a missing cache is named
  with the command that makes it."""
  from hiertx import config as config_lib
  from hiertx import data
  cache = tmp_path / "cache_64"  # what prepare_data --export writes, from the suite's cache
  config = config_lib.resolved(config_lib.load(os.path.join(ROOT, "configs/hourglass.py")
                                               + ":size=tiny"))
  data.export(config.data, str(cache), ["train", "validation"])
  env = {**one_device_env(), "SHAPE": "2x64", "WIDTH": "", "DTYPE": "", "SIZE14": "tiny",
         "SIZE30": "tiny", "ATTENTION": "", "STEPS": "1", "CACHE": str(cache),
         "PARTS": "vanilla hourglass profile", "PYTHON": sys.executable}
  out = tmp_path / "out"
  r = subprocess.run(["bash", "experiments/gpu_check.sh", str(out)], cwd=ROOT, env=env,
                     capture_output=True, text=True, timeout=600)
  assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-2000:]
  summary = r.stdout.split("== summary")[1]
  rows = {line.split("|")[1].strip(): [c.strip() for c in line.strip("|").split("|")]
          for line in summary.splitlines() if line.startswith("| ")}
  for part, sites in (("vanilla", "blockwise 2"), ("hourglass", "blockwise 5")):
    assert rows[part][1:3] == ["2x64", "float32"] and rows[part][7] == sites, rows
    assert float(rows[part][3].replace(",", "")) > 0 and rows[part][5].endswith("%")
  ratio = float(rows["hourglass / vanilla step time"][1])
  assert 0 < ratio < 20 and "not finished" not in summary
  assert "ms of ops in the traced steps" in (out / "profile_top.txt").read_text()
  r = subprocess.run(["bash", "experiments/gpu_check.sh", str(tmp_path / "again")], cwd=ROOT,
                     env={**env, "CACHE": str(tmp_path / "none"), "PARTS": "profile"},
                     capture_output=True, text=True, timeout=300)
  assert f"error: no exported cache at {tmp_path / 'none'}" in r.stdout
  assert "not finished:\n- profile: error: no exported cache" in r.stdout
