"""Decoder-only pre-LN transformer: the baseline every ratio is taken against."""

from hiertx import layers
from hiertx import scales
from hiertx.models import base


class VanillaLM(base.LanguageModel):
  num_layers: int = 4

  def body(self, x_BxTxD, fine: scales.Scale, deterministic: bool):
    return layers.Stack(self.block_cfg, self.num_layers, name="blocks")(
        x_BxTxD, scales.mask(fine, fine), fine.end_L, deterministic)

  @classmethod
  def check_config(cls, cfg, seq_len):
    super().check_config(cfg, seq_len)
    base._positive(cfg, "num_layers")
