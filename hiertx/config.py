"""Config helpers: the shared base config, `:arg` parsing, validation, comparison.

Config files under `configs/` build on `base_config()`; each exposes
`get_config(arg)` for `config_flags`, so every field is overridable on the
command line (`--config.model.d_model=256`) and variants are picked in the
path (`--config=configs/vanilla.py:size=tiny,runlocal`).
"""

import ast
import difflib
import importlib.util
import json
import os
from typing import Any

import ml_collections

from hiertx import models
from hiertx.models import content_groups
from hiertx.errors import ConfigError

# Sections a resumed run must share with the run that wrote the checkpoints.
RESUME_SECTIONS = ("model", "data")


def base_config() -> ml_collections.ConfigDict:
  c = ml_collections.ConfigDict()
  c.model = ml_collections.ConfigDict()  # filled in by each model's config file

  c.data = ml_collections.ConfigDict(dict(
      task="stdlib",  # stdlib | text_files | tiny_shakespeare | lm1b | pg19 | wiki40b | c4
      text_files="",  # a glob; when set, the text_files task reads it
      split_fractions=(0.9, 0.05, 0.05),  # train/validation/test shares of text files
      split_by="auto",  # file (whole files by path hash) | cut (each file) | auto (see tasks)
      vocab="byte",  # "byte" or a SentencePiece model path
      seq_len=256,  # tokens per row
      batch_size=16,  # global batch, in rows of seq_len tokens
      pack=True,  # pack documents into rows (false: one document per row, padded)
      align=-1,  # pieces start at multiples of this in a row; -1: the model's pooling factor
      # Documents in a packed row see each other (GPT-2/3 style): one causal
      # sequence per row, packed back to back; false: they never do.
      cross_document_attention=False,
      seed=-1,  # packing and epoch order; -1: train.seed's (resolved(): seeds vary both)
      process_sharding="rows",  # rows | source (see hiertx.data)
      cache_dir="",  # packed-data cache; "" = $HIERTX_DATA_CACHE or ~/.cache/hiertx/data
  ))
  c.train = ml_collections.ConfigDict(dict(
      steps=400,  # optimizer steps of the run
      learning_rate=2e-3,  # peak, after a linear warmup
      warmup_steps=40,  # steps of linear warmup, then a cosine decay
      end_learning_rate_fraction=0.1,  # cosine decays to this fraction of the peak
      weight_decay=0.01,  # AdamW's, on matrices only
      b1=0.9,  # AdamW's first-moment decay
      b2=0.98,  # AdamW's second-moment decay
      grad_clip=1.0,  # global gradient norm
      seed=0,  # parameters and dropout (and packing, unless data.seed)
      log_every=20,  # steps between training log lines and metrics
      checkpoint_every=100,  # steps between checkpoints (also at the end and on SIGTERM)
      keep_checkpoints=3,  # newest checkpoints kept
      max_nonfinite_skips=0,  # >0: skip up to this many steps with a NaN/Inf loss
      profile_steps="",  # "N,M": trace steps N..M into <workdir>/profile (hiertx.profiling)
      stop_check_every=10,  # multi-process: steps between agreeing on a stop (SIGTERM)
      # The workdir's lease (hiertx.lease): renewed every quarter of this; a
      # holder silent for this long is taken to be dead and is taken over.
      lease_timeout_s=300.0,
  ))
  c.eval = ml_collections.ConfigDict(dict(
      every=200,  # also evaluated at the last step
      split="validation",  # validation | test
      batch_size=16,
      batches=16,  # blocks of rows spread evenly over the split (all of it if it is smaller)
  ))
  # Devices per mesh axis (-1: the rest); docs/clusters.md, "Choosing a mesh".
  c.mesh = ml_collections.ConfigDict(dict(
      data=-1,  # batch rows (data parallel)
      fsdp=1,  # batch rows and parameters' embed axis (fully sharded)
      tensor=1,  # heads, MLP and vocabulary (tensor parallel)
  ))
  c.sharding = ml_collections.ConfigDict(dict(
      # Logical axis -> mesh axes. Modules name logical axes only.
      rules=(
          ("batch", ("data", "fsdp")),
          ("embed", "fsdp"),
          ("mlp", "tensor"),
          ("heads", "tensor"),
          ("vocab", "tensor"),
          ("kv", None),
          ("length", None),
          ("layers", None),  # the stacking axis of scanned blocks
      ),
  ))
  return c


