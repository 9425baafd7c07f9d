"""Top-down multi-scale LM (Subramanian et al. 2020): coarse to fine.

  e_0 = embed(x),  e_s = Pool_k(e_{s-1})
  z_S = Blocks_S(e_S);  z_s = Blocks_s(Up_k(e_s, z_{s+1}))  for s = S-1 .. 0
Up is repeat, per-offset linear, or cross-attention under the scale mask.
Blocks_0 needs at least one block: it is the only place the tokens a coarse
state is stale on can be seen.
"""

import math

from hiertx import layers
from hiertx import scales
from hiertx.errors import ConfigError
from hiertx.models import base


class TopDownLM(base.LanguageModel):
  layers_per_scale: tuple = (2, 2, 2)  # scale 0 (fine) .. S
  pool_factors: tuple = (4, 4)
  pooling: str = "mean"
  upsampling: str = "repeat"

  def length_multiple(self) -> int:
    return math.prod(self.pool_factors)

  def body(self, x_BxTxD, fine: scales.Scale, deterministic: bool):
    c = self.block_cfg
    embeds, grid = [x_BxTxD], [fine]
    for s, k in enumerate(self.pool_factors, start=1):
      embeds.append(scales.Pool(self.pooling, k, c, name=f"pool_{s}")(
          embeds[-1], grid[-1], deterministic))
      grid.append(scales.coarser(grid[-1], k))
    top = len(self.pool_factors)
    z = layers.Stack(c, self.layers_per_scale[top], name=f"scale_{top}")(
        embeds[top], scales.mask(grid[top], grid[top]), grid[top].end_L, deterministic)
    for s in range(top - 1, -1, -1):
      x = scales.Upsample(self.upsampling, self.pool_factors[s], c, name=f"upsample_{s}")(
          embeds[s], z, grid[s], grid[s + 1], deterministic)
      z = layers.Stack(c, self.layers_per_scale[s], name=f"scale_{s}")(
          x, scales.mask(grid[s], grid[s]), grid[s].end_L, deterministic)
    return z

  @classmethod
  def check_config(cls, cfg, seq_len):
    super().check_config(cfg, seq_len)
    n = 1 if isinstance(cfg["pool_factors"], int) else len(cfg["pool_factors"])
    factors = base.int_list(cfg, "pool_factors", n, minimum=2)
    base.check_pooling_fits("model.pool_factors", math.prod(factors), seq_len)
    per_scale = base.int_list(cfg, "layers_per_scale", n + 1, minimum=0)
    if per_scale[0] < 1:
      raise ConfigError("model.layers_per_scale", "scale 0 needs at least one block after "
                        "the last upsampling: coarse states are stale by up to k^s - 1 "
                        f"tokens and only fine blocks can see them (got {per_scale})")
    base._choice(cfg, "pooling", scales.POOLINGS)
    base._choice(cfg, "upsampling", scales.UPSAMPLINGS)
