"""Runs away from the corpus: exported caches, and training, resuming,
evaluating and generating where TensorFlow and seqio cannot be imported."""

import json
import os
import subprocess
import sys

import numpy as np
import pytest

from conftest import ROOT, config_path, one_device_env
from hiertx import config as config_lib
from hiertx import data
from hiertx.errors import ConfigError, DataError

SPLITS = ("train", "validation", "test")


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
  """A text corpus, its tiny vanilla config and its exported cache."""
  root = tmp_path_factory.mktemp("portable")
  text = root / "corpus.txt"
  text.write_text("".join(f"def f{i}(x):\n    return x * {i}  # line {i}\n"
                          for i in range(1500)))
  config = config_lib.resolved(config_lib.load(config_path("vanilla") + ":size=tiny"))
  config.data.text_files = str(text)
  export_dir = str(root / "export")
  manifest = data.export(config.data, export_dir, SPLITS)
  return config, export_dir, manifest


def _with_cache(config, cache_dir):
  out = config_lib.resolved(config)
  out.data.cache_dir = cache_dir
  return out


def test_export_round_trips_batches_and_evaluation_rows(corpus):
  config, export_dir, manifest = corpus
  assert manifest["corpus"] == "text_files" and manifest["seq_len"] == 64
  assert np.load(os.path.join(export_dir, "train.tokens.npy")).dtype == np.uint8
  moved = _with_cache(config, export_dir)
  for align in (1, 4):
    local = data.train_batches(config.data, 8, 0, align=align)
    carried = data.train_batches(moved.data, 8, 0, align=align)
    for _ in range(3):
      a, b = next(local), next(carried)
      for key in a:
        np.testing.assert_array_equal(a[key], b[key])
  for split in ("validation", "test"):
    a = data.eval_batches(config.data, split, 8, 4, align=4)
    b = data.eval_batches(moved.data, split, 8, 4, align=4)
    assert len(a) == len(b)
    for x, y in zip(a, b):
      np.testing.assert_array_equal(x["targets"], y["targets"])
      np.testing.assert_array_equal(x["segment_ids"], y["segment_ids"])


def test_a_cache_that_does_not_match_is_refused_in_one_line(corpus, tmp_path):
  config, export_dir, _ = corpus
  other = _with_cache(config, export_dir)
  other.data.seq_len = 128
  with pytest.raises(ConfigError, match=r"^config.data.cache_dir: .* is an exported cache of "
                     r"text_files .*seq_len 64; this config reads .*seq_len 128: export"):
    data.check_data(other.data)
  with pytest.raises(DataError, match="exists and is not empty"):
    data.export(config.data, export_dir, ["train"])
  blocker = tmp_path / "a_file"
  blocker.write_text("")
  with pytest.raises(DataError, match="cannot write beside it"):
    data.export(config.data, str(blocker / "cache"), ["train"])
  # A damaged copy: a file that no longer matches the manifest's checksum.
  copy = tmp_path / "copy"
  os.makedirs(copy)
  for name in os.listdir(export_dir):
    with open(os.path.join(export_dir, name), "rb") as f:
      blob = f.read()
    if name == "validation.tokens.npy":
      blob = blob[:-10]
    (copy / name).write_bytes(blob)
  with pytest.raises(DataError, match="does not match its checksum"):
    data.eval_batches(_with_cache(config, str(copy)).data, "validation", 8, 2)


_NO_TF_SCRIPT = r"""
import json, sys
from hiertx import config as config_lib, evaluate, generate, train
config = config_lib.from_json(open(sys.argv[1]).read())
workdir = sys.argv[2]
config.train.steps = 10
first = train.train_and_evaluate(config, workdir)
config.train.steps = 15
resumed = train.train_and_evaluate(config, workdir)
scored = evaluate.evaluate_checkpoint(workdir)
text, step = generate.from_checkpoint(workdir, "def ", 8)
print("RESULT", json.dumps({
    "first": first["step"], "resumed": resumed["step"], "eval_step": scored["step"],
    "bits": scored["eval/bits_per_byte"], "text": text, "gen_step": step,
    "loaded": sorted(m for m in sys.modules
                     if m.split(".")[0] in ("tensorflow", "seqio", "tensorflow_datasets"))}))
"""


def test_training_runs_where_tensorflow_and_seqio_cannot_be_imported(corpus, tmp_path):
  config, export_dir, _ = corpus
  blocked = tmp_path / "blocked"
  for name in ("tensorflow", "seqio", "tensorflow_datasets"):
    os.makedirs(blocked / name)
    (blocked / name / "__init__.py").write_text(f"raise ImportError('{name} is not here')\n")
  moved = _with_cache(config, export_dir)
  moved.train.checkpoint_every = 5
  (tmp_path / "config.json").write_text(config_lib.to_json(moved))
  env = {**one_device_env(), "PYTHONPATH": str(blocked)}
  workdir = tmp_path / "run"
  proc = subprocess.run([sys.executable, "-c", _NO_TF_SCRIPT, str(tmp_path / "config.json"),
                         str(workdir)], cwd=ROOT, env=env, capture_output=True, text=True,
                        timeout=300)
  assert proc.returncode == 0, proc.stderr[-3000:]
  result = json.loads(proc.stdout.split("RESULT ", 1)[1])
  assert (result["first"], result["resumed"], result["eval_step"], result["gen_step"]) == (
      10, 15, 15, 15)
  assert "resumed at step 10" in proc.stdout
  assert 0 < result["bits"] < 9 and isinstance(result["text"], str)
  assert result["loaded"] == []
  assert any(n.startswith("events.out.tfevents") for n in os.listdir(workdir / "tensorboard"))
