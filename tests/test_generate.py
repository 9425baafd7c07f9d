"""Generation from a trained tiny checkpoint: deterministic, reproducible, exact."""

import subprocess
import sys

import jax
import numpy as np
import pytest

from conftest import ROOT, config_path
from hiertx import config as config_lib
from hiertx import decode, generate, steps, train
from hiertx.errors import ConfigError, FlagError


@pytest.fixture(scope="module")
def workdir(tmp_path_factory):
  config = config_lib.load(config_path("top_down") + ":size=tiny")
  config.train.steps = 10
  path = str(tmp_path_factory.mktemp("gen"))
  train.train_and_evaluate(config, path)
  return path


def test_greedy_is_deterministic_and_equals_recomputing(workdir):
  a, step = generate.from_checkpoint(workdir, "import os\n", 24, temperature=0.0)
  b, _ = generate.from_checkpoint(workdir, "import os\n", 24, temperature=0.0)
  assert step == 10 and a == b
  config, run, _, params = steps.load_params(workdir, None, "data=1",
                                                jax.local_devices()[:1])
  ids = np.asarray(run.vocab.encode("import os\n"), np.int32)[None]
  dec = decode.decoder(run.model, ids.shape[1] + 24)
  params = jax.device_get(params)
  cached = decode.generate_cached(params, ids, 0, dec=dec, new_tokens=24)
  full = decode.generate_recompute(params, ids, 0, model=run.model, new_tokens=24)
  np.testing.assert_array_equal(cached, full)
  top1 = decode.generate_cached(params, ids, 7, dec=dec, new_tokens=24, temperature=1.0,
                                  top_k=1)
  np.testing.assert_array_equal(top1, cached)


def test_sampling_with_a_seed_is_reproducible(workdir):
  runs = [generate.from_checkpoint(workdir, "def f(", 40, temperature=1.0, top_p=0.95, seed=s)[0]
          for s in (3, 3, 4)]
  assert runs[0] == runs[1] and runs[0] != runs[2]


def test_bad_requests_are_refused_clearly(workdir):
  with pytest.raises(FlagError, match="--top_p"):
    generate.from_checkpoint(workdir, "x", 4, temperature=1.0, top_p=0.0)
  with pytest.raises(FlagError, match="--prompt"):
    generate.from_checkpoint(workdir, "", 4)
  with pytest.raises(ConfigError, match="model.max_len"):  # learned positions end at 2048
    generate.from_checkpoint(workdir, "x", 5000)


def test_command_line_prints_the_continuation(workdir):
  r = subprocess.run([sys.executable, "-m", "hiertx.generate", f"--workdir={workdir}",
                      "--prompt=for i in ", "--max_new_tokens=16", "--temperature=0"],
                     cwd=ROOT, capture_output=True, text=True, timeout=300)
  assert r.returncode == 0, r.stderr[-2000:]
  expected, _ = generate.from_checkpoint(workdir, "for i in ", 16, temperature=0.0)
  assert r.stdout == "for i in " + expected + "\n"
  assert "checkpoint step 10" in r.stderr
