"""Every architecture trains through the real trainer with decreasing loss (top_down
in float32 and in mixed precision)."""

import os

import numpy as np
import pytest

from hiertx import metrics, train


def _assert_learns(rows):
  losses = [r["train/loss"] for r in rows if "train/loss" in r]
  assert losses[-1] < losses[0] - 0.5, losses
  # Validation improves between the two evaluations, to below the 8.0 bits of a
  # uniform guess over 256 bytes.
  bpb = [r["eval/bits_per_byte"] for r in rows if "eval/bits_per_byte" in r]
  assert len(bpb) == 2 and bpb[1] < bpb[0] - 0.1 and bpb[1] < 8.0, bpb
  assert rows[0]["memory/xla_peak_bytes"] > 0


# top_down: trained in both precisions below.
@pytest.mark.parametrize("name", ["bottom_up", "retina", "hourglass"])
def test_model_trains_with_decreasing_loss(name, tiny_config, tmp_path):
  config = tiny_config(name, train__steps=16, eval__every=8)
  train.train_and_evaluate(config, str(tmp_path))
  rows = metrics.read_jsonl(os.path.join(tmp_path, "metrics.jsonl"))
  assert len([r for r in rows if "train/loss" in r]) == 4
  _assert_learns(rows)


def test_bfloat16_training_tracks_float32(tiny_config, tmp_path):
  """The same tiny run in float32 and in mixed precision (bfloat16 matmuls and
  activations; float32 parameters, optimizer state, softmax and layer-norm
  statistics, logits and loss). Tolerance: a bfloat16 value carries a relative
  rounding error of at most 2^-9 (0.2%); the loss averages 512 tokens, so most
  of that cancels, and the two runs stay within 0.03% of each other here over
  20 steps. 1% leaves room for other shapes and CPUs and still catches a run
  that drifts (a bfloat16 optimizer or loss, or a diverging step, moves the
  losses by far more)."""
  losses = {}
  for dtype in ("float32", "bfloat16"):
    config = tiny_config("top_down", model__dtype=dtype, train__log_every=1,
                         eval__every=10, train__checkpoint_every=20)
    workdir = str(tmp_path / dtype)
    train.train_and_evaluate(config, workdir)
    rows = metrics.read_jsonl(os.path.join(workdir, "metrics.jsonl"))
    _assert_learns(rows)  # top_down's training test, in both precisions
    losses[dtype] = np.array([r["train/loss"] for r in rows if "train/loss" in r])
  assert len(losses["bfloat16"]) == 20 and np.all(np.isfinite(losses["bfloat16"]))
  np.testing.assert_allclose(losses["bfloat16"], losses["float32"], rtol=0.01)
  assert losses["bfloat16"][-1] < losses["bfloat16"][0] - 0.5
  assert not np.array_equal(losses["bfloat16"], losses["float32"])  # it did run in bf16