# Widths shared by every model's config, so sizes compare at equal width.
WIDTHS = {
    # size: (d_model, num_heads, mlp_dim)
    "tiny": (32, 2, 64),
    "small": (128, 4, 512),
    "base": (256, 4, 1024),
}


def model_config(name: str, size: str, **fields) -> ml_collections.ConfigDict:
  """A `config.model` section: every field of the model's class at its default
  (the class is where defaults are defined), the common widths at `size`,
  then `fields`."""
  width = "base" if size.startswith("paper") else size
  if width not in WIDTHS:
    raise ConfigError("<arg>.size", f"unknown size {size!r}")
  d, h, f = WIDTHS[width]
  _, defaults = models.resolve({"name": name})
  return ml_collections.ConfigDict(dict(name=name, **{**defaults, "d_model": d, "num_heads": h,
                                                      "mlp_dim": f, **fields}))


def closest_first(word: str, choices) -> str:
  """`choices` as text, the ones most like `word` first."""
  choices = [str(c) for c in choices]
  ranked = difflib.get_close_matches(str(word), choices, n=len(choices), cutoff=0.0)
  return ", ".join(ranked + sorted(set(choices) - set(ranked)))


def choose(options: dict, value, name: str):
  """`options[value]` for a config file's argument `name` (e.g. size), or a
  ConfigError listing the valid values, closest first."""
  if value in options:
    return options[value]
  raise ConfigError(f"<arg>.{name}", f"{value!r} is not one of: "
                    f"{closest_first(value, options)}")


def check_path(config: ml_collections.ConfigDict, dotted: str) -> None:
  """Raises a ConfigError when `section.field...` is not a field of `config`,
  naming the valid ones, closest first."""
  node, walked = config, []
  for key in dotted.split("."):
    if not isinstance(node, ml_collections.ConfigDict):
      raise ConfigError(".".join(walked), f"is a value, not a section; {dotted!r} cannot be set")
    if key not in node:
      if walked == ["model"] and key in content_groups.FIELDS and "name" in node:
        raise models.not_content_grouped(node.name, key)
      where = ".".join(walked) or "the config"
      raise ConfigError(".".join([*walked, key]), f"is not a field of {where}; its fields "
                        f"are: {closest_first(key, node.keys())}")
    node = node[key]
    walked.append(key)


def load(path_and_arg: str) -> ml_collections.ConfigDict:
  """Loads `configs/x.py[:arg]` the way `--config=` does (for tests, sweeps, scripts)."""
  path, _, arg = path_and_arg.partition(":")
  if not os.path.isfile(path):
    raise ConfigError("<config>", f"no config file {path!r}")
  spec = importlib.util.spec_from_file_location("hiertx_config_file", path)
  if spec is None:
    raise ConfigError("<config>", f"cannot load config file {path!r}")
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  return module.get_config(arg or None)


def parse_arg(arg: str | None, **defaults) -> ml_collections.ConfigDict:
  """'size=tiny,runlocal' -> {size: 'tiny', runlocal: True}, over `defaults`."""
  out = dict(defaults)
  for item in filter(None, (arg or "").split(",")):
    key, eq, value = item.partition("=")
    if key not in defaults:
      raise ConfigError(f"<arg>.{key}", f"unknown config argument; known: {sorted(defaults)}")
    if not eq:
      out[key] = True
    else:
      out[key] = type(defaults[key])(value) if not isinstance(defaults[key], bool) else (
          value.lower() in ("1", "true", "yes"))
  return ml_collections.ConfigDict(out)


