"""Config files, `:arg` variants, command-line overrides and clear config errors."""

import ml_collections
import pytest

from conftest import config_path
from hiertx import config as config_lib
from hiertx import models
from hiertx.errors import ConfigError
from hiertx.models import content_groups

MODEL_NAMES = tuple(models.MODELS)


@pytest.mark.parametrize("name", MODEL_NAMES)
@pytest.mark.parametrize("size", ["tiny", "small", "base", None])
def test_every_config_file_validates(name, size):
  c = config_lib.load(config_path(name) + (f":size={size}" if size else ""))
  config_lib.validate(c)
  assert c.model.name == name


def test_paper_pair_has_30_and_14_layers_at_the_same_width():
  v = config_lib.load(config_path("vanilla") + ":size=paper14")
  h = config_lib.load(config_path("bottom_up") + ":size=paper30")
  assert v.model.num_layers == 14
  m = h.model
  assert sum(m.layers_per_scale) + 1 + m.post_layers == 30  # + the aggregation layer
  assert v.model.d_model == h.model.d_model
  for name in ("top_down", "hourglass", "retina"):
    config_lib.validate(config_lib.load(config_path(name) + ":size=paper30"))


def _bad(config_name, **fields):
  c = config_lib.load(config_path(config_name) + ":size=tiny")
  for k, v in fields.items():
    c.model[k] = v
  return c


@pytest.mark.parametrize("config_name,fields,field", [
    ("bottom_up", dict(pool_factors=(1, 2)), "model.pool_factors"),
    ("top_down", dict(pool_factors=(2, 1)), "model.pool_factors"),
    ("retina", dict(pool_factor=1), "model.pool_factor"),
    ("bottom_up", dict(post_layers=0), "model.post_layers"),
    ("top_down", dict(layers_per_scale=(0, 1, 1)), "model.layers_per_scale"),
    ("hourglass", dict(hierarchy="1@1 2@2 0@1"), "model.hierarchy"),
    ("hourglass", dict(hierarchy="1@1 2@3 1@2"), "model.hierarchy"),
    ("hourglass", dict(hierarchy="2@1 4@3 4@9 4@3 2@1x"), "model.hierarchy"),
    ("retina", dict(windows=(4, 0)), "model.windows"),
    ("hourglass", dict(boundaries="spaces"), "model.boundaries"),
    ("hourglass", dict(boundaries="entropy"), "model.hierarchy"),  # two shortenings
    ("hourglass", dict(boundaries="whitespace", hierarchy="1@1 1@4 1@1", pooling="linear"),
     "model.pooling"),
    ("hourglass", dict(boundaries="learned", hierarchy="1@1 1@4 1@1", max_group=3),
     "model.max_group"),
    ("hourglass", dict(boundaries="learned", hierarchy="1@1 1@4 1@1", group_capacity=0.5),
     "model.group_capacity"),
    ("hourglass", dict(boundaries="learned", hierarchy="1@1 1@4 1@1", boundary_predictor="mlp"),
     "model.boundary_predictor"),
    ("hourglass", dict(boundaries="learned", hierarchy="1@1 1@4 1@1", boundary_eval="argmax"),
     "model.boundary_eval"),
    ("hourglass", dict(boundaries="dynamic", hierarchy="1@1 1@4 1@1", dynamic_chunk="pool"),
     "model.dynamic_chunk"),  # a pooling window needs the close rules
    ("hourglass", dict(boundaries="dynamic", hierarchy="1@1 1@4 1@1", pooling="attention"),
     "model.pooling"),  # the boundary state is kept, nothing pools
    ("hourglass", dict(boundaries="dynamic", hierarchy="1@1 1@2 1@4 1@8 1@4 1@2 1@1"),
     "model.hierarchy"),  # H-Net's stages: at most two
    ("hourglass", dict(boundaries="dynamic", hierarchy="1@1 1@2 1@4 1@2 1@1",
                       dynamic_rules=True), "model.dynamic_rules"),
    ("retina", dict(windows=()), "model.windows"),
    ("bottom_up", dict(layers_per_scale=(1, 1)), "model.layers_per_scale"),
    ("top_down", dict(layers_per_scale=(1, 1, 1, 1)), "model.layers_per_scale"),
    ("vanilla", dict(num_heads=3), "model.num_heads"),
    ("vanilla", dict(attention_fallback="flash"), "model.attention_fallback"),
    ("vanilla", dict(d_model=0), "model.d_model"),
    ("vanilla", dict(name="transformer"), "model.name"),
    ("hourglass", dict(pooling="max"), "model.pooling"),
    ("top_down", dict(upsampling="nearest"), "model.upsampling"),
    ("retina", dict(remat="everything"), "model.remat"),
    ("vanilla", dict(max_len=16), "model.max_len"),
    ("bottom_up", dict(pool_factors=(16, 8)), "model.pool_factors"),
    ("hourglass", dict(hierarchy="1@1 1@128 1@1"), "model.hierarchy"),
    ("retina", dict(windows=(2, 2, 2, 2, 2, 2, 2)), "model.windows"),
])
def test_bad_model_configs_name_the_field(config_name, fields, field):
  with pytest.raises(ConfigError) as e:
    config_lib.validate(_bad(config_name, **fields))
  assert str(e.value).startswith(f"config.{field}:"), str(e.value)


