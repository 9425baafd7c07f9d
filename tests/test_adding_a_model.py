"""docs/adding-a-model.md, followed from an empty file: a toy model written
here, registered, given a config file and a tiny variant, then put through the
generic suite's own test functions unchanged (causality, packed documents,
cached decoding, the analytic cost, sharded training, config validation)."""

import flax.linen as nn
import jax.numpy as jnp
import pytest

import conftest
import test_config
import test_cost
import test_decode
import test_models
import test_sharding
import tiny_models
from hiertx import layers
from hiertx import models
from hiertx.errors import ConfigError
from hiertx.models import base


class TokenShiftLM(base.LanguageModel):
  """Step 1, the module: a vanilla stack whose input at t also carries a
  learned per-channel share of the embedding at t - 1 (a token shift), so it
  has a parameter outside its blocks and decoding state of its own."""

  num_layers: int = 2  # decoder blocks after the shift

  def setup(self):
    super().setup()
    self.blocks = layers.Stack(self.block_cfg, self.num_layers)
    self.shift = self.param("shift", nn.with_logical_partitioning(
        nn.initializers.constant(0.5), ("embed",)), (self.d_model,))

  def body(self, x_BxTxD, fine, deterministic, tokens_BxT=None):
    layers.remember(self, "embedded", x_BxTxD)  # a decoder's last prompt embedding
    prev_BxTxD = jnp.pad(x_BxTxD[:, :-1], ((0, 0), (1, 0), (0, 0)))
    # The causality rule within documents: a document's first token has no
    # previous one, whatever precedes it in the packed row.
    seg_BxT = fine.seg_BxL
    same_BxT = jnp.pad(seg_BxT[:, 1:] == seg_BxT[:, :-1], ((0, 0), (1, 0)))
    x_BxTxD = x_BxTxD + self.shift.astype(x_BxTxD.dtype) * jnp.where(
        same_BxT[..., None], prev_BxTxD, 0)
    return self.blocks(x_BxTxD, fine, deterministic)

  def init_cache(self, batch, capacity):
    return {"kv": layers.KV.empty(self.block_cfg, self.num_layers, batch, capacity),
            "prev": jnp.zeros((batch, self.d_model), self.block_cfg.jnp_dtype)}

  def step(self, state, token_B, t):
    e_BxD = self.embed.step(token_B, t)
    x_BxD = e_BxD + self.shift.astype(e_BxD.dtype) * state["prev"]
    x_BxD, kv = self.blocks.step(x_BxD, state["kv"], t, t)
    return {"kv": kv, "prev": e_BxD}, self.logits_at(x_BxD)

  def prompt_state(self, p, capacity):
    embedded = self.variables[layers.DECODE]["embedded"]
    return {"kv": self.blocks.prompt_cache(capacity, p), "prev": embedded[:, p - 1]}

  def blocks_at(self, t):
    return [self.self_attention("blocks", self.num_layers, t, 1)]

  def extra_params(self):
    return self.d_model  # the shift

  @classmethod
  def check_config(cls, cfg, seq_len):
    super().check_config(cfg, seq_len)
    base.positive(cfg, "num_layers")


# Step 3, its config file (written where a user's configs/token_shift.py would be).
CONFIG_FILE = '''
from hiertx import config as config_lib

LAYERS = {"tiny": 1, "small": 2, "base": 4}


def get_config(arg=None):
  arg = config_lib.parse_arg(arg, size="small", runlocal=False)
  c = config_lib.base_config()
  c.model = config_lib.model_config("token_shift", arg.size,
                                    num_layers=config_lib.choose(LAYERS, arg.size, "size"))
  config_lib.apply_size_defaults(c, arg)
  return c
'''


@pytest.fixture(scope="module")
def toy(tmp_path_factory):
  """Steps 2-4: registered, with a config file and a tiny variant, for this
  module's tests only."""
  path = tmp_path_factory.mktemp("configs") / "token_shift.py"
  path.write_text(CONFIG_FILE)
  with pytest.MonkeyPatch.context() as mp:
    mp.setitem(models.MODELS, "token_shift", TokenShiftLM)
    mp.setitem(conftest.CONFIG_FILES, "token_shift", str(path))
    mp.setitem(tiny_models.MODELS, "token_shift", dict(name="token_shift", num_layers=2))
    yield "token_shift"


def test_the_toy_model_is_configured_like_the_others(toy):
  for size in ("tiny", "small", "base"):
    test_config.test_every_config_file_validates(toy, size)
  with pytest.raises(ConfigError, match="^config.model.num_layers: must be a positive"):
    models.check({"name": toy, "num_layers": 0}, 64)


def test_the_toy_model_is_causal(toy):
  t = test_models.length(toy)
  test_models.test_prefix_invariance(toy, t)
  test_models.test_jacobian_is_exactly_causal_and_every_past_token_reaches(toy, t)
  test_models.test_packed_documents(toy)


def test_the_toy_model_decodes_exactly(toy):
  test_decode.test_cached_decoding_equals_the_full_forward_pass(toy)


def test_the_toy_models_cost_is_derived_from_its_structure(toy):
  test_cost.test_analytic_parameter_count_is_exact(toy)
  test_cost.test_analytic_flops_match_xla_for_unrolled_blocks(toy)
  test_cost.test_analytic_memory_is_within_tolerance_of_xla(toy, "none", False, None)


def test_the_toy_model_trains_sharded_as_on_one_device(toy, tiny_config):
  test_sharding.test_sharded_training_matches_one_device(toy, tiny_config)