def resolved(config: ml_collections.ConfigDict) -> ml_collections.ConfigDict:
  """A copy of `config` with the fields that follow others filled in:
  `data.seed` -1 becomes `train.seed`, so a sweep over `train.seed` varies the
  data order as well as the initialisation. The trainer saves the resolved
  config, so a resumed run keeps its data order."""
  out = ml_collections.ConfigDict(config.to_dict())
  if out.data.seed == -1:
    out.data.seed = out.train.seed
  return out


def _positive_int(section, name, value):
  if not isinstance(value, int) or isinstance(value, bool) or value < 1:
    raise ConfigError(f"{section}.{name}", f"must be a positive integer, got {value!r}")


def validate(config: ml_collections.ConfigDict) -> None:
  """Checks every field that can be checked without data or devices."""
  for name in ("seq_len", "batch_size"):
    _positive_int("data", name, config.data[name])
  for name in ("steps", "log_every", "checkpoint_every", "keep_checkpoints", "stop_check_every"):
    _positive_int("train", name, config.train[name])
  for name in ("every", "batch_size", "batches"):
    _positive_int("eval", name, config.eval[name])
  for section, name, low in (("train", "seed", 0), ("data", "seed", -1)):
    v = config[section][name]
    if not isinstance(v, int) or isinstance(v, bool) or v < low:
      raise ConfigError(f"{section}.{name}", f"must be an integer >= {low}, got {v!r}"
                        + (" (-1: train.seed)" if section == "data" else ""))
  for name in ("warmup_steps", "max_nonfinite_skips"):
    v = config.train[name]
    if not isinstance(v, int) or isinstance(v, bool) or v < 0:
      raise ConfigError(f"train.{name}", f"must be a non-negative integer, got {v!r}")
  for name in ("learning_rate", "grad_clip", "lease_timeout_s"):
    if not config.train[name] > 0:
      raise ConfigError(f"train.{name}", f"must be positive, got {config.train[name]!r}")
  if not 0 <= config.train.end_learning_rate_fraction <= 1:
    raise ConfigError("train.end_learning_rate_fraction", "must be in [0, 1]")
  if config.train.weight_decay < 0:
    raise ConfigError("train.weight_decay", "must be >= 0")
  for name in ("b1", "b2"):  # Adam's moment decays; 1 or more never forgets, and diverges
    v = config.train[name]
    if not 0 <= v < 1:
      raise ConfigError(f"train.{name}", f"must be in [0, 1), got {v}")
  profile_steps(config.train.profile_steps)
  if config.eval.split not in ("train", "validation", "test"):
    raise ConfigError("eval.split", f"{config.eval.split!r} is not train/validation/test")
  models.check(config.model, config.data.seq_len)
  if not isinstance(config.data.cross_document_attention, bool):
    raise ConfigError("data.cross_document_attention", "must be True or False, got "
                      f"{config.data.cross_document_attention!r}")
  if config.data.cross_document_attention and config.data.align not in (-1, 1):
    raise ConfigError("data.align", f"{config.data.align}: with "
                      "data.cross_document_attention=True documents are packed back to back "
                      "(a row is one sequence); leave data.align at -1")
  if config.model.get("boundaries") == "whitespace" and config.data.vocab != "byte":
    raise ConfigError("model.boundaries", "whitespace finds space-like bytes and needs "
                      f"data.vocab='byte', got {config.data.vocab!r}")


def profile_steps(spec) -> tuple[int, int] | None:
  """'N,M' (or a pair) -> (N, M); '' or None -> None."""
  if spec in ("", None):
    return None
  parts = spec.split(",") if isinstance(spec, str) else list(spec)
  try:
    first, last = (int(p) for p in parts)
  except (TypeError, ValueError):
    raise ConfigError("train.profile_steps", f"{spec!r} is not 'N,M' (first and last "
                      "step to trace, e.g. '10,12')") from None
  if not 1 <= first <= last:
    raise ConfigError("train.profile_steps", f"needs 1 <= N <= M, got {spec!r}")
  return first, last


