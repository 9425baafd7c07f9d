"""The experiment scripts on tiny shapes: they run and report what they claim."""

import os
import sys

import pytest

from conftest import ROOT
from hiertx import report

sys.path.insert(0, os.path.join(ROOT, "experiments"))
import bench  # noqa: E402
import decode_bench  # noqa: E402
import memory_depth  # noqa: E402
import seq_scaling  # noqa: E402


def test_pareto_front():
  points = [(1.0, 3.0), (2.0, 2.0), (3.0, 3.0), (2.0, 1.5), (4.0, 1.0)]
  assert report.pareto_front(points) == [True, False, False, True, True]


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


def test_bench_measures_mfu_against_a_peak():
  rows = bench.measure(["top_down.py:size=tiny", "vanilla.py:size=tiny;model.num_layers=3"],
                       [(8, 64)], 2, [], 1e11)
  assert [r["model"] for r in rows] == ["top_down", "vanilla"]
  for r in rows:
    assert r["step_s"] > 0
    assert r["mfu"] == pytest.approx(r["flops_per_s"] / 1e11)
    assert r["tokens_per_s"] == pytest.approx(8 * 64 / r["step_s"])
  assert rows[1]["params"] > rows[0]["params"] - 10**6  # the per-run override took
  assert "| top_down.py:size=tiny | 8x64 |" in bench.table(rows)
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
