"""The commonest user mistakes, through every entry point: one line naming
what was given and the valid choices (closest first), never a traceback."""

import os
import random
import subprocess
import sys

import pytest

from conftest import ROOT, config_path, one_device_env
from hiertx import config as config_lib
from hiertx.errors import ConfigError, HiertxError

TYPO = "--config.model.d_modle=64"
BAD_SIZE = "configs/bottom_up.py:size=paper14"

# (command line, what the one-line error must contain)
CASES = {
    "train misspelt field": (["-m", "hiertx.train", "--config=configs/vanilla.py:size=tiny",
                              "--workdir={tmp}", TYPO],
                             "config.model.d_modle: is not a field of model; its fields are: "
                             "d_model"),
    "train config argument": (["-m", "hiertx.train", f"--config={BAD_SIZE}", "--workdir={tmp}"],
                              "'paper14' is not one of: paper30"),
    "train bad value": (["-m", "hiertx.train", "--config=configs/vanilla.py:size=tiny",
                         "--workdir={tmp}", "--config.model.d_model=wide"],
                        "--config.model.d_model=wide"),
    "train invalid value": (["-m", "hiertx.train", "--config=configs/vanilla.py:size=tiny",
                             "--workdir={tmp}", "--config.model.num_layers=0"],
                            "config.model.num_layers: must be a positive integer"),
    "train missing data": (["-m", "hiertx.train", "--config=configs/vanilla.py:size=tiny",
                            "--workdir={tmp}", "--config.data.text_files=/nonexistent/*.txt"],
                           "matches no files"),
    "train missing file": (["-m", "hiertx.train", "--config=configs/vanila.py",
                            "--workdir={tmp}"], "no config file 'configs/vanila.py'"),
    "evaluate no workdir": (["-m", "hiertx.evaluate", "--workdir={tmp}/none"], "no config.json"),
    "evaluate bad split": (["-m", "hiertx.evaluate", "--workdir={tmp}", "--split=tset"],
                           "--split=tset: value should be one of"),
    "evaluate no batches": (["-m", "hiertx.evaluate", "--workdir={tmp}", "--batches=0"],
                            "flag --batches=0: 0 is not a positive integer"),
    "generate no workdir": (["-m", "hiertx.generate", "--workdir={tmp}/none", "--prompt=x"],
                            "no config.json"),
    "sweep misspelt field": (["launch/sweep.py", "--config=configs/compare.py:size=tiny",
                              "--sweep=paper_claim", "--sweep_dir={tmp}", "--dry_run", "--", TYPO],
                             "config.model.d_modle: is not a field of model"),
    "sweep config argument": (["launch/sweep.py", "--config=configs/compare.py:model=top_dwn",
                               "--sweep=depth", "--sweep_dir={tmp}", "--dry_run"],
                              "'top_dwn' is not one of: top_down"),
    "slurm misspelt field": (["launch/slurm.py", "--config=configs/vanilla.py", "--workdir={tmp}",
                              "--dry_run", "--", TYPO], "config.model.d_modle"),
    "bench misspelt field": (["experiments/bench.py", "--runs=vanilla.py:size=tiny",
                              "--set=model.d_modle=64"], "config.model.d_modle"),
    "bench no steps": (["experiments/bench.py", "--steps=0"],
                       "flag --steps=0: 0 is not a positive integer"),
    "claim_device without a cache": (["experiments/claim_device.py", "--workdir={tmp}"],
                                     "--cache_dir: needs an exported data cache"),
    "claim_device misspelt field": (["experiments/claim_device.py", "--workdir={tmp}",
                                     "--runlocal", "--set=model.d_modle=64"],
                                    "config.model.d_modle"),
    "memory_depth config argument": (["experiments/memory_depth.py",
                                      "--runs=vanilla.py:size=paper15"],
                                     "'paper15' is not one of: paper14"),
    "seq_scaling bad list": (["experiments/seq_scaling.py", "--seq_lens=1k"],
                             "--seq_lens: '1k' is not a list of integers"),
    "decode_bench misspelt field": (["experiments/decode_bench.py", "--runs=vanilla.py:size=tiny",
                                     "--set=modle.d_model=3"],
                                    "config.modle: is not a field of the config"),
    "data config argument": (["-m", "hiertx.prepare_data", "--config=configs/retina.py:size=huge"],
                             "'huge' is not one of:"),
}


