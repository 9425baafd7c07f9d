"""Decoder-only pre-LN transformer: the baseline every ratio is taken against."""

from hiertx import layers
from hiertx import scales
from hiertx.models import base


class VanillaLM(base.LanguageModel):
  num_layers: int = 4  # decoder blocks

  def setup(self):
    super().setup()
    self.blocks = layers.Stack(self.block_cfg, self.num_layers)

  def body(self, x_BxTxD, fine: scales.Scale, deterministic: bool, tokens_BxT=None):
    return self.blocks(x_BxTxD, fine, deterministic)

  def init_cache(self, batch, capacity):
    return {"kv": layers.KV.empty(self.block_cfg, self.num_layers, batch, capacity)}

  def step(self, state, token_B, t):
    x_BxD, kv = self.blocks.step(self.embed.step(token_B, t), state["kv"], t, t)
    return {"kv": kv}, self.logits_at(x_BxD)

  def prompt_state(self, p, capacity):
    return {"kv": self.blocks.prompt_cache(capacity, p)}

  def blocks_at(self, t):
    return [self.self_attention("blocks", self.num_layers, t, 1)]

  @classmethod
  def check_config(cls, cfg, seq_len):
    super().check_config(cfg, seq_len)
    base.positive(cfg, "num_layers")