def to_json(config: ml_collections.ConfigDict) -> str:
  return config.to_json(indent=2, sort_keys=True)


# A field added after runs were saved: the value those runs ran with, and
# which saved models it changes (the rest load it at its default, so a run
# it does not concern resumes without a config change).
_learned = lambda m: m.get("boundaries") == "learned"
_ADDED_SINCE = {
    "boundary_null_group": (False, _learned),
    "boundary_eval": ("threshold", lambda m: _learned(m) and m.get("boundary_temperature", 1) > 0),
}


def from_json(text: str) -> ml_collections.ConfigDict:
  """A saved config, with fields added since it was saved at their defaults
  (the model's from its class)."""
  saved = json.loads(text)
  config = base_config().to_dict()
  for section, values in saved.items():
    if isinstance(values, dict) and isinstance(config.get(section), dict):
      config[section] = {**config[section], **values}
    else:
      config[section] = values
  if config.get("model", {}).get("name") in models.MODELS:
    _, defaults = models.resolve({"name": config["model"]["name"]})
    # Configs saved when every model carried the content-group fields: a model
    # without them had them at `fixed`, which is what it does.
    saved_model = {k: v for k, v in config["model"].items()
                   if k in defaults or k == "name" or k not in content_groups.FIELDS}
    # Fields added later whose default changes what the model computes: a
    # config saved before one ran without it, so it loads as it ran.
    ran_without = {k: v for k, (v, concerns) in _ADDED_SINCE.items()
                   if k in defaults and k not in saved.get("model", {})
                   and concerns(config["model"])}
    config["model"] = {**defaults, **ran_without, **saved_model}
  return ml_collections.ConfigDict(config)


def differences(old: dict[str, Any], new: dict[str, Any], prefix: str = "") -> list[str]:
  """Dotted paths whose values differ (lists and tuples compare equal)."""
  out = []
  for key in sorted(set(old) | set(new)):
    a, b = old.get(key, "<missing>"), new.get(key, "<missing>")
    path = f"{prefix}{key}"
    if isinstance(a, dict) and isinstance(b, dict):
      out += differences(a, b, path + ".")
    elif _plain(a) != _plain(b):
      out.append(f"{path}: {_plain(a)!r} -> {_plain(b)!r}")
  return out


def _plain(v):
  return [_plain(x) for x in v] if isinstance(v, (list, tuple)) else v


def apply_size_defaults(c: ml_collections.ConfigDict, arg) -> None:
  """Shrinks data and schedule for `size=tiny` and `runlocal` (tests, laptops)."""
  if arg.size == "tiny" or arg.get("runlocal"):
    c.data.seq_len = 64
    c.data.batch_size = 8
    c.train.steps = 20
    c.train.warmup_steps = 2
    c.train.log_every = 5
    c.train.checkpoint_every = 10
    c.eval.every = 10
    c.eval.batch_size = 8
    c.eval.batches = 2


def apply_override(config, assignment: str) -> None:
  """Sets `section.field=value`, parsing value like the command line would."""
  dotted, eq, value = assignment.partition("=")
  if not eq:
    raise ConfigError(dotted, f"{assignment!r} is not field=value")
  check_path(config, dotted)
  try:
    parsed = ast.literal_eval(value)
  except (ValueError, SyntaxError):
    parsed = value
  *parents, field = dotted.split(".")
  node = config
  for key in parents:
    node = node[key]
  try:
    node[field] = parsed
  except (TypeError, ValueError) as e:  # ConfigDict's type check
    raise ConfigError(dotted, f"cannot be {parsed!r}: {e}") from None
