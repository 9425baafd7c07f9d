"""Every architecture trains through the real trainer with decreasing loss."""

import os

import pytest

from hiertx import metrics, train


@pytest.mark.parametrize("name", ["bottom_up", "top_down", "retina", "hourglass"])
def test_model_trains_with_decreasing_loss(name, tiny_config, tmp_path):
  config = tiny_config(name, train__steps=16, eval__every=8)
  train.train_and_evaluate(config, str(tmp_path))
  rows = metrics.read_jsonl(os.path.join(tmp_path, "metrics.jsonl"))
  losses = [r["train/loss"] for r in rows if "train/loss" in r]
  assert len(losses) == 4 and losses[-1] < losses[0] - 0.5, losses
  # Validation improves between the two evaluations, to below the 8.0 bits of a
  # uniform guess over 256 bytes.
  bpb = [r["eval/bits_per_byte"] for r in rows if "eval/bits_per_byte" in r]
  assert len(bpb) == 2 and bpb[1] < bpb[0] - 0.1 and bpb[1] < 8.0, bpb
  assert rows[0]["memory/xla_peak_bytes"] > 0
