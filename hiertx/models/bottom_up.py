"""Bottom-up multi-scale LM (Subramanian et al. 2020): fine to coarse, one
global upsampling through an aggregation layer (DESIGN.md section 3).

  h_0 = Blocks_0(embed(x));  h_s = Blocks_s(Pool_k(h_{s-1}))  for s = 1..S
  aggregation: fine queries attend to [h_0; h_1 + e_1; ...; h_S + e_S]
               (e_s a learned scale embedding) under the scale mask, then FFN
  post: M >= 1 fine blocks, which see the tokens coarse states are stale on.
"""

import math

import flax.linen as nn
import jax.numpy as jnp

from hiertx import layers
from hiertx import scales
from hiertx.errors import ConfigError
from hiertx.models import base


class BottomUpLM(base.LanguageModel):
  layers_per_scale: tuple = (2, 2, 2)  # scale 0 (fine) .. S
  pool_factors: tuple = (4, 4)  # k between scale s-1 and s, s = 1..S
  pooling: str = "mean"
  post_layers: int = 1
  query_adds_coarse: bool = False  # aggregation queries add repeated coarse states

  def length_multiple(self) -> int:
    return math.prod(self.pool_factors)

  def body(self, x_BxTxD, fine: scales.Scale, deterministic: bool):
    c = self.block_cfg
    h = layers.Stack(c, self.layers_per_scale[0], name="scale_0")(
        x_BxTxD, scales.mask(fine, fine), fine.end_L, deterministic)
    states, grid = [h], [fine]
    for s, k in enumerate(self.pool_factors, start=1):
      coarse = scales.coarser(grid[-1], k)
      h = scales.Pool(self.pooling, k, c, name=f"pool_{s}")(h, grid[-1], deterministic)
      h = layers.Stack(c, self.layers_per_scale[s], name=f"scale_{s}")(
          h, scales.mask(coarse, coarse), coarse.end_L, deterministic)
      states.append(h)
      grid.append(coarse)

    scale_emb_SxD = self.param(
        "scale_embedding",
        nn.with_logical_partitioning(nn.initializers.normal(0.02), (None, "embed")),
        (len(states), self.d_model))
    kv_BxNxD = jnp.concatenate(
        [h + scale_emb_SxD[s].astype(h.dtype) for s, h in enumerate(states)], axis=1)
    keys = scales.concat_scales(*grid)
    q_BxTxD = states[0]
    if self.query_adds_coarse:
      for s in range(1, len(states)):
        q_BxTxD = q_BxTxD + scales.upsample_repeat(
            states[s], grid[s], fine, math.prod(self.pool_factors[:s]))
    x_BxTxD = layers.Block(c, name="aggregate")(
        q_BxTxD, scales.mask(fine, keys), fine.end_L, kv_BxSxD=kv_BxNxD,
        k_pos_S=keys.end_L, deterministic=deterministic)
    return layers.Stack(c, self.post_layers, name="post")(
        x_BxTxD, scales.mask(fine, fine), fine.end_L, deterministic)

  @classmethod
  def check_config(cls, cfg, seq_len):
    super().check_config(cfg, seq_len)
    n = 1 if isinstance(cfg["pool_factors"], int) else len(cfg["pool_factors"])
    factors = base.int_list(cfg, "pool_factors", n, minimum=2)
    base.check_pooling_fits("model.pool_factors", math.prod(factors), seq_len)
    base.int_list(cfg, "layers_per_scale", n + 1, minimum=1)
    base._choice(cfg, "pooling", scales.POOLINGS)
    if not isinstance(cfg["post_layers"], int) or cfg["post_layers"] < 1:
      raise ConfigError("model.post_layers", "needs at least one fine block after the "
                        "aggregation layer: coarse states are up to k^s - 1 tokens stale "
                        f"and only fine blocks can see that gap (got {cfg['post_layers']})")