def test_whitespace_boundaries_need_the_byte_vocabulary(tmp_path):
  c = _bad("hourglass", boundaries="whitespace", hierarchy="1@1 1@4 1@1")
  c.data.vocab = str(tmp_path / "spm.model")
  with pytest.raises(ConfigError, match="config.model.boundaries: whitespace .* needs "
                     "data.vocab='byte'"):
    config_lib.validate(c)


def test_content_group_fields_are_only_on_the_models_that_group_by_content():
  grouped = {n for n, cls in models.MODELS.items() if content_groups.has_content_groups(cls)}
  assert grouped == {"hourglass", "top_down"}
  for name in MODEL_NAMES:
    c = config_lib.load(config_path(name) + ":size=tiny")
    assert ("boundaries" in c.model) == (name in grouped), name
    if name in grouped:
      continue
    # Set on the command line, or in a config passed to validate: one line each.
    with pytest.raises(ConfigError, match=f"^config.model.max_group: the {name} model has no "
                       "shortening to group by content; the models with content groups are"):
      config_lib.apply_override(c, "model.max_group=4")
    c.model.boundaries = "whitespace"
    with pytest.raises(ConfigError, match=f"^config.model.boundaries: the {name} model has no"):
      config_lib.validate(c)
  # A config saved when every model carried the fields (at `fixed`) still loads.
  saved = config_lib.load(config_path("vanilla") + ":size=tiny").to_dict()
  saved["model"].update(boundaries="fixed", max_group=16, dynamic_rules=False)
  old = config_lib.from_json(ml_collections.ConfigDict(saved).to_json())
  assert "boundaries" not in old.model
  config_lib.validate(old)
  # A learned-boundaries run saved before DTP's null group and evaluation by
  # sampling loads without them.
  saved = config_lib.load(config_path("hourglass") + ":size=tiny").to_dict()
  saved["model"].update(boundaries="learned")
  del saved["model"]["boundary_null_group"], saved["model"]["boundary_eval"]
  old = config_lib.from_json(ml_collections.ConfigDict(saved).to_json())
  assert old.model.boundary_null_group is False and old.model.boundary_eval == "threshold"
  assert config_lib.load(config_path("hourglass")).model.boundary_eval == "sample"
  # Where a field changes nothing, an older run loads as a new one would run
  # (and so resumes without a config change).
  for boundaries, extra in (("dynamic", {}), ("learned", {"boundary_temperature": 0.0})):
    saved["model"].update(boundaries=boundaries, **extra)
    old = config_lib.from_json(ml_collections.ConfigDict(saved).to_json())
    assert old.model.boundary_eval == "sample"
    assert old.model.boundary_null_group is (boundaries == "dynamic")
  saved["model"]["boundary_null_group"] = True
  assert config_lib.from_json(ml_collections.ConfigDict(saved).to_json()).model.boundary_null_group


@pytest.mark.parametrize("dotted,value", [("data.seed", -2), ("train.seed", -1),
                                          ("data.seed", 1.5)])
def test_bad_seeds_name_the_field(dotted, value):
  c = config_lib.load(config_path("vanilla") + ":size=tiny")
  section, field = dotted.split(".")
  c[section][field] = value if isinstance(value, int) else 1
  if not isinstance(value, int):  # ConfigDict keeps the int type; bypass it as JSON could
    c = ml_collections.ConfigDict({**c.to_dict(), section: {**c[section].to_dict(), field: value}})
  with pytest.raises(ConfigError, match=f"^config.{dotted}: must be an integer"):
    config_lib.validate(c)


def test_unknown_model_field_is_refused():
  with pytest.raises(ConfigError, match="model.num_layer.*not a field of the vanilla"):
    models.check({"name": "vanilla", "num_layer": 3}, 64)


def test_arg_parsing():
  assert config_lib.parse_arg("size=tiny,runlocal", size="small", runlocal=False).to_dict() == {
      "size": "tiny", "runlocal": True}
  with pytest.raises(ConfigError, match="unknown config argument"):
    config_lib.parse_arg("sise=tiny", size="small")


@pytest.mark.parametrize("field,kind,needs", [("attention", "cudnn", "GPUs"),
                                               ("attention", "splash", "TPUs"),
                                               ("attention_fallback", "pallas", "GPUs")])
def test_accelerator_kernels_are_refused_on_other_devices(field, kind, needs, tiny_config):
  """Never a silent fallback: a kernel the devices cannot run, as the kind or
  as the fallback, stops the run before anything is built."""
  from hiertx import steps
  config = tiny_config("vanilla", **{f"model__{field}": kind})
  with pytest.raises(ConfigError, match=f"config.model.{field}: {kind} runs on {needs}; "
                     "these devices are cpu: use blockwise"):
    steps.build_run(config)
