"""Sweeps written in Python next to a config, expanded into named runs.

A config file defines `sweep_<name>()` returning a list of override dicts.
Keys are dotted `config.*` paths (`"model.num_layers"`), or `"arg.<key>"`
for the config file's own argument (`"arg.model"` -> `--config=x.py:model=...`):

  from hiertx import grid

  def sweep_depth():
    return grid.product({"model.num_layers": [2, 4, 8]},
                        grid.zipped({"train.learning_rate": [1e-3, 5e-4],
                                     "train.warmup_steps": [50, 100]}))

Every run gets a directory named from its overrides, so re-running a sweep
finds its earlier runs; a run's state lives in its own `status.json`, written
by the trainer (`hiertx.checkpoint.read_status`). A name, once given, is
kept: `sweep.json` records each run's name, and when the sweep grows (an arm
that varies a key the others held constant) the runs it already had keep
their names and directories; only new runs get names from what now varies.
"""

import dataclasses
import hashlib
import importlib.util
import itertools
import os
import re
from typing import Any, Iterable

from hiertx.errors import ConfigError, FlagError

Overrides = dict[str, Any]


def _as_runs(part) -> list[Overrides]:
  """A dict of axes (each a list of values) is their product; a list is runs."""
  if isinstance(part, dict):
    keys = list(part)
    for k in keys:
      if not isinstance(part[k], (list, tuple)) or not part[k]:
        raise ConfigError(f"sweep[{k!r}]", f"must be a non-empty list of values, got {part[k]!r}")
    return [dict(zip(keys, values)) for values in itertools.product(*part.values())]
  return [dict(r) for r in part]


def product(*parts) -> list[Overrides]:
  """Every combination: of the values of each axis dict, and across `parts`."""
  runs = [{}]
  for part in parts:
    runs = [{**a, **b} for a in runs for b in _as_runs(part)]
  return runs


def zipped(axes: dict[str, list]) -> list[Overrides]:
  """Axes that move together: the i-th run takes the i-th value of every axis."""
  lengths = {k: len(v) for k, v in axes.items()}
  if len(set(lengths.values())) > 1:
    raise ConfigError("sweep", f"zipped axes must have equal lengths, got {lengths}")
  return [dict(zip(axes, values)) for values in zip(*axes.values())]


def chain(*parts) -> list[Overrides]:
  """Runs of every part, one after another."""
  return [r for part in parts for r in _as_runs(part)]


def format_value(v) -> str:
  """A value as `--config.x=` and `:arg` parse it back."""
  if isinstance(v, (list, tuple)):
    return "(" + ",".join(format_value(x) for x in v) + ("," if len(v) == 1 else "") + ")"
  return str(v)


def run_name(overrides: Overrides) -> str:
  """`{"arg.model": "top_down", "train.seed": 1}` -> `model-top_down.seed-1`.

  Keys are shortened to their last component unless that is ambiguous; names
  longer than 120 characters keep a prefix and a hash.
  """
  if not overrides:
    return "base"
  last = [k.rsplit(".", 1)[-1] for k in overrides]
  parts = []
  for key, short in zip(overrides, last):
    label = short if last.count(short) == 1 else key.removeprefix("arg.")
    value = re.sub(r"[^A-Za-z0-9_.+-]+", "_", format_value(overrides[key])).strip("_")
    parts.append(f"{label}-{value}")
  name = ".".join(parts)
  if len(name) > 120:
    name = name[:100] + "." + hashlib.sha1(name.encode()).hexdigest()[:10]
  return name


@dataclasses.dataclass(frozen=True)
class PlannedRun:
  """One run of a sweep before it starts: its name, config and trainer flags."""

  name: str
  config: str  # config file with its argument, as --config= takes it
  overrides: dict  # the sweep's overrides (names and report columns)
  flags: tuple  # --config.x=v flags for the trainer

  def to_dict(self) -> dict:
    return {"name": self.name, "config": self.config, "overrides": self.overrides,
            "flags": list(self.flags)}


def load(config_file: str, name: str) -> list[Overrides]:
  """Calls `sweep_<name>()` of the config file."""
  path, _, _ = config_file.partition(":")
  spec = importlib.util.spec_from_file_location("hiertx_sweep_config", path)
  if spec is None or not os.path.exists(path):
    raise FlagError("--config", f"cannot load config file {path!r}")
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  fn = getattr(module, f"sweep_{name}", None)
  if fn is None:
    known = sorted(n[len("sweep_"):] for n in dir(module) if n.startswith("sweep_"))
    raise FlagError("--sweep", f"{path} has no sweep_{name}(); its sweeps: {known or 'none'}")
  runs = fn()
  if not runs:
    raise FlagError("--sweep", f"sweep_{name}() returned no runs")
  return [dict(r) for r in runs]


def _identity(config: str, flags) -> tuple:
  """What makes two runs the same run: the config argument and the flags."""
  return config, tuple(sorted(flags))


def expand(config_file: str, runs: Iterable[Overrides],
           known: Iterable[dict] = ()) -> list[PlannedRun]:
  """Named runs: `arg.*` keys join the config argument, the rest become flags.

  `known`: the runs of an earlier expansion (sweep.json's 'runs', each with
  name, config and flags): a run among them keeps its name; a new run is
  named by the keys that vary across the whole sweep, and by all of its
  overrides if that name is taken."""
  path, _, base_arg = config_file.partition(":")
  runs = list(runs)
  named = {_identity(k["config"], k["flags"]): k["name"] for k in known}
  # Names show what varies: a value every run shares says nothing about the run.
  keys = list(dict.fromkeys(k for r in runs for k in r))
  varying = [k for k in keys if len({repr(r.get(k)) for r in runs}) > 1]
  out, seen = [], {}
  taken = set(named.values())
  for overrides in runs:
    args = [a for a in base_arg.split(",") if a]
    flags = []
    for key, value in overrides.items():
      if key.startswith("arg."):
        args.append(f"{key[4:]}={format_value(value)}")
      elif "." in key:
        flags.append(f"--config.{key}={format_value(value)}")
      else:
        raise ConfigError(f"sweep[{key!r}]", "keys are dotted config paths (model.d_model) "
                          "or arg.<name> for the config file's argument")
    config = path + (":" + ",".join(args) if args else "")
    name = named.get(_identity(config, flags))
    if name is None:
      name = run_name({k: overrides[k] for k in varying if k in overrides})
      if name in taken:  # an earlier run's name: spell out every override
        name = run_name(overrides)
      if name in taken:
        name += "." + hashlib.sha1(repr(_identity(config, flags)).encode()).hexdigest()[:8]
    if name in seen:
      raise ConfigError("sweep", f"runs {seen[name]} and {overrides} get the same name {name!r}")
    seen[name] = overrides
    out.append(PlannedRun(name, config, overrides, tuple(flags)))
  return out
