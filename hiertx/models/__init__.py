"""The explicit registry of model architectures, and building one from a config."""

from typing import Any, Mapping

from hiertx.errors import ConfigError
from hiertx.models import base
from hiertx.models import content_groups
from hiertx.models.bottom_up import BottomUpLM
from hiertx.models.hourglass import HourglassLM
from hiertx.models.retina import RetinaLM
from hiertx.models.top_down import TopDownLM
from hiertx.models.vanilla import VanillaLM

MODELS = {
    "vanilla": VanillaLM,
    "bottom_up": BottomUpLM,
    "top_down": TopDownLM,
    "retina": RetinaLM,
    "hourglass": HourglassLM,
}


def resolve(model_cfg: Mapping[str, Any]) -> tuple[type, dict]:
  cfg = dict(model_cfg)
  name = cfg.pop("name", None)
  if name not in MODELS:
    raise ConfigError("model.name", f"unknown model {name!r}; choose one of {sorted(MODELS)}")
  cls = MODELS[name]
  fields = base.field_names(cls) - {"vocab_size", "documents"}
  unknown = sorted(set(cfg) - fields)
  grouping = sorted(content_groups.FIELDS.intersection(unknown))
  if grouping:
    raise not_content_grouped(name, grouping[0])
  if unknown:
    raise ConfigError(f"model.{unknown[0]}", f"is not a field of the {name} model; "
                      f"its fields are {sorted(fields)}")
  defaults = {f: getattr(cls, f) for f in fields}
  return cls, {**defaults, **cfg}


def not_content_grouped(name: str, field: str) -> ConfigError:
  """The error for a content-group field set on a model without them."""
  return ConfigError(f"model.{field}", f"the {name} model has no shortening to group by "
                     "content; the models with content groups are "
                     f"{[n for n, c in MODELS.items() if content_groups.has_content_groups(c)]}")


def check(model_cfg: Mapping[str, Any], seq_len: int) -> None:
  """Validates a `config.model` section before anything is compiled."""
  cls, cfg = resolve(model_cfg)
  cls.check_config(cfg, seq_len)


def build(model_cfg: Mapping[str, Any], vocab_size: int, seq_len: int,
          cross_document: bool = False) -> base.LanguageModel:
  """The model a `config.model` section describes, validated for `seq_len`;
  `cross_document` (data.cross_document_attention): documents of a packed
  row see each other."""
  cls, cfg = resolve(model_cfg)
  cls.check_config(cfg, seq_len)
  cfg = {k: tuple(v) if isinstance(v, list) else v for k, v in cfg.items()}
  return cls(vocab_size=vocab_size, documents="visible" if cross_document else "masked", **cfg)