@pytest.mark.parametrize("name", sorted(CASES))
def test_every_entry_point_reports_mistakes_in_one_line(name, tmp_path):
  args, expected = CASES[name]
  env = one_device_env()
  r = subprocess.run([sys.executable, *[a.replace("{tmp}", str(tmp_path)) for a in args]],
                     cwd=ROOT, env=env, capture_output=True, text=True, timeout=120)
  out = r.stdout + r.stderr
  assert r.returncode != 0 and "Traceback" not in out, out[-3000:]
  last = r.stderr.strip().splitlines()[-1]
  assert last.startswith("error: ") and expected in last, last


def test_closest_choices_come_first():
  with pytest.raises(ConfigError, match=r"'paper14' is not one of: paper30, "):
    config_lib.load(config_path("bottom_up") + ":size=paper14")
  config = config_lib.load(config_path("hourglass") + ":size=tiny")
  with pytest.raises(ConfigError, match=r"model.hierarchi: is not a field of model; its fields "
                     r"are: hierarchy,"):
    config_lib.apply_override(config, "model.hierarchi=1@1")
  with pytest.raises(ConfigError, match="data.seq_len: is a value, not a section"):
    config_lib.apply_override(config, "data.seq_len.x=3")


def test_fuzzed_misspellings_and_arguments_are_refused_by_name():
  """Random one-letter misspellings of real fields, and unknown config-file
  arguments: each is a ConfigError naming what was given."""
  rng = random.Random(1)
  config = config_lib.load(config_path("top_down") + ":size=tiny")
  fields = [f"{section}.{k}" for section in ("model", "data", "train", "eval")
            for k in config[section].keys()]
  for _ in range(40):
    dotted = rng.choice(fields)
    section, key = dotted.split(".")
    i = rng.randrange(len(key))
    typo = key[:i] + rng.choice("xqz") + key[i + 1:]
    if typo in config[section]:
      continue
    with pytest.raises(ConfigError) as e:
      config_lib.apply_override(config, f"{section}.{typo}=1")
    assert str(e.value).startswith(f"config.{section}.{typo}: is not a field of {section}")
  for arg in ("size=huge", "sise=tiny", "model=vanila"):
    with pytest.raises(HiertxError, match="size|sise|model"):
      config_lib.load(os.path.join(ROOT, "configs", "compare.py") + ":" + arg)


def test_every_command_is_a_console_script():
  """`pip install` puts each command on PATH as hiertx-<name>, running the
  same function as `python -m hiertx.<name>`."""
  from importlib import metadata
  scripts = {ep.name: ep for ep in metadata.entry_points(group="console_scripts")
             if ep.name.startswith("hiertx-")}
  names = ("train", "evaluate", "generate", "prepare_data", "profiling")
  assert set(scripts) == {f"hiertx-{n.replace('_', '-')}" for n in names}
  for n in names:
    module = __import__(f"hiertx.{n}", fromlist=["run"])
    assert scripts[f"hiertx-{n.replace('_', '-')}"].load() is module.run


def test_adam_decays_outside_0_1_are_refused():
  config = config_lib.load(config_path("vanilla") + ":size=tiny")
  config_lib.validate(config)
  for name, value in (("b1", 2.0), ("b2", 1.0), ("b1", -0.1)):
    bad = config_lib.load(config_path("vanilla") + ":size=tiny")
    bad.train[name] = value
    with pytest.raises(ConfigError,
                       match=rf"config.train.{name}: must be in \[0, 1\), got {value}"):
      config_lib.validate(bad)
